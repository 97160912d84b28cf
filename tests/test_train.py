"""The train step and checkpoints in one process: what trains and what stays frozen, gradient
accumulation, restoring a checkpoint onto another mesh, and the refusals (unknown settings,
another model's checkpoint).

The step sharded over 8 devices (data 2 x fsdp 2 x tensor 2, in two processes) against one
device, kill-and-resume and the command itself are in test_train_command.py.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs import demo, tiny
from mmi_jax import sharding
from mmi_jax.data import pipeline, shapes, tokenizer
from mmi_jax.models.image_decoder import ImageDecoder, ImageDecoderConfig
from mmi_jax.models.linear import Linear
from mmi_jax.models.vae import AutoencoderKL, VAEConfig
from mmi_jax.train import checkpoints as checkpoints_lib
from mmi_jax.train import (background, config_check, decoder_fit, fit_schedule, llm_fit, loop,
                           vae_fit, vision_fit)
from mmi_jax.train import optimizer as optimizer_lib
from mmi_jax.train.evaluation import Evaluator
from mmi_jax.train.train_state import TrainSetup
from mmi_jax.train.train_step import compile_train_step
from random_params import random_params


# The tests train a smaller LLM (2 layers: MMFS in the first, a plain one after), to compile
# faster; the training code is the same.
LLM_LAYERS = 2
# The tests sharing `run_steps` run on one pytest-xdist worker (`--dist loadgroup`), so that
# its compiles happen once.
TEXT_ONLY_GROUP = pytest.mark.xdist_group("text_only_model")


def small_config(variant: str = "", **data):
  config = demo.get_config(variant)
  config.data.update(batch_size=4, **data)
  config.train.update(steps=10, warmup_steps=1)
  config.model.llm.num_layers = LLM_LAYERS
  return config


def setup_for(config, mesh_shape=(1, 1, 1)):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  data = pipeline.make_dataset(config, "train")
  example = loop.global_batch([data[0][0]], mesh)
  return TrainSetup.create(config, mesh, example,
                           image_slots=pipeline.image_slots_per_row(config.data)), data, mesh


def adam_first_moments(opt_state):
  """`{param path: Adam's first moment}` from the optimizer state."""
  moments = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if any(getattr(entry, "name", None) == "mu" for entry in path):
      keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
      moments["/".join(keys[1:])] = np.asarray(leaf)
  return moments


def leaves(tree):
  """`{key path: host array}` of any pytree."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def flat(tree):
  return {"/".join(path): np.asarray(leaf)
          for path, leaf in traverse_util.flatten_dict(jax.device_get(tree)).items()}


# --------------------------------------------------------------------------------------------
# The release's trainable set on the whole model (image decoder included).


WHOLE_MODEL_GROUP = pytest.mark.xdist_group("whole_model")


@functools.lru_cache(maxsize=None)
def two_whole_model_steps():
  """The demo-sized model with exactly the release's trainable set and groups (SPEC 9), after
  2 steps: `(config, setup, params before, state, last metrics)`."""
  config = small_config()
  config.train.unfreeze = ()
  config.train.param_groups = tiny.get_config().train.param_groups
  setup, data, mesh = setup_for(config)
  # Random values in place of the initialisers (`init_state`): what trains and what stays
  # frozen does not depend on them, and on CPUs the whole model's initialisers run op by op
  # for minutes. The text-only tests and the training commands start from `init_state`.
  state = setup.state_from_params(random_params(setup.abstract_params), jax.random.key(0))
  before = flat(state.all_params())
  step = None
  for index in range(2):
    batch = loop.global_batch([data[index][0]], mesh)
    step = step or compile_train_step(setup, batch)
    state, metrics = step(state, batch)
  return config, setup, before, state, metrics


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


