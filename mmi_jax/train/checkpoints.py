"""Training checkpoints with Orbax: the whole train state, the data iterator and the model.

A checkpoint of step s under `workdir/checkpoints/s/` holds five items:

  * `state`: the `TrainState` (trainable and frozen params, optimizer state, step, rng), each
    array written by the processes that hold its shards (`ocp.args.StandardSave`);
  * `data`: the training data iterator's position (grain's `CheckpointSave`, one file per
    process), so a resumed run reads the batches the uninterrupted run would have read;
  * `model`: `config.model` as JSON, to refuse a workdir that belongs to another model;
  * `integrity`: a digest of every array of `state` and a CRC of each process's data position,
    taken when the save starts (`integrity`);
  * `counters`: each process's count of the documents its data pipeline skipped, by reason
    (`mmi_jax.data.packing.SKIP_REASONS`), so that a resumed run reports what a straight one
    does.

Saves are asynchronous (training continues while the arrays are written) every
`config.train.checkpoint_every` steps; the last `keep_checkpoints` are kept. A state holding
NaN or inf is not saved (`NonFiniteStateError`). Restoring reads the arrays straight into the
shardings of the current `TrainSetup`, so a checkpoint written on one mesh restores onto
another, and checks what it read against `integrity`: a checkpoint that cannot be read, or
whose digests differ, is damaged (`DamagedCheckpointError`). Resuming
(`restore_latest_intact`) moves a damaged step aside to `workdir/damaged_checkpoints/` (kept
for inspection, out of the way of the run's next saves) and takes the step before it.
Temporary directories of saves that never finished are removed when the manager opens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmi_jax import integrity
from mmi_jax.command_line import UsageError, error_summary
from mmi_jax.data.packing import SKIP_REASONS
from mmi_jax.train.train_state import TrainSetup, TrainState

ITEMS = ("state", "data", "model", "integrity", "counters")
DAMAGED_DIRECTORY = "damaged_checkpoints"


class ArchitectureMismatchError(UsageError):
  """The workdir's checkpoint is of another model than the config's (a command stops on it
  with its message, not a traceback)."""


class DamagedCheckpointError(UsageError):
  """A checkpoint cannot be read, or what it holds is not what was saved (a command stops on
  it with its message, not a traceback)."""


class NonFiniteStateError(RuntimeError):
  """The train state to save holds NaN or inf (training diverged)."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored checkpoint: its `step`, the `state`, and this process's skipped-document
  counts by reason (`skipped`)."""

  step: int
  state: TrainState
  skipped: dict[str, int]


def _gathered(values: np.ndarray) -> np.ndarray:
  """`[processes, ...]`: every process's `values` (uint32), on every process."""
  values = np.asarray(values, np.uint32)
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values))


