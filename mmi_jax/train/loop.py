"""The training loop: data, state, steps, logs, checkpoints, and the extensions' work.

`train_and_evaluate(config, workdir)`:

  1. checks the config's keys and settings (`config_check`) and builds the extensions it
     selects (`config.train.extensions`, `mmi_jax.train.extensions`), which check theirs,
     before it writes anything; holds the workdir (`workdir_lock`: one run per workdir);
     refuses data whose first batch holds no document; builds the mesh (`config.mesh`), the
     model, the optimizer and the state's shardings (`TrainSetup`);
  2. lowers the train step from shapes alone and compiles it in a background thread
     (`background`), as the extensions do their programs (`compile_ahead`); meanwhile it
     restores the newest intact checkpoint of `workdir` (state, data position and skipped
     document counts, verified against the digests saved with them; a damaged step is
     reported and set aside, `checkpoints`; one of another model is refused), or starts
     afresh: params initialised (or loaded from `train.init_checkpoint`, a release
     checkpoint), then `prepare_params` of each extension;
  3. runs `train.steps` optimizer steps, each on `gradient_accumulation_steps` batches of
     this process's rows, assembled into global arrays split over the batch axes
     (`batches.global_batch`);
  4. logs step, losses, learning rate, steps/s, examples/s and the time left every
     `train.log_every` steps
     (`metrics_log`: stdout, `workdir/metrics.jsonl`, TensorBoard), saves asynchronously every
     `train.checkpoint_every` steps, and every `train.eval_every` steps runs the extensions'
     `evaluate`;
  5. after the last step, saves it and waits for the save; runs `after_training` of the
     extensions that have one and saves its result in `workdir/after_training/` (a resumed
     job that finds it there skips that work); evaluates; writes `workdir/results.json`: the
     step, the evaluation and `skipped_documents` with `skipped_by_reason` (documents the
     data pipelines of all processes could not place in a row, `mmi_jax.data.packing`);
  6. SIGTERM (preemption) and SIGINT (Ctrl-C) are caught from the first line on
     (`preemption`): each long phase (restore or preparation of the params, a train step, the
     extensions' fits and evaluations) ends its unit of work, the current train step is saved
     when training, the saves under way are committed, and the command returns; running it
     again resumes where it stopped. Whatever ends the job, the saves under way are
     committed first.

Random draws come from named streams of `config.seed` (`rng_streams`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmi_jax import sharding
from mmi_jax.command_line import UsageError
from mmi_jax.convert import release
from mmi_jax.data import pipeline
from mmi_jax.data.packing import SKIP_REASONS
from mmi_jax.train import background, config_check
from mmi_jax.train.batches import check_batch, global_batch
from mmi_jax.train.checkpoints import (ArchitectureMismatchError, Checkpoints,
                                       DamagedCheckpointError)
from mmi_jax.train.extensions import Extension, Run, extension_classes, rng_tables
from mmi_jax.train.extensions import evaluate as evaluate_extensions
from mmi_jax.train.metrics_log import MetricsLog
from mmi_jax.train.optimizer import learning_rate_schedule
from mmi_jax.train.preemption import Preemption, Stopped
from mmi_jax.train.rng_streams import CORE_STREAMS, RngStreams
from mmi_jax.train.train_state import TrainSetup, TrainState
from mmi_jax.train.train_step import lower_train_step
from mmi_jax.train.workdir_lock import WorkdirLock
from mmi_jax.trainable import merge_params


def initial_params(run: Run, extensions: list) -> dict[str, Any]:
  """Fresh params, placed in their shards: initialised (or a release checkpoint's), then
  each extension's `prepare_params`."""
  config, setup = run.config, run.setup
  if config.train.init_checkpoint:
    run.logger.log(f"loading {config.train.init_checkpoint}")
    params = release.load(config.train.init_checkpoint, config.model,
                          dtype=np.dtype(config.model.param_dtype))
  else:
    started = time.perf_counter()
    run.logger.log("initialising the params (on CPUs op by op: a minute or two)")
    params = setup.init_params(run.rngs.key("params"))
    run.logger.log(f"params initialised in {time.perf_counter() - started:.0f} s")
  run.preemption.check("the params' initialisation")
  for extension in extensions:
    params = extension.prepare_params(run, params)
  shardings = setup.state_shardings
  return jax.device_put(params, merge_params(shardings.params, shardings.frozen))


def train_and_evaluate(config: Any, workdir: str, *, log: Callable[[str], None] = print
                       ) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest intact checkpoint); returns the
  final evaluation, or `{"preempted": step, "signal": name}` after a SIGTERM or SIGINT (`step`:
  the step saved, None when the job stopped before its first save)."""
  with Preemption() as preemption:  # from the start: a stop at any moment is a clean one
    config_check.check_config_keys(config)
    config_check.check_settings(config)
    extensions = [extension(config) for extension in extension_classes(config)]
    learning_rate_schedule(config.train)
    rngs = RngStreams(config.seed, ("the training core", CORE_STREAMS), *rng_tables(extensions))
    with contextlib.ExitStack() as held:
      if jax.process_index() == 0:
        held.enter_context(WorkdirLock(workdir))
      return _train_and_evaluate(config, workdir, extensions, rngs, log, held, preemption)


def _overrides(extension: Extension, point: str) -> bool:
  return getattr(type(extension), point) is not getattr(Extension, point)


def _skipped_in_all_processes(skipped: dict[str, int]) -> dict[str, int]:
  counts = [skipped[reason] for reason in SKIP_REASONS]
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(np.asarray(counts, np.int32))).sum(0)
  return {reason: int(count) for reason, count in zip(SKIP_REASONS, counts)}


def _restore_finished(finished: Checkpoints, setup: TrainSetup, step: int,
                      log: Callable[[str], None]) -> TrainState | None:
  """The state that the extensions' `after_training` left at `step`, if `finished` holds it
  intact (a damaged one is reported and set aside: the work is done again)."""
  if step not in finished.all_steps():
    return None
  try:
    state = finished.restore_state(setup, step)
  except DamagedCheckpointError as error:
    log(f"the state after after_training is damaged and set aside ({error}); redoing it")
    finished.set_aside(step)
    return None
  log(f"the state after the extensions' after_training restored from {finished.directory}")
  return state


def _train_and_evaluate(config: Any, workdir: str, extensions: list, rngs: RngStreams,
                        log: Callable[[str], None], held: contextlib.ExitStack,
                        preemption: Preemption) -> dict[str, Any]:
  """`train_and_evaluate` once its settings are checked and the workdir is held; what it
  must finish whatever happens (the checkpoints' pending saves, the background compiles) goes
  on `held`."""
  train = config.train
  accumulation = int(train.gradient_accumulation_steps)
  process, processes = jax.process_index(), jax.process_count()
  train_data = pipeline.make_dataset(config, "train", process_index=process,
                                     process_count=processes)
  first_batch, first_stats = train_data[0]
  if not np.any(first_batch.attention_mask):
    raise UsageError(
        f"data: the first training batch holds no document, every one was skipped "
        f"({first_stats.get('reasons')}): data.sequence_length {config.data.sequence_length} "
        f"and data.max_images_per_sequence {config.data.max_images_per_sequence} leave no room "
        "for a document")
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  logger = MetricsLog(workdir, log)
  held.callback(logger.close)
  logger.log(f"{config.name}: {processes} process(es), mesh {dict(mesh.shape)}, "
             f"{jax.device_count()} {jax.devices()[0].platform} device(s)")

  example = global_batch([first_batch], mesh)
  logger.log("building the model, the optimizer and their shardings")
  setup = TrainSetup.create(config, mesh, example,
                            image_slots=pipeline.image_slots_per_row(config.data))
  iterator = iter(train_data)
  # On the way out, whatever happened: the compiles not started are dropped (the one under way
  # ends first: `background`), and the saves under way are committed.
  worker = held.enter_context(background.Worker())
  checkpoints = Checkpoints(workdir, config)
  held.callback(checkpoints.close)
  finishes = [e for e in extensions if _overrides(e, "after_training")]
  # The state after the extensions' `after_training` (the last step's own checkpoint holds the
  # state before it): a stop during the evaluation does not cost that work again.
  finished = Checkpoints(workdir, config, name="after_training") if finishes else None
  if finished is not None:
    held.callback(finished.close)
  latest = checkpoints.latest_step()
  if latest is not None:
    try:
      checkpoints.check_architecture(latest)
    except ArchitectureMismatchError:
      raise
    except Exception:  # noqa: BLE001, S110 (unreadable: the restore reports it and falls back)
      pass
  run = Run(config=config, workdir=workdir, setup=setup, rngs=rngs, worker=worker,
            logger=logger, preemption=preemption)
  # Programs are lowered here from shapes alone and compiled in the background while the
  # params are initialised, prepared or restored (the train step only when steps are left).
  leading = (accumulation,) if accumulation > 1 else ()

  def compile_train_step() -> concurrent.futures.Future:
    logger.log("compiling the train step in the background" + (
        " (minutes on a CPU; XLA may print 'Very slow compile?' meanwhile: that is this "
        "compile taking its time, not an error)" if jax.devices()[0].platform == "cpu" else ""))
    return worker.submit(lower_train_step(setup, jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leading + leaf.shape, leaf.dtype), example),
        accumulation).compile)

  compiling = compile_train_step() if latest is None or latest < train.steps else None
  for extension in extensions:
    extension.compile_ahead(run)

  def evaluate(state: TrainState) -> dict[str, Any]:
    return evaluate_extensions(extensions, run, state.all_params(), int(state.step))

  skipped = {reason: 0 for reason in SKIP_REASONS}  # this process's, since step 0

  def next_batch():
    batches = []
    for _ in range(accumulation):
      batch, stats = next(iterator)
      check_batch(batch, config)
      batches.append(batch)
      for reason, count in stats["reasons"].items():
        skipped[reason] += count
    return global_batch(batches, mesh)

  try:
    restored = checkpoints.restore_latest_intact(setup, iterator, logger.log)
    if restored is not None:
      state = restored.state
      skipped.update(restored.skipped)
      logger.log(f"resumed from {checkpoints.directory} at step {restored.step}")
    else:
      state = setup.state_from_params(initial_params(run, extensions), rngs.key("train_steps"))
    preemption.check("the start (the params' restore or preparation)")
    step_fn = None  # the compiled train step, once the first batch needs it
    rows_per_step = config.data.batch_size * accumulation
    window_start, window_steps = time.perf_counter(), 0
    while int(state.step) < train.steps:
      batch = next_batch()
      if step_fn is None:
        waited = time.perf_counter()
        step_fn = (compiling or compile_train_step()).result()
        logger.log(f"train step compiled ({time.perf_counter() - waited:.0f} s waited for it)")
      state, metrics = step_fn(state, batch)
      step = int(state.step)
      window_steps += 1
      if step % train.log_every == 0 or step == train.steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window_start
        metrics.update(steps_per_second=window_steps / elapsed,
                       examples_per_second=window_steps * rows_per_step / elapsed,
                       skipped_documents=sum(skipped.values()))
        logger.scalars(step, metrics)
        left = (train.steps - step) / metrics["steps_per_second"]
        logger.log(f"step {step}/{train.steps}: loss {metrics['loss']:.4f} "
                   f"loss_txt {metrics['loss_txt']:.4f} loss_img {metrics['loss_img']:.4f} "
                   f"lr {metrics['learning_rate']:.2e} {metrics['steps_per_second']:.2f} "
                   f"steps/s {metrics['examples_per_second']:.1f} examples/s, "
                   f"{left:.0f} s left")
        window_start, window_steps = time.perf_counter(), 0
      if step == train.steps:
        break
      checkpoints.save(state, iterator, skipped)
      signal_name = preemption.any_process()
      if signal_name:
        checkpoints.save_final(state, iterator, skipped)
        raise Stopped(f"train step {step}", signal_name)
      if train.eval_every and step % train.eval_every == 0:
        try:
          evaluate(state)
        except Stopped:
          checkpoints.save_final(state, iterator, skipped)
          raise
    # The last train step is on disk before the work after it starts.
    checkpoints.save_final(state, iterator, skipped)
    checkpoints.wait()
    preemption.check(f"train step {int(state.step)}")
    if finished is not None:
      done = _restore_finished(finished, setup, int(state.step), logger.log)
      if done is not None:
        state = done
      else:
        for extension in finishes:
          state = extension.after_training(run, state)
        finished.save_final(state, iterator, skipped)
        finished.wait()
    results = evaluate(state)
  except Stopped as stop:
    checkpoints.wait()
    saved = checkpoints.latest_step()
    if saved is None:
      logger.log(f"{stop.signal_name} during {stop.where}: stopped before the first "
                 "checkpoint; rerun to start again")
    else:
      logger.log(f"{stop.signal_name}: saved step {saved} to {checkpoints.directory}; rerun "
                 f"to resume (stopped during {stop.where})")
    return {"preempted": saved, "signal": stop.signal_name}
  skipped_everywhere = _skipped_in_all_processes(skipped)
  results["skipped_documents"] = sum(skipped_everywhere.values())
  results["skipped_by_reason"] = skipped_everywhere
  if results["skipped_documents"]:
    logger.log(f"skipped_documents {results['skipped_documents']} ({skipped_everywhere}): "
               "training documents the data pipeline left out because they did not fit a row "
               "(too many tokens or pictures for its sequence length or image slots; "
               "mmi_jax.data.packing), counted, not trained on")
  if process == 0:
    with open(os.path.join(workdir, "results.json"), "w") as file:
      json.dump({"step": int(state.step), **results}, file, indent=1)
  return results


__all__ = ["initial_params", "train_and_evaluate"]