@WHOLE_MODEL_GROUP
def test_the_picture_evaluation_scores_the_pictures_its_grid_shows(tmp_path):
  """The held-out picture evaluation: its grid holds (real, VAE reconstruction, generated)
  for each caption, its two colour accuracies are those of the grid's pictures, and the
  generated pictures depend on the rng and the reconstructions do not. Its programs are
  compiled ahead of time on a background thread, as the training command does."""
  config, setup, _, state, _ = two_whole_model_steps()
  config = config.copy_and_resolve_references()
  config.eval.update(caption_documents=0, generation_documents=4, generation_steps=2)
  evaluator = Evaluator(config, setup.model, setup.mesh)
  params = state.all_params()
  evaluator.compile_ahead(params, background.Worker())
  results = evaluator(params, jax.random.key(7), step=2, workdir=str(tmp_path))
  grid = np.asarray(Image.open(results["picture_grid"]))
  size, pad = config.model.image_decoder.image_size, 2
  assert grid.shape == (size + 2 * pad, 12 * (size + pad) + pad, 3)
  tiles = [grid[pad:pad + size, pad + i * (size + pad):pad + i * (size + pad) + size]
           for i in range(12)]
  scenes = evaluator.generation_scenes
  assert results["picture_captions"] == [shapes.caption_of(scene) for scene in scenes]
  for index, scene in enumerate(scenes):
    np.testing.assert_array_equal(tiles[3 * index], shapes.render(scene, size))
  for key, column in (("reconstruction_colour_accuracy", 1), ("picture_colour_accuracy", 2)):
    hits = [shapes.classify_colour(tiles[3 * i + column], scene.background) == scene.colour
            for i, scene in enumerate(scenes)]
    assert results[key] == float(np.mean(hits)), key
  _, again = evaluator.pictures(params, jax.random.key(7))
  _, other = evaluator.pictures(params, jax.random.key(8))
  np.testing.assert_array_equal(again, grid)
  other_tiles = [other[pad:pad + size, pad + i * (size + pad):pad + i * (size + pad) + size]
                 for i in range(12)]
  for index in range(4):
    np.testing.assert_array_equal(other_tiles[3 * index + 1], tiles[3 * index + 1])
    assert not np.array_equal(other_tiles[3 * index + 2], tiles[3 * index + 2])


# --------------------------------------------------------------------------------------------
# The text-only model: sharding, accumulation, checkpoints across meshes.


@functools.lru_cache(maxsize=None)
def text_only_params():
  config = small_config("text_only")
  setup, _, _ = setup_for(config)
  return jax.device_get(setup.init_params(jax.random.key(1)))


@functools.lru_cache(maxsize=None)
def run_steps(mesh_shape, steps=3):
  """`steps` steps of the text-only model on a mesh, from `text_only_params`."""
  config = small_config("text_only")
  setup, data, mesh = setup_for(config, mesh_shape)
  state = setup.state_from_params(text_only_params(), jax.random.key(2))
  step, losses = None, []
  for index in range(steps):
    batch = loop.global_batch([data[index][0]], mesh)
    step = step or compile_train_step(setup, batch)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return setup, state, losses


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
  from mmi_jax.train.train_step import loss_and_grads  # noqa: PLC0415

  accumulate = jax.jit(functools.partial(loss_and_grads, setup, accumulation=2))
  first, second = data[0][0], data[1][0]
  both_metrics, both = accumulate(state, loop.global_batch([first, second], mesh))
  first_metrics, first_grads = accumulate(state, loop.global_batch([first, first], mesh))
  second_metrics, second_grads = accumulate(state, loop.global_batch([second, second], mesh))
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
    metrics, _ = accumulate(state.replace(params=params), loop.global_batch([first, first], mesh))
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
  restored = checkpoints_lib.Checkpoints(tmp_path, config).restore(other, fresh_iterator)
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


@TEXT_ONLY_GROUP
def test_the_vision_fit_trains_the_encoder_to_name_the_attributes():
  """`train.vision_fit` (the demo's stand-in for CLIP's pretraining) changes only the
  encoder, and its classifiers learn: on one repeated batch the loss falls."""
  config = small_config("text_only")
  config.train.vision_fit.update(steps=8, batch_size=6, learning_rate=3e-3)
  pictures, labels = next(vision_fit.training_pictures(config, 6))
  assert pictures.shape == (6, 56, 56, 3) and 0.0 <= pictures.min() < pictures.max() <= 1.0
  assert labels.shape == (6, 3) and (labels < [4, 6, 3]).all()
  before = text_only_params()["visual_tokenizer"]
  logged = []
  fitted, stats = vision_fit.fit_vision_encoder(config, before, jax.random.key(3),
                                                log=logged.append)
  assert "vision fit 1/8" in logged[0] and "vision fit 8/8" in logged[-1]
  first_loss = float(logged[0].split("loss ")[1].split(",")[0])
  assert stats["vision_fit_loss"] < first_loss
  assert set(stats) == {"vision_fit_loss", "vision_fit_shape_accuracy",
                        "vision_fit_colour_accuracy", "vision_fit_background_accuracy"}
  want, got = flat(before), flat(fitted)
  assert want.keys() == got.keys()
  moved = [path for path in want if not np.array_equal(want[path], got[path])]
  assert moved and all(path.startswith("encoder/") for path in moved)
  assert "encoder/encoder/layers_0/mlp/fc1/kernel" in moved


