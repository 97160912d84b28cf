"""The training core in one process: what trains and what stays frozen, gradient
accumulation, restoring a checkpoint onto another mesh, the extension points and named random
streams, the SIGTERM flag, and the refusals (unknown settings, another model's checkpoint,
bad batches).

The step sharded over 8 devices (data 2 x fsdp 2 x tensor 2, in two processes) against one
device, kill-and-resume and the command itself are in test_train_command.py; the demo's
extensions in test_demo.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers

from configs import mmi_13b
from mmi_jax import command_line, integrity, sharding
from mmi_jax.convert import __main__ as convert_cli
from mmi_jax.convert import release
from mmi_jax.data import pipeline
from mmi_jax.train import checkpoints as checkpoints_lib
from mmi_jax.train import config_check, extensions, loop
from mmi_jax.train import optimizer as optimizer_lib
from mmi_jax.train.batches import check_batch, global_batch
from mmi_jax.train.preemption import Preemption, Stopped
from mmi_jax.train.rng_streams import CORE_STREAMS, RngStreams
from mmi_jax.train.train_step import loss_and_grads
from mmi_jax.train.workdir_lock import WorkdirLock
from training_cases import (LLM_LAYERS, TEXT_ONLY_GROUP, WHOLE_MODEL_GROUP, flat, leaves,
                            run_steps,
                            setup_for, small_config, text_only_params, two_whole_model_steps)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adam_first_moments(opt_state):
  """`{param path: Adam's first moment}` from the optimizer state."""
  moments = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if any(getattr(entry, "name", None) == "mu" for entry in path):
      keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
      moments["/".join(keys[1:])] = np.asarray(leaf)
  return moments



# --------------------------------------------------------------------------------------------
# The release's trainable set on the whole model (image decoder included).


@WHOLE_MODEL_GROUP
def test_two_steps_of_the_release_s_trainable_set():
  """Frozen params stay bit-identical, trainable ones move, the optimizer state covers only
  trainable params, and the logged learning rate follows the schedule."""
  config, setup, before, state, metrics = two_whole_model_steps()
  check_frozen_and_trainable(config, setup, before, state, metrics)
  check_optimizer_state_covers_only_trainable_params(state)
  # Step index 1 (the second step) with 1 warm-up step: the full rate.
  expected = optimizer_lib.group_learning_rates(config, 1)[optimizer_lib.DEFAULT_GROUP]
  np.testing.assert_allclose(float(metrics["learning_rate"]), expected, rtol=1e-6)


def check_frozen_and_trainable(config, setup, before, state, metrics):
  after = flat(state.all_params())
  mask = flat(setup.trainable_mask)
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  frozen = [path for path, trains in mask.items() if not trains]
  trainable = [path for path, trains in mask.items() if trains]
  assert frozen and trainable
  for path in frozen:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  changed = {path for path in trainable if not np.array_equal(after[path], before[path])}
  # A trainable param that did not move had no gradient in either step (Adam's first moment
  # is zero: the loss does not depend on it, as a key bias under the softmax) and no weight
  # decay.
  first_moments = adam_first_moments(state.opt_state)
  decays = flat(optimizer_lib.weight_decay_mask(setup.model, setup.example_batch))
  labels = flat(optimizer_lib.param_groups(setup.abstract_params, config))
  group_decay = {label: wd for label, (_, wd) in optimizer_lib.group_settings(
      config.train).items()}
  for path in set(trainable) - changed:
    assert not np.any(first_moments[path]), path
    decayed = decays[path] and group_decay[str(labels[path])] > 0
    assert not decayed or not np.any(before[path]), path
  assert len(changed) > 0.5 * len(trainable)
  # The parts SPEC 9 names: frozen ViT trunk, LLM, VAE and original head; trained adapter,
  # MMFS, UNet, MMFS net, perceivers and projections.
  assert not mask["visual_tokenizer/encoder/encoder/layers_0/mlp/fc1/kernel"]
  assert not mask["mm_decoder/layers_1/mlp/gate_proj/kernel"]
  assert not mask["image_decoder/decoder/vae/encoder/conv_in/kernel"]
  assert not mask["text_decoder/head/kernel"]
  for path in ("mm_decoder/layers_0/llama_cross_attn/gate", "text_decoder/head_new/kernel",
               "image_decoder/decoder/unet/conv_in/kernel", "soi_token",
               "image_decoder/decoder/mmfs_module/mmfs_mid_block/conv/kernel",
               "visual_tokenizer/encoder/adapter_interactions_0/injector/gamma"):
    assert mask[path], path


def check_optimizer_state_covers_only_trainable_params(state):
  trainable_paths = set(flat(state.params))
  assert not trainable_paths & set(flat(state.frozen))
  moments = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    keys = tuple(entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey))
    if leaf.ndim or keys[1:]:
      assert "/".join(keys[1:]) in trainable_paths, jax.tree_util.keystr(path)
      moments += leaf.size
  trainable_count = sum(leaf.size for leaf in flat(state.params).values())
  assert moments == 2 * trainable_count


# --------------------------------------------------------------------------------------------
# The text-only model: sharding, accumulation, checkpoints across meshes.


@TEXT_ONLY_GROUP
def test_gradient_accumulation_averages_micro_batch_gradients():
  """Two micro-batches give the mean of their gradients and losses. One compiled function
  (accumulation 2) serves as its own reference, with dropout off so that a micro-batch's
  gradient does not depend on its rng: micro-batches (b0, b1) must give the mean of (b0, b0)
  and (b1, b1), and (b0, b0) must be the gradient of b0's loss (a central difference of the
  reported loss along it), which a sum instead of a mean would double."""
  config = small_config("text_only", documents_per_row=1)
  config.model.visual_tokenizer.qformer.update(dropout=0.0, attention_dropout=0.0)
  setup, data, mesh = setup_for(config)
  state = setup.state_from_params(text_only_params(), jax.random.key(2))
  accumulate = jax.jit(functools.partial(loss_and_grads, setup, accumulation=2))
  first, second = data[0][0], data[1][0]
  both_metrics, both = accumulate(state, global_batch([first, second], mesh))
  first_metrics, first_grads = accumulate(state, global_batch([first, first], mesh))
  second_metrics, second_grads = accumulate(state, global_batch([second, second], mesh))
  want = {path: (grad + flat(second_grads)[path]) / 2 for path, grad in flat(first_grads).items()}
  for path, got in flat(both).items():
    np.testing.assert_allclose(got, want[path], rtol=1e-5, atol=1e-7, err_msg=path)
  np.testing.assert_allclose(float(both_metrics["loss"]), (float(first_metrics["loss"]) + float(
      second_metrics["loss"])) / 2, rtol=1e-6)
  assert float(first_metrics["loss"]) != float(second_metrics["loss"])

  norm = np.sqrt(sum(np.sum(np.square(g)) for g in flat(first_grads).values()))
  epsilon = 1e-3
  def loss_moved(sign):
    params = jax.tree.map(lambda p, g: p + sign * epsilon * g / norm, state.params, first_grads)
    metrics, _ = accumulate(state.replace(params=params), global_batch([first, first], mesh))
    return float(metrics["loss"])
  slope = (loss_moved(1.0) - loss_moved(-1.0)) / (2 * epsilon)
  np.testing.assert_allclose(slope, norm, rtol=2e-2)


@TEXT_ONLY_GROUP
def test_a_checkpoint_of_one_mesh_restores_onto_another(tmp_path):
  config = small_config("text_only")
  setup, state, _ = run_steps((1, 1, 1))
  data_iterator = iter(pipeline.make_dataset(config, "train"))
  next(data_iterator)
  saver = checkpoints_lib.Checkpoints(tmp_path, config)
  saver.save(state, data_iterator, force=True)
  saver.close()

  other, _, _ = setup_for(config, (2, 2, 2))
  fresh_iterator = iter(pipeline.make_dataset(config, "train"))
  restored = checkpoints_lib.Checkpoints(tmp_path, config).restore(other, fresh_iterator).state
  assert int(restored.step) == 3
  want, got = leaves(state), leaves(restored)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)
  embedding = restored.params["mm_decoder"]["embed_tokens"]["embedding"]
  assert embedding.sharding == other.state_shardings.params["mm_decoder"]["embed_tokens"][
      "embedding"]
  # The rules do split it over the 8 devices.
  assert embedding.sharding.spec != jax.sharding.PartitionSpec()
  assert sharding.shard_shapes(embedding) != embedding.shape
  # The data iterator continues after the batch consumed before the save.
  np.testing.assert_array_equal(next(fresh_iterator)[0].text_ids,
                                pipeline.make_dataset(config, "train")[1][0].text_ids)


def test_array_digests_do_not_depend_on_the_sharding_and_see_one_changed_bit():
  """The same values split over 8 devices (in several ways) and on the host give the same
  digests; a last-bit change, two elements swapped and a NaN are seen."""
  mesh, spec = jax.make_mesh((2, 4), ("a", "b")), jax.sharding.PartitionSpec
  values = np.random.RandomState(0).randn(6, 8, 5).astype(np.float32)
  host = {"x": values, "y": values[0].astype(jax.numpy.bfloat16), "step": np.int32(3),
          "mask": np.array([True, False])}
  placed = {"x": (spec("a", "b"), values), "y": (spec("b", None), host["y"]),
            "step": (spec(), host["step"]), "mask": (spec("a"), host["mask"])}
  sharded = {name: jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
             for name, (spec, value) in placed.items()}
  digests, nonfinite = integrity.array_digests(host)
  assert integrity.array_digests(sharded) == (digests, {}) and nonfinite == {}
  last_bit, swapped, with_nan = values.copy(), values.copy(), values.copy()
  last_bit[3, 4, 2] = np.nextafter(last_bit[3, 4, 2], np.float32(9))
  swapped[0, 0, :2] = values[0, 0, 1::-1]
  with_nan[1, 1, 1] = np.nan
  for changed in (last_bit, swapped):
    assert integrity.array_digests({**host, "x": changed})[0]["['x']"] != digests["['x']"]
  assert integrity.array_digests({"x": with_nan})[1] == {"['x']": 1}
  key = "['x']"
  assert integrity.differences(digests, {**digests, key: "0" * 16}) == [
      f"{key}: digest {'0' * 16}, recorded {digests[key]}"]


def largest_file(directory) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


@TEXT_ONLY_GROUP
def test_a_damaged_checkpoint_is_named_set_aside_and_the_intact_one_before_it_restored(
    tmp_path):
  """Steps 3, 4 and 5 saved; then bytes of one of step 5's arrays flipped (Orbax alone reads
  them back as wrong numbers without an error) and step 4's data position changed. Resuming
  names both, moves them to `damaged_checkpoints/`, and restores step 3 bit for bit with its
  data position and skipped-document counts. With no intact step left it stops, listing what
  it found; a state holding NaN is not saved. (A file cut short, which Orbax cannot read, is
  in test_train_command.py: in this process its abandoned reads would be reported as
  unraisable exceptions.)"""
  config = small_config("text_only")
  config.train.keep_checkpoints = 3
  setup, state, _ = run_steps((1, 1, 1))
  data_iterator = iter(pipeline.make_dataset(config, "train"))
  next(data_iterator)
  skipped = {"longer_than_row": 0, "too_many_images": 2, "row_full": 1, "no_room": 0}
  saver = checkpoints_lib.Checkpoints(tmp_path, config)
  for step in (3, 4, 5):
    saver.save(state.replace(step=np.int32(step)), data_iterator, skipped, force=True)
  saver.close()

  def flip_bytes(step):
    path = largest_file(tmp_path / "checkpoints" / str(step) / "state")
    with open(path, "r+b") as file:
      file.seek(os.path.getsize(path) // 2)
      middle = file.read(8)
      file.seek(os.path.getsize(path) // 2)
      file.write(bytes(byte ^ 0x5A for byte in middle))

  flip_bytes(5)
  position = tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json"
  assert json.loads(position.read_text()) == {"next_index": 1}
  position.write_text(json.dumps({"next_index": 7}))

  reported = []
  fresh_iterator = iter(pipeline.make_dataset(config, "train"))
  resumed = checkpoints_lib.Checkpoints(tmp_path, config)
  restored = resumed.restore_latest_intact(setup, fresh_iterator, reported.append)
  assert restored.step == 3 and restored.skipped == skipped
  assert reported[0].startswith("checkpoint step 5 is damaged and set aside: ")
  assert "5 is not what was saved: " in reported[0] and ": digest " in reported[0]
  assert reported[1].startswith("checkpoint step 4 is damaged and set aside: ")
  assert "the data position of process 0 differs from the one saved" in reported[1]
  assert sorted(os.listdir(tmp_path / "damaged_checkpoints")) == ["4", "5"]
  assert resumed.all_steps() == [3]
  want, got = leaves(state), leaves(restored.state.replace(step=state.step))
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)
  np.testing.assert_array_equal(next(fresh_iterator)[0].text_ids,
                                pipeline.make_dataset(config, "train")[1][0].text_ids)

  # The next save of step 4 finds its place free.
  resumed.save(state.replace(step=np.int32(4)), fresh_iterator, skipped, force=True)
  resumed.wait()
  assert resumed.all_steps() == [3, 4]
  resumed.close()
  flip_bytes(3)
  flip_bytes(4)
  damaged = checkpoints_lib.Checkpoints(tmp_path, config)
  with pytest.raises(checkpoints_lib.DamagedCheckpointError,
                     match=rf"(?s)no intact checkpoint in {tmp_path / 'checkpoints'} .*"
                           rf"{tmp_path / 'checkpoints'}/4 is not what .*"
                           rf"{tmp_path / 'checkpoints'}/3 is not what"):
    damaged.restore_latest_intact(setup, iter(pipeline.make_dataset(config, "train")), print)
  damaged.close()

  diverged = state.replace(params=jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf * np.nan if "embed_tokens" in jax.tree_util.keystr(path) else leaf,
      state.params))
  saver = checkpoints_lib.Checkpoints(tmp_path / "diverged", config)
  with pytest.raises(checkpoints_lib.NonFiniteStateError,
                     match=r"step 3: the train state holds NaN or inf, in 1 arrays: "
                           r"\.params\['mm_decoder'\]\['embed_tokens'\]\['embedding'\] \(\d+\)"):
    saver.save(diverged, data_iterator, force=True)
  saver.close()
  assert saver.all_steps() == []


@TEXT_ONLY_GROUP
def test_a_training_run_converts_to_the_release_format_and_back_bitwise_and_exports(tmp_path):
  """`python -m mmi_jax.convert` reads a training workdir (its latest step, or `--step`): to
  the release's state dict and back to an Orbax params checkpoint, bit for bit, and to the
  Hugging Face exports of the parts the model has, one command each."""
  config = small_config("text_only")
  _, trained, _ = run_steps((1, 1, 1))
  # Hugging Face's lm_head has no bias: the text ids' head bias is 0, as the release's frozen
  # head keeps it (the demo trains it, and its export is refused, naming the bias).
  state = trained.replace(**{part: jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf * 0 if jax.tree_util.keystr(path) == "['text_decoder']['head']"
      "['bias']" else leaf, getattr(trained, part)) for part in ("params", "frozen")})
  saver = checkpoints_lib.Checkpoints(tmp_path / "run", config)
  saver.save(state, iter(pipeline.make_dataset(config, "train")), force=True)
  saver.close()
  flags = ["--config=configs/demo.py:text_only", f"--config.model.llm.num_layers={LLM_LAYERS}",
           "--noprogress"]
  convert_cli.main(["convert", "jax-to-release", str(tmp_path / "run"), str(tmp_path / "release"),
                    *flags])
  convert_cli.main(["convert", "release-to-jax", str(tmp_path / "release"),
                    str(tmp_path / "orbax"), *flags])
  want = flat(state.all_params())
  released = flat(release.load(tmp_path / "release", config.model, progress=False))
  back = flat(ocp.StandardCheckpointer().restore(tmp_path / "orbax"))
  assert want.keys() == released.keys() == back.keys()
  for path, leaf in want.items():
    np.testing.assert_array_equal(released[path], leaf, err_msg=path)
    np.testing.assert_array_equal(back[path], leaf, err_msg=path)
  convert_cli.main(["convert", "export", str(tmp_path / "run"), str(tmp_path / "hf"),
                    "--step=3", *flags])
  assert sorted(os.listdir(tmp_path / "hf")) == ["clip_vision", "llama"]  # no image decoder
  llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf" / "llama")
  np.testing.assert_array_equal(llama.model.embed_tokens.weight.detach().numpy(),
                                want["mm_decoder/embed_tokens/embedding"])
  with pytest.raises(command_line.UsageError, match=r"no checkpoint of step 5; saved steps: \[3\]"):
    convert_cli.main(["convert", "export", str(tmp_path / "run"), str(tmp_path / "hf5"),
                      "--step=5", *flags])
  # A params array that is not what was saved (here: its recorded digest changed) is named.
  record_path = tmp_path / "run" / "checkpoints" / "3" / "integrity" / "metadata"
  record = json.loads(record_path.read_text())
  embedding = ".params['mm_decoder']['embed_tokens']['embedding']"
  record["state"][embedding] = "0" * 16
  record_path.write_text(json.dumps(record))
  with pytest.raises(command_line.UsageError, match=re.escape(
      f"{tmp_path / 'run' / 'checkpoints' / '3'} is not what the run saved: {embedding}: digest")):
    convert_cli.main(["convert", "export", str(tmp_path / "run"), str(tmp_path / "hf3"), *flags])
  # A head bias the export cannot hold: the other parts are written, the llama is named.
  saver = checkpoints_lib.Checkpoints(tmp_path / "biased", config)
  saver.save(trained, iter(pipeline.make_dataset(config, "train")), force=True)
  saver.close()
  with pytest.raises(SystemExit, match="1"):
    convert_cli.main(["convert", "export", str(tmp_path / "biased"), str(tmp_path / "hf2"),
                      *flags])
  assert os.listdir(tmp_path / "hf2") == ["clip_vision"]


# --------------------------------------------------------------------------------------------
# Refusals.


@TEXT_ONLY_GROUP
def test_a_workdir_with_another_model_s_checkpoint_is_refused(tmp_path):
  config = small_config("text_only")
  setup, state, _ = run_steps((1, 1, 1))
  saver = checkpoints_lib.Checkpoints(tmp_path, config)
  saver.save(state, iter(pipeline.make_dataset(config, "train")), force=True)
  saver.close()
  other = small_config("text_only")
  other.model.llm.num_layers = 1
  with pytest.raises(checkpoints_lib.ArchitectureMismatchError,
                     match=r"(?s)another model.*model\.llm\.num_layers: checkpoint 2, config 1"):
    checkpoints_lib.Checkpoints(tmp_path, other).check_architecture(3)


def test_unknown_settings_are_refused_with_the_closest_known_one():
  config = small_config()
  config.check_known_keys = None  # a key that is not a setting
  config.train.learnig_rate = 1.0
  with pytest.raises(ValueError, match=r"train\.learnig_rate \(did you mean "
                                       r"train\.learning_rate\?\)"):
    config_check.check_config_keys(config)
  config_check.check_config_keys(small_config())
  config_check.check_config_keys(small_config("text_only"))
  config_check.check_config_keys(mmi_13b.get_config())


def test_an_extension_s_section_is_accepted_only_with_the_extension_and_whole():
  """The demo's sections are settings only in a config that selects their extensions; in
  one, a key the extension does not declare and a declared key the section lacks are refused
  with the extension's key named."""
  release = mmi_13b.get_config()
  release.stand_ins = small_config().stand_ins
  with pytest.raises(ValueError, match=r"stand_ins\.vae_fit\.kl_weight"):
    config_check.check_config_keys(release)
  config = small_config()
  del config.stand_ins.vae_fit["kl_weight"]
  config.stand_ins.vae_fit.kl_wieght = 1e-4
  with pytest.raises(ValueError, match=r"(?s)stand_ins\.vae_fit\.kl_wieght \(did you mean "
                     r"stand_ins\.vae_fit\.kl_weight\?\).*stand_ins\.vae_fit\.kl_weight is "
                     r"missing"):
    config_check.check_config_keys(config)


