"""`python -m mmi_jax.train` end to end, in subprocesses (the text-only demo model, so that a run
compiles in about a minute): the loop calls each extension point when it should
(`recording_extension`); and two processes of 4 CPU devices each (`jax.distributed` on
localhost, mesh data 2 x fsdp 2 x tensor 2) train the model as one process on one device does,
stop together when one of them gets a SIGTERM, and resume from that checkpoint to end with the
uninterrupted process's losses and params.

The runs use the session's persistent compilation cache (tests/conftest.py): the one-process
run reuses the programs of the tests before it, and process 0 of the two-process runs' second
launch those of the first (JAX writes entries from process 0 only, and a multi-process
program's key differs between processes, so process 1 compiles its programs in both).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import demo
from mmi_jax import command_line, sharding
from mmi_jax.data import pipeline
from mmi_jax.train import __main__ as train_command
from mmi_jax.train import checkpoints
from mmi_jax.train.batches import global_batch
from mmi_jax.train.train_state import TrainSetup
import recording_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every run's settings (the smaller LLM of test_train.py's text-only tests).
OVERRIDES = {"model.llm.num_layers": 2, "train.log_every": 1, "train.checkpoint_every": 2,
             "train.eval_every": 0, "shapes_eval.caption_documents": 0, "data.batch_size": 4,
             "train.warmup_steps": 1, "stand_ins.vision_fit.steps": 0,
             "train.extensions": demo.EXTENSIONS + (recording_extension.NAME,)}
COMMON = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
# The longest group of the suite: handed out first (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("train_command")


@pytest.fixture(scope="module")
def cache_dir():
  """The session's compilation cache (tests/conftest.py)."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


def environment(cache_dir: str, devices: int) -> dict[str, str]:
  """The session's XLA_FLAGS (tests/conftest.py) with `devices` CPU devices."""
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count=")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS=" ".join(flags),
              PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def command(workdir, steps: int, *extra: str) -> list[str]:
  return [sys.executable, "-m", "mmi_jax.train",
          f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:text_only",
          f"--workdir={workdir}", f"--config.train.steps={steps}", *COMMON, *extra]