def test_the_vae_fit_reconstructs_the_pictures_better_and_changes_only_the_vae():
  """`train.vae_fit` (the demo's stand-in for SD's pretrained VAE): the pictures are the
  training documents' at the decoder's size, the reconstruction error falls, the result is
  float32 and deterministic, and the fitted VAE keeps its structure."""
  config = demo.get_config()
  config.train.vae_fit.update(steps=12, batch_size=4, learning_rate=4e-3, schedule="constant")
  size = config.model.image_decoder.image_size
  pictures = next(vae_fit.training_pictures(config, 4))
  assert pictures.shape == (4, size, size, 3) and 0.0 <= pictures.min() < pictures.max() <= 1.0
  vae = AutoencoderKL(VAEConfig.from_config(config.model.image_decoder.vae))
  before = nn.meta.unbox(vae.init(jax.random.key(0), pictures[:1])["params"])
  logged = []
  fitted, stats = vae_fit.fit_vae(config, before, jax.random.key(1), log=logged.append)
  assert "vae fit 1/12" in logged[0] and "vae fit 12/12" in logged[-1]
  assert all(line.endswith("learning rate 4.00e-03") for line in logged)
  first_error = float(logged[0].split("reconstruction error ")[1].split(",")[0])
  assert stats["vae_reconstruction_error"] < 0.8 * first_error
  want, got = flat(before), flat(fitted)
  assert want.keys() == got.keys()
  assert all(leaf.dtype == np.float32 and leaf.shape == want[path].shape
             for path, leaf in got.items())
  assert not np.array_equal(got["decoder/conv_out/kernel"], want["decoder/conv_out/kernel"])
  again, _ = vae_fit.fit_vae(config, before, jax.random.key(1), log=lambda message: None)
  for path, leaf in flat(again).items():
    np.testing.assert_array_equal(leaf, got[path], err_msg=path)


def test_the_fit_schedules():
  """"constant" keeps the rate; "cosine" warms up linearly, peaks at `warmup_steps` and ends
  at 2% of the rate; anything else is refused, naming the settings."""
  fit = ml_collections.ConfigDict(dict(steps=100, learning_rate=1e-3, schedule="constant",
                                       warmup_steps=10))
  schedule = fit_schedule.learning_rate_schedule(fit, "train.vae_fit")
  assert [float(schedule(i)) for i in (0, 50, 100)] == [1e-3] * 3
  fit.schedule = "cosine"
  cosine = fit_schedule.learning_rate_schedule(fit, "train.vae_fit")
  np.testing.assert_allclose([float(cosine(i)) for i in (0, 5, 10, 55, 100)],
                             [0.0, 5e-4, 1e-3, 0.51e-3, 2e-5], rtol=1e-5)
  fit.schedule = "linear"
  with pytest.raises(ValueError, match="train.vae_fit.schedule must be one of .*'linear'"):
    fit_schedule.learning_rate_schedule(fit, "train.vae_fit")


def test_the_decoder_fits_follow_their_schedule_and_refuse_an_unknown_one_at_once(tmp_path):
  """The decoder fit steps at its schedule's rate (a cosine warm-up's first step has rate 0
  and leaves the params as they were); a schedule that does not exist stops the training
  command before it builds anything, naming the fit."""
  config = demo.get_config()
  config.train.decoder_fit.update(steps=1, batch_size=2, learning_rate=3e-3, schedule="cosine",
                                  warmup_steps=1)
  pictures, ids, mask = next(decoder_fit.training_pairs(config, 2))
  context = np.zeros((2, ids.shape[1], config.model.llm.hidden_size), np.float32)
  decoder = nn.meta.unbox(build_image_decoder(config).init(
      jax.random.key(0), pictures, context, mask, None, None, rng=jax.random.key(1))["params"])
  fitted, _ = decoder_fit.fit_decoder(config, {"image_decoder": decoder}, jax.random.key(2),
                                      log=lambda message: None)
  for path, leaf in flat(decoder).items():
    np.testing.assert_array_equal(flat(fitted["image_decoder"])[path], leaf, err_msg=path)
  for name in ("vae_fit", "decoder_fit", "decoder_fit_after_training"):
    bad = demo.get_config()
    bad.train[name].schedule = "linear"
    with pytest.raises(ValueError, match=f"train.{name}.schedule must be one of .*'linear'"):
      loop.train_and_evaluate(bad, str(tmp_path / name), log=lambda message: None)
    assert not (tmp_path / name).exists()