@pytest.mark.parametrize("name, problem", [
    ("mmi_jax.demo.no_such_module.Thing", "cannot be imported"),
    ("mmi_jax.train.loop.train_and_evaluate", "is not an mmi_jax.train.extensions.Extension"),
])
def test_a_config_naming_something_that_is_not_an_extension_is_refused(name, problem):
  config = small_config()
  config.train.extensions = (name,)
  with pytest.raises(ValueError, match=f"config.train.extensions: '{name}' {problem}"):
    extensions.extension_classes(config)


def test_every_random_stream_of_a_job_has_its_own_key():
  """The training core's streams and the demo's extensions' are named once, numbered once and
  draw different keys, but for the one declared alias (the demo's vision fit draws the train
  steps' key); a name or a number claimed twice, or an alias of nothing, is refused."""
  config = small_config()
  built = [extension(config) for extension in extensions.extension_classes(config)]
  streams = RngStreams(config.seed, ("core", CORE_STREAMS), *extensions.rng_tables(built))
  assert set(streams.names) == {"params", "train_steps", "vision_fit", "vae_fit", "llm_fit",
                                "decoder_fit", "decoder_fit_after_training",
                                "shapes_evaluation"}
  assert streams.aliases == {"vision_fit": "train_steps"}
  data = lambda key: tuple(np.asarray(jax.random.key_data(key)))  # noqa: E731
  keys = {name: data(streams.key(name)) for name in streams.names if name not in
          streams.aliases}
  # With the steps each stream folds in (train steps, evaluations), still all distinct.
  keys.update({(name, step): data(streams.key(name, step))
               for name in ("train_steps", "shapes_evaluation") for step in range(3)})
  assert len(set(keys.values())) == len(keys)
  assert data(streams.key("vision_fit")) == keys["train_steps"]
  with pytest.raises(ValueError, match="number 2 is claimed twice: extra's stream 'x' .*"
                                       "core's stream 'train_steps'"):
    RngStreams(0, ("core", CORE_STREAMS), ("extra", {"x": 2}))
  with pytest.raises(ValueError, match="name 'params' is claimed twice"):
    RngStreams(0, ("core", CORE_STREAMS), ("extra", {"params": 9}))
  with pytest.raises(ValueError, match="draws stream 'eval', which no table numbers"):
    RngStreams(0, ("core", CORE_STREAMS), ("extra", {"x": "eval"}))


