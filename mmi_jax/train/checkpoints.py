"""Training checkpoints with Orbax: the whole train state, the data iterator and the model.

A checkpoint of step s under `workdir/checkpoints/s/` holds three items:

  * `state`: the `TrainState` (trainable and frozen params, optimizer state, step, rng), each
    array written by the processes that hold its shards (`ocp.args.StandardSave`);
  * `data`: the training data iterator's position (grain's `CheckpointSave`, one file per
    process), so a resumed run reads the batches the uninterrupted run would have read;
  * `model`: `config.model` as JSON, to refuse a workdir that belongs to another model.

Saves are asynchronous (training continues while the arrays are written) every
`config.train.checkpoint_every` steps; the last `keep_checkpoints` are kept. Restoring reads
the arrays straight into the shardings of the current `TrainSetup`, so a checkpoint written on
one mesh restores onto another.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from mmi_jax.command_line import UsageError
from mmi_jax.train.train_state import TrainSetup, TrainState


class ArchitectureMismatchError(UsageError):
  """The workdir's checkpoint is of another model than the config's (a command stops on it
  with its message, not a traceback)."""


def model_description(config: Any) -> dict[str, Any]:
  """`config.model` as plain JSON data (what a checkpoint records of its model)."""
  return json.loads(config.model.to_json_best_effort(sort_keys=True))


def _differences(saved: Any, current: Any, prefix: str = "model") -> list[str]:
  if isinstance(saved, dict) and isinstance(current, dict):
    found = []
    for key in sorted(saved.keys() | current.keys()):
      found += _differences(saved.get(key, "<absent>"), current.get(key, "<absent>"),
                            f"{prefix}.{key}")
    return found
  if isinstance(saved, list) and isinstance(current, list):
    saved, current = json.dumps(saved), json.dumps(current)
  return [] if saved == current else [f"{prefix}: checkpoint {saved}, config {current}"]


class Checkpoints:
  """The checkpoints of one training run (`workdir/checkpoints`).

  Attributes:
    manager: the `ocp.CheckpointManager`.
  """

  def __init__(self, workdir: str | os.PathLike, config: Any, *, read_only: bool = False):
    """`read_only`: restores only; nothing is created, saved or deleted (an evaluation)."""
    train = config.train
    self._config = config
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(train.checkpoint_every), 1),
        max_to_keep=int(train.keep_checkpoints), enable_async_checkpointing=True,
        create=not read_only, read_only=read_only)
    self.directory = os.path.join(os.fspath(workdir), "checkpoints")
    self._closed = False
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "model"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_iterator: grain.DatasetIterator, *,
           force: bool = False) -> bool:
    """Starts an asynchronous save of step `state.step` if it is due (or `force`); returns
    whether one was started. The state's arrays must not be donated before the save has
    copied them: Orbax copies device arrays to the host before returning."""
    step = int(state.step)
    return self.manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iterator),
                                model=ocp.args.JsonSave(model_description(self._config))))

  def save_final(self, state: TrainState, data_iterator: grain.DatasetIterator) -> None:
    """Saves `state` unless its step is saved already (a last or preemption save)."""
    if int(state.step) not in self.manager.all_steps():
      self.save(state, data_iterator, force=True)

  def check_architecture(self, step: int) -> None:
    """Raises `ArchitectureMismatchError` naming every model setting in which the checkpoint
    of `step` differs from the config."""
    saved = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
    differences = _differences(saved["model"], model_description(self._config))
    if differences:
      shown = "\n  ".join(differences[:20])
      more = f"\n  ... {len(differences) - 20} more" if len(differences) > 20 else ""
      raise ArchitectureMismatchError(
          f"{self.directory} holds a checkpoint (step {step}) of another model than "
          f"config.model; use another --workdir or the checkpoint's config. Differences:\n  "
          f"{shown}{more}")

  def restore(self, setup: TrainSetup, data_iterator: grain.DatasetIterator,
              step: int | None = None) -> TrainState:
    """The state of `step` (default: the latest) in `setup`'s shardings; moves
    `data_iterator` to where it was at that step."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_architecture(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(setup.abstract_state()),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def restore_state(self, setup: TrainSetup, step: int) -> TrainState:
    """The train state of `step` alone (not the data position), in `setup`'s shardings."""
    self.check_architecture(step)
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(setup.abstract_state())))["state"]

  def wait(self) -> None:
    """Blocks until the asynchronous saves have been written."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves under way to be committed and closes the manager (once; later
    calls do nothing)."""
    if self._closed:
      return
    self._closed = True
    self.manager.wait_until_finished()
    self.manager.close()


__all__ = ["ArchitectureMismatchError", "Checkpoints", "model_description"]