def test_the_decoder_fit_learns_to_draw_captions_and_changes_only_its_params():
  """`train.decoder_fit` (the demo's stand-in for SD's pretrained UNet): each training picture
  comes with the context of its own caption (soi, the caption reversed, `<s>`; a longer one
  than the context is refused), the noise-prediction error falls, and only the Q-Former,
  `neg_prompt_embeds` and the UNet change, in float32 and in the same structure."""
  config = demo.get_config()
  # The fit's mechanics, on the noise's error, which 6 steps surely lower (v's may not yet).
  config.model.image_decoder.noise_schedule.prediction_type = "epsilon"
  config.train.decoder_fit.update(steps=6, batch_size=4, learning_rate=3e-3,
                                  context="stand_in", schedule="constant")
  tokens, size = config.model.tokens, config.model.image_decoder.image_size
  pictures, ids, mask = next(decoder_fit.training_pairs(config, 4))
  assert pictures.shape == (4, size, size, 3) and 0.0 <= pictures.min() < pictures.max() <= 1.0
  assert ids.shape == mask.shape == (4, config.model.image_decoder.max_context_length)
  scenes = next(pipeline.training_scene_batches(config, 4))
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  for scene, picture, row, row_mask in zip(scenes, pictures, ids, mask):
    np.testing.assert_array_equal(picture, shapes.render(scene, size) / np.float32(255))
    real = row[row_mask == 1]
    assert real[0] == tokens.soi_id and real[-1] == tokens.bos_id
    assert words.decode(real[1:-1][::-1]) == shapes.caption_of(scene)
    assert (row[len(real):] == tokens.pad_id).all() and (row_mask[len(real):] == 0).all()
  short = config.copy_and_resolve_references()
  short.model.image_decoder.max_context_length = 4
  with pytest.raises(ValueError, match="more than image_decoder.max_context_length 4"):
    next(decoder_fit.training_pairs(short, 4))

  model = build_image_decoder(config)
  before = nn.meta.unbox(model.init(
      jax.random.key(0), pictures, np.zeros((4, ids.shape[1], config.model.llm.hidden_size),
                                            np.float32), mask, None, None,
      rng=jax.random.key(1))["params"])
  logged = []
  fitted, stats = decoder_fit.fit_decoder(config, {"image_decoder": before}, jax.random.key(2),
                                          log=logged.append)
  assert "decoder fit 1/6" in logged[0] and "decoder fit 6/6" in logged[-1]
  first_error = float(logged[0].split("error ")[1])
  assert stats["decoder_fit_error"] < 0.9 * first_error
  assert fitted.keys() == {"image_decoder"}
  moved = check_fitted_decoder(before, fitted["image_decoder"])
  assert any(path.startswith("perceiver_resampler/") for path in moved)


def check_fitted_decoder(before, after):
  """Same structure, float32; only the Q-Former, `neg_prompt_embeds` and the UNet moved.
  Returns the moved paths."""
  want, got = flat(before), flat(after)
  assert want.keys() == got.keys()
  assert all(leaf.dtype == np.float32 and leaf.shape == want[path].shape
             for path, leaf in got.items())
  moved = {path for path in want if not np.array_equal(want[path], got[path])}
  assert moved and all(path.startswith(("perceiver_resampler/", "neg_prompt_embeds",
                                        "decoder/unet/")) for path in moved)
  assert {"neg_prompt_embeds", "decoder/unet/conv_in/kernel",
          "decoder/unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel",
          } <= moved
  return moved


def test_contexts_in_reading_order_are_the_model_s_documents():
  """`forward_order` turns the decoder's contexts (soi first) back into `<s> caption soi`."""
  config = demo.get_config()
  tokens = config.model.tokens
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  _, ids, mask = next(decoder_fit.training_pairs(config, 4))
  forward = np.asarray(decoder_fit.forward_order(ids, mask))
  for scene, row, row_mask in zip(next(pipeline.training_scene_batches(config, 4)), forward,
                                  mask):
    real = row[row_mask == 1]
    assert real[0] == tokens.bos_id and real[-1] == tokens.soi_id
    assert words.decode(real[1:-1]) == shapes.caption_of(scene)
    assert (row[len(real):] == tokens.pad_id).all()