def run(workdir, steps, cache_dir, *extra, devices=1) -> str:
  done = subprocess.run(command(workdir, steps, *extra), cwd=ROOT, capture_output=True,
                        text=True, env=environment(cache_dir, devices), timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout


def train_records(workdir) -> list[dict]:
  """The training log lines of `metrics.jsonl` (a resumed run appends to the same file)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as file:
    records = [json.loads(line) for line in file if line.strip()]
  return [record for record in records if record["split"] == "train"]


def train_losses(workdir) -> dict[int, float]:
  """The last logged loss of each step."""
  return {record["step"]: record["loss"] for record in train_records(workdir)}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
  """6 steps on one device, then the held-out caption evaluation (2 captions of 3 tokens: the
  code path, not the accuracy of a model this short-trained); `(workdir, {step: loss})`."""
  workdir = tmp_path_factory.mktemp("straight")
  run(workdir, 6, cache_dir, "--config.shapes_eval.caption_documents=2",
      "--config.shapes_eval.max_caption_tokens=3")
  with open(workdir / "results.json") as file:
    results = json.load(file)
  # The demo packs two documents a row when their pictures fit, else skips the second.
  skipped = train_records(workdir)[-1]["skipped_documents"]
  assert results["step"] == 6 and results["skipped_documents"] == skipped > 0
  assert 0.0 <= results["caption_accuracy"] <= 1.0 and len(results["examples"]) == 2
  assert results["examples"][0]["expected"].endswith("background .")
  # Each extension point once, in the loop's order; the evaluations' results merge.
  assert recording_extension.recorded_calls(workdir) == [
      ("compile_ahead", None), ("prepare_params", None), ("after_training", 6),
      ("evaluate", 6)]
  assert results["recorded_evaluations"] == 1.0
  return workdir, train_losses(workdir)


def test_evaluating_a_saved_step_leaves_the_run_as_it_was(straight_run, cache_dir, capsys):
  """`--mode=eval` evaluates the latest step (or `--step`) into `evaluations/step_N/`, with the
  draws of the run's own evaluation of that step, and changes nothing of the run."""
  workdir, _ = straight_run
  flags = ("--config.shapes_eval.caption_documents=2", "--config.shapes_eval.max_caption_tokens=3",
           "--mode=eval")

  def snapshot():
    return {(path, name): os.stat(os.path.join(path, name)).st_mtime_ns
            for path, _, names in os.walk(workdir) for name in names
            if "evaluations" not in path}

  before = snapshot()
  with open(workdir / "results.json") as file:
    trained = json.load(file)
  printed = run(workdir, 6, cache_dir, *flags)
  assert "evaluating step 6 of" in printed and "eval at step 6" in printed
  with open(workdir / "evaluations" / "step_6" / "results.json") as file:
    evaluated = json.load(file)
  assert evaluated["step"] == 6 and evaluated["examples"] == trained["examples"]
  assert evaluated["caption_accuracy"] == trained["caption_accuracy"]
  assert snapshot() == before
  # A step not saved: the command's message, in this process (it stops before building).
  saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints"))
  with pytest.raises(SystemExit, match="2"):
    command_line.run(train_command.main, command(workdir, 6, *flags, "--step=5")[2:],
                     train_command.PROGRAM)
  assert capsys.readouterr().err.strip().endswith(
      f"error: --step=5: {workdir / 'checkpoints'} holds steps {saved}")
  assert snapshot() == before


def saved_steps(workdir, name: str = "checkpoints") -> list[int]:
  directory = os.path.join(workdir, name)
  return sorted(int(entry) for entry in os.listdir(directory)
                if entry.isdigit()) if os.path.isdir(directory) else []


def test_a_run_killed_and_stopped_in_every_phase_ends_as_the_straight_run(
    tmp_path, cache_dir, straight_run):
  """One workdir through what ends jobs, each time resumed by the same command: kill -9 at
  random moments of training, twice; the newest checkpoint's largest file cut short (the run
  falls back to the step before it); Ctrl-C in the work after the last step (a second launch
  meanwhile is refused, naming the first); a SIGTERM in the evaluation. Each stop ends the
  process within 30 s with the saves committed, and the last launch ends with the straight
  run's losses, params (bit for bit) and results, skipped-document counts included. (A stop
  during the fits before training: test_demo.py's fit test and the one-process flag test in
  test_train.py; a SIGTERM during training: the two-process test below; an error's exit:
  test_train.py's background compiler test.)"""
  straight_workdir, straight_losses = straight_run
  # No captions decoded (their program's lowering is seconds a launch): the evaluation is the
  # test extension's, and the params are compared bit for bit.
  flags = ("--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2")

  def launch(**variables: str) -> subprocess.Popen:
    return subprocess.Popen(command(tmp_path, 6, *flags), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(environment(cache_dir, 1), **variables))

  def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr

  def seconds_since_the_stop() -> float:
    return time.time() - float((tmp_path / recording_extension.SIGNALLED_FILE).read_text())

  def wait_for(condition, process, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
      assert process.poll() is None, (what, *process.communicate())
      assert time.monotonic() < deadline, f"{what}: not within 5 minutes"
      time.sleep(0.05)

  stop = recording_extension.STOP_VARIABLE
  # kill -9 at a random moment after step 2, then after step 4 (during a step or a save).
  delays = []
  for after_step in (2, 4):
    process = launch()
    wait_for(lambda: len(train_records(tmp_path)) and train_records(tmp_path)[-1]["step"] >=
             after_step, process, f"step {after_step}")
    delays.append(random.uniform(0.0, 0.6))
    time.sleep(delays[-1])
    assert process.poll() is None, process.communicate()
    process.kill()
    process.wait()
  saved = saved_steps(tmp_path)
  assert len(saved) >= 2, (saved, delays)
  # The newest step's largest file cut short (a disk that filled, a copy that stopped).
  state_files = [os.path.join(root, name) for root, _, names in
                 os.walk(tmp_path / "checkpoints" / str(saved[-1]) / "state") for name in names]
  cut = max(state_files, key=os.path.getsize)
  os.truncate(cut, os.path.getsize(cut) // 2)

  # A save that never finished (the kills may have left one too) is removed at the start.
  stale = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1733000000000000"
  (stale / "state").mkdir(parents=True)

  # The rest of the training, and Ctrl-C in the work after the last step, once saved.
  process = launch(**{stop: "after_training:SIGINT"})
  lock = tmp_path / "run.lock"
  wait_for(lambda: lock.exists() and f"pid {process.pid} " in lock.read_text(), process,
           "the lock")
  second = subprocess.run(command(tmp_path, 6, *flags), cwd=ROOT, capture_output=True,
                          text=True, env=environment(cache_dir, 1), timeout=300)
  assert second.returncode == 2, second.stderr[-3000:]
  assert f"error: --workdir: {tmp_path} is in use by another run (pid {process.pid} on " in (
      second.stderr)
  code, stdout, stderr = finish(process)
  assert code == 0 and seconds_since_the_stop() < 30, stdout[-3000:] + stderr[-3000:]
  assert (f"checkpoint step {saved[-1]} is damaged and set aside: {tmp_path / 'checkpoints'}/"
          f"{saved[-1]} cannot be read: ") in stdout, stdout[-3000:]
  assert f"resumed from {tmp_path / 'checkpoints'} at step {saved[-2]}" in stdout
  assert os.listdir(tmp_path / "damaged_checkpoints") == [str(saved[-1])]
  assert (f"SIGINT: saved step 6 to {tmp_path / 'checkpoints'}; rerun to resume (stopped "
          "during the recording extension's after_training)") in stdout
  assert 6 in saved_steps(tmp_path) and saved_steps(tmp_path, "after_training") == []
  assert not [name for name in os.listdir(tmp_path / "checkpoints") if "tmp" in name]

  # A SIGTERM in the evaluation: the state after `after_training` was saved before it.
  code, stdout, stderr = finish(launch(**{stop: "evaluate:SIGTERM"}))
  assert code == 0 and seconds_since_the_stop() < 30, stdout[-3000:] + stderr[-3000:]
  assert "stopped during the recording extension's evaluate" in stdout
  assert os.listdir(tmp_path / "after_training") == ["6"]
  assert not (tmp_path / "results.json").exists()

  code, stdout, stderr = finish(launch())
  assert code == 0, stdout[-3000:] + stderr[-3000:]
  assert "compiling the train step" not in stdout  # nothing left to train
  # `after_training` is not run again once its result is saved.
  assert recording_extension.recorded_calls(tmp_path)[-7:] == [
      ("compile_ahead", None), ("after_training", 6),  # stopped in after_training
      ("compile_ahead", None), ("after_training", 6), ("evaluate", 6),  # stopped in evaluate
      ("compile_ahead", None), ("evaluate", 6)]
  assert train_losses(tmp_path) == straight_losses, delays
  with open(tmp_path / "results.json") as file, open(straight_workdir / "results.json") as want:
    results, straight = json.load(file), json.load(want)
  assert results == {key: straight[key] for key in ("step", "recorded_evaluations",
                                                    "skipped_documents", "skipped_by_reason")}
  config = straight_run_config()
  setup = one_device_setup(config)
  want = checkpoint_params(setup, config, straight_workdir, 6)
  got = checkpoint_params(setup, config, tmp_path, 6)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=f"{path} {delays}")


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_two_processes_stopped_by_sigterm_resume_like_one_uninterrupted_process(
    tmp_path, cache_dir, straight_run):
  """Two processes train as one process on one device; a SIGTERM to one of them (process 1)
  stops both at the same step, with a checkpoint; the same command again restores both
  processes' state and data positions and ends where the uninterrupted run ended."""
  def launch(stop_process_1: bool):
    port = free_port()
    processes = []
    for index in range(2):
      extra = ("--config.distributed.initialize=True",
               f"--config.distributed.coordinator_address=localhost:{port}",
               "--config.distributed.num_processes=2",
               f"--config.distributed.process_id={index}", "--config.mesh.data=2",
               "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
               # Saves at steps 1 and 3 (multi-process saves take seconds each).
               "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=4")
      processes.append(subprocess.Popen(
          command(tmp_path, 6, *extra), cwd=ROOT, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True, env=environment(cache_dir, 4)))
    if stop_process_1:
      deadline = time.monotonic() + 600
      while not any(step >= 2 for step in train_losses(tmp_path)):
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        assert time.monotonic() < deadline, "no step 2 within 10 minutes"
        time.sleep(0.2)
      processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
      assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return outputs[0][0]

  straight_workdir, straight_losses = straight_run
  assert sorted(straight_losses) == [1, 2, 3, 4, 5, 6]
  first = launch(stop_process_1=True)
  assert "2 process(es), mesh {'data': 2, 'fsdp': 2, 'tensor': 2}, 8 cpu device(s)" in first
  assert "SIGTERM: saved step" in first
  stopped = int(first.split("SIGTERM: saved step")[1].split()[0])
  assert 2 <= stopped < 6, first
  # Orbax saves the first step too; the stop adds its own.
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == sorted(
      {"1", str(stopped)} | ({"3"} if stopped >= 3 else set()), key=int)
  first_losses = train_losses(tmp_path)
  assert sorted(first_losses) == list(range(1, stopped + 1))
  # The same data, init and steps as the one-process run on one device.
  np.testing.assert_allclose([first_losses[s] for s in range(1, stopped + 1)],
                             [straight_losses[s] for s in range(1, stopped + 1)], rtol=1e-5)
  # A stopped job neither runs the work after the last step nor evaluates.
  assert recording_extension.recorded_calls(tmp_path) == [("compile_ahead", None),
                                                          ("prepare_params", None)]

  # The same command (process 0's programs come from the compilation cache).
  second = launch(stop_process_1=False)
  assert f"resumed from {tmp_path / 'checkpoints'} at step {stopped}" in second
  losses = train_losses(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                             [straight_losses[s] for s in range(1, 7)], rtol=1e-5)
  # A resumed job's params come from the checkpoint: no `prepare_params`.
  assert recording_extension.recorded_calls(tmp_path)[2:] == [
      ("compile_ahead", None), ("after_training", 6), ("evaluate", 6)]
  config = straight_run_config()
  setup = one_device_setup(config)
  want = checkpoint_params(setup, config, straight_workdir, 6)
  got = checkpoint_params(setup, config, tmp_path, 6)
  assert want.keys() == got.keys()
  # Relative to each param's size, plus a thousandth of one step of the learning rate for
  # params whose true gradient is zero and whose Adam steps are rounding noise (zero-initialised
  # biases the loss is invariant to, as the Q-Former's key-norm bias under the softmax: 1.2e-4
  # of a step apart after 6 steps). A sharding error would be of the order of one step.
  floor = 1e-3 * float(config.train.learning_rate)
  for path in want:
    scale = float(np.abs(want[path]).max())
    assert np.abs(got[path] - want[path]).max() <= 1e-5 * scale + floor, path


def straight_run_config():
  config = demo.get_config("text_only")
  config.update_from_flattened_dict(OVERRIDES)
  return config


def one_device_setup(config) -> TrainSetup:
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  example = pipeline.make_dataset(config, "train")[0][0]
  return TrainSetup.create(config, mesh, global_batch([example], mesh),
                           image_slots=pipeline.image_slots_per_row(config.data))


def checkpoint_params(setup, config, workdir, step: int) -> dict[str, np.ndarray]:
  """`{param path: array}` of `workdir`'s checkpoint of `step`, restored into `setup` (the
  train state only: the data iterator's position was saved per process)."""
  saved = checkpoints.Checkpoints(workdir, config)
  saved.check_architecture(step)
  state = saved.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(setup.abstract_state())))["state"]
  return {"/".join(path): np.asarray(leaf) for path, leaf in
          traverse_util.flatten_dict(jax.device_get(state.all_params())).items()}