def _all_processes_agree(ok: bool) -> bool:
  return bool(_gathered(np.array([ok])).all())


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
  """The checkpoints of one training run (`workdir/<name>`, default `checkpoints`).

  Attributes:
    manager: the `ocp.CheckpointManager`.
    directory: where the steps are.
  """

  def __init__(self, workdir: str | os.PathLike, config: Any, *, read_only: bool = False,
               name: str = "checkpoints"):
    """`read_only`: restores only; nothing is created, saved or deleted (an evaluation)."""
    train = config.train
    self._config = config
    self._workdir = os.fspath(workdir)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(train.checkpoint_every), 1),
        max_to_keep=int(train.keep_checkpoints), enable_async_checkpointing=True,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    self.directory = os.path.join(self._workdir, name)
    self._closed = False
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, state: TrainState, data_iterator: grain.DatasetIterator,
           skipped: dict[str, int] | None = None, *, force: bool = False) -> bool:
    """Starts an asynchronous save of step `state.step` if it is due (or `force`); returns
    whether one was started. `skipped`: this process's skipped documents by reason. The
    digests are taken first (every process takes part); `NonFiniteStateError` names the
    arrays holding NaN or inf, and nothing is saved. The state's arrays must not be donated before the save
    has copied them: Orbax copies device arrays to the host before returning."""
    step = int(state.step)
    if not (force or self.manager.should_save(step)):
      return False
    digests, nonfinite = integrity.array_digests(state)
    if nonfinite:
      listed = ", ".join(f"{path} ({count})" for path, count in list(nonfinite.items())[:10])
      raise NonFiniteStateError(
          f"step {step}: the train state holds NaN or inf, in {len(nonfinite)} arrays: {listed}; "
          f"not saved (training diverged: lower train.learning_rate or resume from "
          f"{self.latest_step()})")
    data_crcs = _gathered(np.array([integrity.data_digest(data_iterator.get_state())]))
    skipped = skipped or {}
    counts = _gathered(np.array([skipped.get(reason, 0) for reason in SKIP_REASONS]))
    record = {"state": digests, "data_crc32": [int(row[0]) for row in data_crcs]}
    counters = {"skipped": [dict(zip(SKIP_REASONS, map(int, row))) for row in counts]}
    return self.manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iterator),
                                model=ocp.args.JsonSave(model_description(self._config)),
                                integrity=ocp.args.JsonSave(record),
                                counters=ocp.args.JsonSave(counters)))

  def save_final(self, state: TrainState, data_iterator: grain.DatasetIterator,
                 skipped: dict[str, int] | None = None) -> None:
    """Saves `state` unless its step is saved already (a last or preemption save)."""
    if int(state.step) not in self.manager.all_steps():
      self.save(state, data_iterator, skipped, force=True)

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

  def _items(self, step: int) -> set[str]:
    """The items step `step` holds (a checkpoint from before `integrity` lacks two)."""
    path = os.path.join(self.directory, str(step))
    return {name for name in ITEMS if os.path.isdir(os.path.join(path, name))}

  def _read(self, setup: TrainSetup, step: int, data_iterator: grain.DatasetIterator | None
            ) -> dict[str, Any]:
    """The items of `step` that a restore needs, verified; `DamagedCheckpointError` naming
    what is wrong."""
    try:
      self.check_architecture(step)
    except ArchitectureMismatchError:
      raise
    except Exception as error:  # noqa: BLE001 (an unreadable record of the model)
      raise DamagedCheckpointError(f"{self.directory}/{step}: its model record cannot be read "
                                   f"({error_summary(error)})") from error
    present = self._items(step)
    wanted = {"state": ocp.args.StandardRestore(setup.abstract_state())}
    if data_iterator is not None:
      wanted["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    for name in ("integrity", "counters"):
      if name in present:
        wanted[name] = ocp.args.JsonRestore()
    where = f"{self.directory}/{step}"
    try:
      restored = dict(self.manager.restore(step, args=ocp.args.Composite(**wanted)))
      failure = None
    except Exception as error:  # noqa: BLE001 (any failure to read is a damaged checkpoint)
      restored, failure = {}, f"cannot be read: {error_summary(error)}"
    if not _all_processes_agree(failure is None):
      raise DamagedCheckpointError(f"{where} {failure or 'cannot be read by another process'}")
    if "integrity" not in restored:
      return restored  # written before checkpoints carried digests: nothing to verify against
    record = restored["integrity"]
    digests, nonfinite = integrity.array_digests(restored["state"])
    problems = integrity.differences(record["state"], digests)
    problems += [f"{path}: {count} NaN or inf" for path, count in nonfinite.items()]
    process = jax.process_index()
    if data_iterator is not None and process < len(record["data_crc32"]):
      if integrity.data_digest(data_iterator.get_state()) != record["data_crc32"][process]:
        problems.append(f"the data position of process {process} differs from the one saved")
    if not _all_processes_agree(not problems):
      shown = "; ".join(problems[:5]) or "another process found a difference"
      more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
      raise DamagedCheckpointError(f"{where} is not what was saved: {shown}{more}")
    return restored

  def restore(self, setup: TrainSetup, data_iterator: grain.DatasetIterator,
              step: int | None = None) -> Restored:
    """Step `step` (default: the latest), verified, in `setup`'s shardings; moves
    `data_iterator` to where it was at that step. `DamagedCheckpointError` if it is not
    intact."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._read(setup, step, data_iterator)
    skipped = {reason: 0 for reason in SKIP_REASONS}
    if "counters" in restored and jax.process_index() < len(restored["counters"]["skipped"]):
      skipped.update(restored["counters"]["skipped"][jax.process_index()])
    return Restored(step=step, state=restored["state"], skipped=skipped)

  def restore_latest_intact(self, setup: TrainSetup, data_iterator: grain.DatasetIterator,
                            log: Callable[[str], None]) -> Restored | None:
    """The newest intact step (None when there is no checkpoint). Each damaged step newer
    than it is reported through `log` and moved to `workdir/damaged_checkpoints/<step>`;
    `DamagedCheckpointError` listing them all when none is intact."""
    steps = self.all_steps()
    reports = []
    for step in reversed(steps):
      try:
        return self.restore(setup, data_iterator, step)
      except DamagedCheckpointError as error:
        reports.append(str(error))
        log(f"checkpoint step {step} is damaged and set aside: {error}")
        self.set_aside(step)
    if reports:
      raise DamagedCheckpointError(
          f"no intact checkpoint in {self.directory} (the damaged ones are in "
          f"{os.path.join(self._workdir, DAMAGED_DIRECTORY)}); start afresh in another "
          "--workdir. What was found:\n  " + "\n  ".join(reports))
    return None

  def set_aside(self, step: int) -> None:
    """Moves step `step` to `workdir/damaged_checkpoints/<step>` (`<step>-2`, ... when a
    damaged step of that number is there already; process 0), so that the run's next save of
    that step does not find it in the way."""
    if jax.process_index() == 0:
      damaged = os.path.join(self._workdir, DAMAGED_DIRECTORY)
      os.makedirs(damaged, exist_ok=True)
      target, copy = os.path.join(damaged, str(step)), 1
      while os.path.exists(target):
        copy += 1
        target = os.path.join(damaged, f"{step}-{copy}")
      os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.reload()

  def restore_state(self, setup: TrainSetup, step: int) -> TrainState:
    """The train state of `step` alone (not the data position), verified, in `setup`'s
    shardings; `DamagedCheckpointError` if it is not intact."""
    return self._read(setup, step, None)["state"]

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


__all__ = ["ArchitectureMismatchError", "Checkpoints", "DamagedCheckpointError",
           "NonFiniteStateError", "Restored", "model_description"]