@TEXT_ONLY_GROUP
def test_the_llm_fit_learns_the_documents_text_and_changes_only_the_language_model():
  """`train.llm_fit` (the demo's stand-in for Vicuna): rows are training documents' ids
  without `<|image|>` ids (a soi where each picture was), the text loss falls, and only the
  language model's params change."""
  config = small_config("text_only")
  config.train.llm_fit.update(steps=8, batch_size=4, learning_rate=3e-3)
  tokens = config.model.tokens
  ids, mask = next(llm_fit.training_text(config, 4))
  assert ids.shape == mask.shape == (4, config.data.sequence_length)
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  layout = pipeline.document_layout(config.data)
  for index, (row, row_mask) in enumerate(zip(ids, mask)):
    document = shapes.make_document("train", index, seed=config.data.seed, **layout)
    real = row[row_mask == 1]
    assert real[0] == tokens.bos_id and real[-1] == tokens.eos_id
    assert tokens.image_id not in real and (real == tokens.soi_id).sum() == len(document.scenes)
    sentences = [segment for segment in document.segments if isinstance(segment, str)]
    assert words.decode(real[real != tokens.soi_id][1:-1]) == " ".join(sentences)
  short = config.copy_and_resolve_references()
  short.data.sequence_length = 4
  with pytest.raises(ValueError, match="more than data.sequence_length 4"):
    next(llm_fit.training_text(short, 4))

  before = text_only_params()
  logged = []
  fitted, stats = llm_fit.fit_llm(config, before, jax.random.key(0), log=logged.append)
  assert "llm fit 1/8" in logged[0] and "llm fit 8/8" in logged[-1]
  assert stats["llm_fit_text_loss"] < 0.9 * float(logged[0].split("loss ")[1])
  want, got = flat(before), flat(fitted)
  assert want.keys() == got.keys()
  moved = {path for path in want if not np.array_equal(want[path], got[path])}
  assert moved and all(path.startswith(llm_fit.LANGUAGE_PARAMS) for path in moved)
  assert any(path.startswith("mm_decoder/") for path in moved)
  assert any(path.startswith("text_decoder/") for path in moved)


@TEXT_ONLY_GROUP
def test_the_decoder_fit_reading_the_llm_fits_context_feat_proj_and_keeps_the_llm():
  """`train.decoder_fit.context = "llm"`: the frozen LLM's states through
  `context_feat_proj`, which is fitted with the Q-Former and the UNet; the LLM stays."""
  config = demo.get_config()
  config.model.llm.num_layers = LLM_LAYERS
  config.model.image_decoder.noise_schedule.prediction_type = "epsilon"  # as above
  config.train.decoder_fit.update(steps=6, batch_size=4, learning_rate=3e-3, context="llm",
                                  schedule="constant")
  pictures, ids, mask = next(decoder_fit.training_pairs(config, 4))
  width = config.model.llm.hidden_size
  decoder = nn.meta.unbox(build_image_decoder(config).init(
      jax.random.key(0), pictures, np.zeros((4, ids.shape[1], width), np.float32), mask, None,
      None, rng=jax.random.key(1))["params"])
  projection = nn.meta.unbox(
      Linear(width).init(jax.random.key(3), np.zeros((1, width)))["params"])
  before = dict(text_only_params(), image_decoder=decoder, context_feat_proj=projection)
  logged = []
  fitted, stats = decoder_fit.fit_decoder(config, before, jax.random.key(2), log=logged.append)
  assert stats["decoder_fit_error"] < 0.9 * float(logged[0].split("error ")[1])
  assert fitted.keys() == before.keys()
  check_fitted_decoder(decoder, fitted["image_decoder"])
  language = {name: before[name] for name in llm_fit.LANGUAGE_PARAMS}
  for path, leaf in flat(language).items():
    np.testing.assert_array_equal(flat({name: fitted[name] for name in language})[path], leaf,
                                  err_msg=path)
  assert all(not np.array_equal(flat(fitted["context_feat_proj"])[path], leaf)
             for path, leaf in flat(projection).items())
  bad = config.copy_and_resolve_references()
  bad.train.decoder_fit.context = "clip"
  with pytest.raises(ValueError, match="train.decoder_fit.context must be one of"):
    decoder_fit.fit_decoder(bad, before, jax.random.key(2))