def test_sigterm_and_ctrl_c_are_a_flag_that_stops_the_phase_and_twice_stop_at_once():
  """In one process (two processes stopping together are in test_train_command.py), SIGTERM
  and SIGINT set the flag instead of ending the process; `check` raises `Stopped` naming the
  phase; a second signal of a kind goes to the handler before (Ctrl-C twice interrupts at
  once); leaving gives both signals back."""
  before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
  with Preemption() as preemption:
    preemption.check("nothing yet")
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.any_process() == "SIGTERM"
    with pytest.raises(Stopped, match="SIGTERM during train step 3"):
      preemption.check("train step 3")
  former = []  # the handler before: what a second signal of a kind reaches
  signal.signal(signal.SIGINT, lambda number, frame: former.append(number))
  try:
    with Preemption() as preemption:
      os.kill(os.getpid(), signal.SIGINT)
      assert preemption.requested == "SIGINT" and former == []
      os.kill(os.getpid(), signal.SIGINT)
      assert former == [signal.SIGINT]
  finally:
    signal.signal(signal.SIGINT, before[signal.SIGINT])
  assert {number: signal.getsignal(number) for number in before} == before


def test_the_background_compiler_s_failures_are_exceptions_and_exit_waits_for_its_compile():
  """A job that fails raises where its result is asked for; a process that ends on an error
  while a compile runs in the background waits for it and exits with its error (exit 1), not
  with the interpreter's abort (exit 134, "terminate called ...")."""
  script = """if True:
    import jax, jax.numpy as jnp
    from mmi_jax.train import background

    def program(x):
      for index in range(300):
        x = jnp.sin(x @ x) + index
      return x

    def fails():
      raise ValueError("the first job fails")

    with background.Worker() as worker:
      failed = worker.submit(fails)
      compiling = worker.submit(
          jax.jit(program).lower(jax.ShapeDtypeStruct((8, 8), jnp.float32)).compile)
      while not compiling.running():
        pass
      failed.result()
    """
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300, cwd=ROOT,
                        # XLA's own optimisation level: the compile outlasts the main thread.
                        env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
                             "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 1, done.stderr[-3000:]
  assert done.stderr.strip().endswith("ValueError: the first job fails")
  assert "terminate called" not in done.stderr


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
  """The lock is held from the first run's start to its end (or its process's); a run
  started meanwhile stops before it builds anything."""
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(command_line.UsageError, match=rf"--workdir: {tmp_path} is in use by "
                       rf"another run \(pid {os.getpid()} on .* since .*\)"):
      loop.train_and_evaluate(small_config("text_only"), str(tmp_path), log=print)
    assert os.listdir(tmp_path) == ["run.lock"]
  with WorkdirLock(str(tmp_path)):  # released: the next run takes it
    pass


def test_a_batch_whose_image_tokens_disagree_with_its_images_is_refused():
  config = small_config("text_only")
  batch, _ = pipeline.make_dataset(config, "train")[0]
  check_batch(batch, config)
  # One picture too few: the row's soi tokens announce more images than it owns.
  row = int(batch.image_sequence_ids[0])
  valid = batch.image_valid.copy()
  valid[np.flatnonzero(valid & (batch.image_sequence_ids == row))[-1]] = False
  with pytest.raises(ValueError, match=f"row {row}: .* soi tokens but .* images"):
    check_batch(batch.replace(image_valid=valid), config)


