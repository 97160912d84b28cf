"""The model params of a training run's checkpoint, for conversion.

`python -m mmi_jax.train` saves step s of a run in `WORKDIR/checkpoints/s/` with Orbax; its
item `state` is the `TrainState`, whose `params` (the trained params) and `frozen` (the
others) together are the model's params (`mmi_jax.train.checkpoints`). Only those two are
read, onto the host; the optimizer state, twice the params' size, is not. When the run's
extensions changed the params after its last step (`after_training`), the state they left is
in `WORKDIR/after_training/s/`, and that one is read for step s.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmi_jax import integrity
from mmi_jax.command_line import error_summary
from mmi_jax.trainable import merge_params

PARAM_ITEMS = ("params", "frozen")


def is_training_run(path: str) -> bool:
  """Whether `path` is a training workdir (it has a `checkpoints` directory)."""
  return os.path.isdir(os.path.join(path, "checkpoints"))


def saved_steps(workdir: str) -> list[int]:
  """The steps whose checkpoint is complete (Orbax writes a step under a temporary name and
  renames it when done), ascending."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state")))


def read_params(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """`(step, params)`: the model's params (numpy, nested dicts as `model.init` makes them) of
  the checkpoint of `step` (None: the latest) of the run in `workdir`. ValueError naming the
  saved steps when `step` has no checkpoint."""
  steps = saved_steps(workdir)
  if not steps:
    raise ValueError(f"{workdir}: no complete checkpoint in {workdir}/checkpoints")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"{workdir}: no checkpoint of step {step}; saved steps: {steps}")
  path = os.path.join(workdir, "after_training", str(step), "state")
  if not os.path.isdir(path):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(path).item_metadata.tree
  wanted = {item: saved[item] for item in PARAM_ITEMS}
  try:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
        partial_restore=True))
  except Exception as error:  # noqa: BLE001 (a file of the checkpoint cannot be read)
    raise ValueError(f"{os.path.dirname(path)} cannot be read: {error_summary(error)}"
                     ) from error
  _verify(restored, os.path.dirname(path))
  return step, merge_params(restored["params"], restored["frozen"])


def _verify(restored: dict[str, Any], step_directory: str) -> None:
  """Compares the digests of the params read with those the run recorded when it saved them
  (its item `integrity`, `mmi_jax.integrity`; a checkpoint from before the digests has none);
  ValueError naming the arrays that differ or hold NaN or inf."""
  record_path = os.path.join(step_directory, "integrity")
  if not os.path.isdir(record_path):
    return
  saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(record_path)["state"]
  recorded = {path: digest for path, digest in saved.items()
              if path.startswith(tuple(f".{item}[" for item in PARAM_ITEMS))}
  found, nonfinite = integrity.array_digests(restored)
  # The dict read has paths `['params'][...]`; the train state recorded `.params[...]`.
  found = {re.sub(r"^\['(\w+)'\]", r".\1", path): digest for path, digest in found.items()}
  problems = integrity.differences(recorded, found)
  problems += [f"{path}: {count} NaN or inf" for path, count in nonfinite.items()]
  if problems:
    raise ValueError(f"{step_directory} is not what the run saved: " + "; ".join(problems[:5]) +
                     (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


__all__ = ["is_training_run", "read_params", "saved_steps"]
