"""A training extension that records which extension points the loop calls, and when; and that
can be stopped at one of them, for the tests of what a job does then.

`RecordedCalls` (`config.train.extensions`) appends one JSON line per call to
`workdir/extension_calls.jsonl` (process 0): the point's name and the step it sees. With the
environment variable `MMI_JAX_TEST_STOP_IN=point:SIGNAL` (`after_training:SIGINT`,
`evaluate:SIGTERM`), at that point the process writes the time to `workdir/stop_signalled_at`
and sends itself the signal, then works on as a long phase does, checking `run.preemption`
every tenth of a second, for at most 30 s (it raises if the stop goes unnoticed).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax

from mmi_jax.train.extensions import Extension, Run
from mmi_jax.train.train_state import TrainState

NAME = "recording_extension.RecordedCalls"
FILE = "extension_calls.jsonl"
STOP_VARIABLE = "MMI_JAX_TEST_STOP_IN"  # "point:SIGNAL": a stop asked for during that point
SIGNALLED_FILE = "stop_signalled_at"  # when the stop was asked for (`time.time()`)


class RecordedCalls(Extension):

  def _record(self, run: Run, point: str, step: int | None = None) -> None:
    if jax.process_index() == 0:
      with open(os.path.join(run.workdir, FILE), "a") as file:
        file.write(json.dumps({"point": point, "step": step}) + "\n")
    stop_point, _, signal_name = os.environ.get(STOP_VARIABLE, "").partition(":")
    if stop_point == point:
      with open(os.path.join(run.workdir, SIGNALLED_FILE), "w") as file:
        file.write(str(time.time()))
      os.kill(os.getpid(), signal.Signals[signal_name])
      for _ in range(300):
        run.preemption.check(f"the recording extension's {point}")
        time.sleep(0.1)
      raise RuntimeError(f"{signal_name} during {point} went unnoticed for 30 s")

  def compile_ahead(self, run: Run) -> None:
    self._record(run, "compile_ahead")

  def prepare_params(self, run: Run, params: Any) -> Any:
    self._record(run, "prepare_params")
    return params

  def after_training(self, run: Run, state: TrainState) -> TrainState:
    self._record(run, "after_training", int(state.step))
    return state

  def evaluate(self, run: Run, params: Any, step: int) -> dict[str, Any]:
    self._record(run, "evaluate", step)
    return {"recorded_evaluations": 1.0}


def recorded_calls(workdir) -> list[tuple[str, int | None]]:
  """`(point, step)` of every recorded call, in order."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return []
  with open(path) as file:
    return [(entry["point"], entry["step"]) for entry in map(json.loads, file)]