@WHOLE_MODEL_GROUP
def test_the_decoder_fit_after_training_changes_only_the_decoder_path_of_the_state():
  """`train.decoder_fit_after_training` (`loop.fit_decoder_after_training`): the state's image
  decoder (Q-Former, `neg_prompt_embeds`, UNet) and `context_feat_proj` are fitted through its
  LLM; everything else, the optimizer state and the step stay, dtypes and placements too."""
  config, setup, _, state, _ = two_whole_model_steps()
  config = config.copy_and_resolve_references()
  config.train.decoder_fit_after_training.update(steps=3, batch_size=4, learning_rate=3e-3,
                                                 schedule="constant")
  logged = []
  fitted = loop.fit_decoder_after_training(setup, config, state, jax.random.key(4),
                                           logged.append)
  assert "decoder fit 3/3" in logged[-2] and "image decoder fitted after training" in logged[-1]
  assert int(fitted.step) == int(state.step)
  assert fitted.opt_state is state.opt_state
  want, got = flat(state.all_params()), flat(fitted.all_params())
  assert want.keys() == got.keys()
  moved = {path for path in want if not np.array_equal(want[path], got[path])}
  assert moved and all(path.startswith(("image_decoder/perceiver_resampler/",
                                        "image_decoder/neg_prompt_embeds",
                                        "image_decoder/decoder/unet/", "context_feat_proj/"))
                       for path in moved)
  assert {"image_decoder/neg_prompt_embeds", "image_decoder/decoder/unet/conv_in/kernel",
          "context_feat_proj/kernel"} <= moved
  for before, after in ((state.params, fitted.params), (state.frozen, fitted.frozen)):
    for path, leaf in leaves(before).items():
      assert leaves(after)[path].dtype == leaf.dtype, path
    assert jax.tree.map(lambda x: x.sharding, before) == jax.tree.map(lambda x: x.sharding,
                                                                       after)


def test_the_decoder_fit_after_training_reads_the_llm_with_its_own_steps_and_rates():
  config = demo.get_config()
  config.train.decoder_fit.update(steps=7, batch_size=5, learning_rate=1.0, context="stand_in")
  config.train.decoder_fit_after_training.update(steps=3, batch_size=4, learning_rate=2e-3)
  settings = decoder_fit.after_training_settings(config)
  assert (settings.steps, settings.batch_size, settings.learning_rate, settings.context) == (
      3, 4, 2e-3, "llm")
  assert config.train.decoder_fit.context == "stand_in"


def build_image_decoder(config):
  return ImageDecoder(ImageDecoderConfig.from_config(config.model))


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
    config_check.check_known_keys(config)
  config_check.check_known_keys(small_config())
  config_check.check_known_keys(small_config("text_only"))


def test_a_batch_whose_image_tokens_disagree_with_its_images_is_refused():
  config = small_config("text_only")
  batch, _ = pipeline.make_dataset(config, "train")[0]
  loop.check_batch(batch, config)
  # One picture too few: the row's soi tokens announce more images than it owns.
  row = int(batch.image_sequence_ids[0])
  valid = batch.image_valid.copy()
  valid[np.flatnonzero(valid & (batch.image_sequence_ids == row))[-1]] = False
  with pytest.raises(ValueError, match=f"row {row}: .* soi tokens but .* images"):
    loop.check_batch(batch.replace(image_valid=valid), config)


def test_decoded_captions_stop_at_the_end_of_text_or_a_new_image():
  from mmi_jax.data.tokenizer import shapes_tokenizer  # noqa: PLC0415
  from mmi_jax.models.multimodal_inputs import TokenIds  # noqa: PLC0415
  from mmi_jax.train.evaluation import caption_words  # noqa: PLC0415

  config = small_config("text_only")
  tokens = TokenIds.from_config(config.model.tokens)
  tokenizer = shapes_tokenizer(config.model.tokens.text_vocab_size)
  words = tokenizer.encode("a red circle on a white background .")
  for stop in (tokens.eos, tokens.soi):
    ids = np.array(words + [stop] + tokenizer.encode("the same shape"))
    assert caption_words(ids, tokenizer, tokens) == "a red circle on a white background ."
