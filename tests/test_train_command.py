"""`python -m mmi_jax.train` end to end, in subprocesses (the text-only demo model, so that a run
compiles in about a minute): a run stopped by SIGTERM and resumed gives the losses of an
uninterrupted run, and two processes of 4 CPU devices each (`jax.distributed` on localhost)
train one model, save and restore its checkpoint, and compute what one process computes.

The runs share a persistent compilation cache, so only the first compiles.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smaller LLM of test_train.py's text-only tests.
COMMON = ["--config.model.llm.num_layers=2", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
          "--config.eval.caption_documents=0", "--config.data.batch_size=4",
          "--config.train.warmup_steps=1", "--config.train.vision_fit.steps=0"]
# Both tests need `straight_run`: on one pytest-xdist worker (`--dist loadgroup`) it runs once.
pytestmark = pytest.mark.xdist_group("train_command")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("compilation_cache"))


def environment(cache_dir: str, devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def command(workdir, steps: int, *extra: str) -> list[str]:
  return [sys.executable, "-m", "mmi_jax.train",
          f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:text_only",
          f"--workdir={workdir}", f"--config.train.steps={steps}", *COMMON, *extra]


def run(workdir, steps, cache_dir, *extra, devices=1) -> str:
  done = subprocess.run(command(workdir, steps, *extra), cwd=ROOT, capture_output=True,
                        text=True, env=environment(cache_dir, devices), timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout


def train_losses(workdir) -> dict[int, float]:
  """The last logged loss of each step (a resumed run appends to the same file)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  losses = {}
  with open(path) as file:
    for line in file:
      if not line.strip():
        continue
      record = json.loads(line)
      if record["split"] == "train":
        losses[record["step"]] = record["loss"]
  return losses


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
  """6 steps, then the held-out caption evaluation (2 captions of 3 tokens: the code path,
  not the accuracy of a model this short-trained)."""
  workdir = tmp_path_factory.mktemp("straight")
  run(workdir, 6, cache_dir, "--config.eval.caption_documents=2",
      "--config.eval.max_caption_tokens=3")
  with open(workdir / "results.json") as file:
    results = json.load(file)
  assert results["step"] == 6 and results["skipped_documents"] == 0
  assert 0.0 <= results["caption_accuracy"] <= 1.0 and len(results["examples"]) == 2
  assert results["examples"][0]["expected"].endswith("background .")
  return train_losses(workdir)


def test_sigterm_then_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, cache_dir,
                                                                       straight_run):
  assert sorted(straight_run) == [1, 2, 3, 4, 5, 6]
  process = subprocess.Popen(command(tmp_path, 6), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=environment(cache_dir, 1))
  deadline = time.monotonic() + 600
  while not any(step >= 2 for step in train_losses(tmp_path)):
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, "no step 2 within 10 minutes"
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
  assert "SIGTERM: saved step" in stdout
  stopped = int(stdout.split("SIGTERM: saved step")[1].split()[0])
  assert 2 <= stopped < 6, stdout
  assert str(stopped) in os.listdir(tmp_path / "checkpoints")

  resumed = run(tmp_path, 6, cache_dir)
  assert f"resumed from {tmp_path / 'checkpoints'} at step {stopped}" in resumed
  losses = train_losses(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                             [straight_run[s] for s in range(1, 7)], rtol=1e-6)


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_two_processes_train_save_and_restore_like_one(tmp_path, cache_dir, straight_run):
  def launch(steps):
    port = free_port()
    processes = []
    for index in range(2):
      extra = ("--config.distributed.initialize=True",
               f"--config.distributed.coordinator_address=localhost:{port}",
               "--config.distributed.num_processes=2",
               f"--config.distributed.process_id={index}", "--config.mesh.data=2",
               "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
      processes.append(subprocess.Popen(
          command(tmp_path, steps, *extra), cwd=ROOT, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True, env=environment(cache_dir, 4)))
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
      assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return outputs[0][0]

  first = launch(2)
  assert "2 process(es), mesh {'data': 2, 'fsdp': 2, 'tensor': 2}, 8 cpu device(s)" in first
  assert "2" in os.listdir(tmp_path / "checkpoints")
  second = launch(3)
  assert f"resumed from {tmp_path / 'checkpoints'} at step 2" in second
  losses = train_losses(tmp_path)
  assert sorted(losses) == [1, 2, 3]
  # The same data, init and steps as the one-process run, on another mesh.
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)],
                             [straight_run[s] for s in (1, 2, 3)], rtol=1e-5)
