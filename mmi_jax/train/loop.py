"""The training loop: data, state, steps, logs, checkpoints, and the extensions' work.

`train_and_evaluate(config, workdir)`:

  1. checks the config's keys and settings (`config_check`) and builds the extensions it
     selects (`config.train.extensions`, `mmi_jax.train.extensions`), which check theirs,
     before it writes anything; holds the workdir (`workdir_lock`: one run per workdir);
     refuses data whose first batch holds no document; builds the mesh (`config.mesh`), the
     model, the optimizer and the state's shardings (`TrainSetup`);
  2. lowers the train step from shapes alone and compiles it in a background thread
     (`background`), as the extensions do their programs (`compile_ahead`); meanwhile it
     restores the latest checkpoint of `workdir` (state and data position; refused if it is
     of another model), or starts afresh: params initialised (or loaded from
     `train.init_checkpoint`, a release checkpoint), then `prepare_params` of each extension;
  3. runs `train.steps` optimizer steps, each on `gradient_accumulation_steps` batches of
     this process's rows, assembled into global arrays split over the batch axes
     (`batches.global_batch`);
  4. logs step, losses, learning rate, steps/s, examples/s and the time left every
     `train.log_every` steps
     (`metrics_log`: stdout, `workdir/metrics.jsonl`, TensorBoard), saves asynchronously every
     `train.checkpoint_every` steps, and every `train.eval_every` steps runs the extensions'
     `evaluate`;
  5. after the last step, runs `after_training` of each extension, then saves the last step
     (a job stopped before that resumes from the checkpoint before), evaluates, and writes
     `workdir/results.json`: the step, the evaluation and `skipped_documents` (documents the
     data pipeline could not place in a row, `mmi_jax.data.packing`);
  6. on SIGTERM (preemption) it finishes the current step, saves a checkpoint, waits for it
     and returns; running the same command again resumes exactly where it stopped.

Random draws come from named streams of `config.seed` (`rng_streams`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from mmi_jax import sharding
from mmi_jax.command_line import UsageError
from mmi_jax.convert import release
from mmi_jax.data import pipeline
from mmi_jax.train import background, config_check
from mmi_jax.train.batches import check_batch, global_batch
from mmi_jax.train.checkpoints import Checkpoints
from mmi_jax.train.extensions import Run, extension_classes, rng_tables
from mmi_jax.train.metrics_log import MetricsLog
from mmi_jax.train.optimizer import learning_rate_schedule
from mmi_jax.train.preemption import Preemption
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
  for extension in extensions:
    params = extension.prepare_params(run, params)
  shardings = setup.state_shardings
  return jax.device_put(params, merge_params(shardings.params, shardings.frozen))


def train_and_evaluate(config: Any, workdir: str, *, log: Callable[[str], None] = print
                       ) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the final
  evaluation (or `{"preempted": step}` after a SIGTERM)."""
  config_check.check_config_keys(config)
  config_check.check_settings(config)
  extensions = [extension(config) for extension in extension_classes(config)]
  learning_rate_schedule(config.train)
  rngs = RngStreams(config.seed, ("the training core", CORE_STREAMS), *rng_tables(extensions))
  with contextlib.ExitStack() as held:
    if jax.process_index() == 0:
      held.enter_context(WorkdirLock(workdir))
    return _train_and_evaluate(config, workdir, extensions, rngs, log, held)


def _train_and_evaluate(config: Any, workdir: str, extensions: list, rngs: RngStreams,
                        log: Callable[[str], None], held: contextlib.ExitStack
                        ) -> dict[str, Any]:
  """`train_and_evaluate` once its settings are checked and the workdir is held; what it
  must finish whatever happens (the checkpoints' pending saves) goes on `held`."""
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
  logger.log(f"{config.name}: {processes} process(es), mesh {dict(mesh.shape)}, "
             f"{jax.device_count()} {jax.devices()[0].platform} device(s)")

  example = global_batch([first_batch], mesh)
  logger.log("building the model, the optimizer and their shardings")
  setup = TrainSetup.create(config, mesh, example,
                            image_slots=pipeline.image_slots_per_row(config.data))
  iterator = iter(train_data)
  checkpoints = Checkpoints(workdir, config)
  # A save under way is committed even when what follows it fails (an evaluation's error).
  held.callback(checkpoints.close)
  latest = checkpoints.latest_step()
  if latest is not None:
    checkpoints.check_architecture(latest)
  run = Run(config=config, workdir=workdir, setup=setup, rngs=rngs,
            worker=background.Worker(), logger=logger)
  # Programs are lowered here from shapes alone and compiled in the background while the
  # params are initialised, prepared or restored.
  leading = (accumulation,) if accumulation > 1 else ()
  logger.log("compiling the train step in the background" + (
      " (minutes on a CPU; XLA may print 'Very slow compile?' meanwhile: that is this compile "
      "taking its time, not an error)" if jax.devices()[0].platform == "cpu" else ""))
  compiling = run.worker.submit(lower_train_step(setup, jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leading + leaf.shape, leaf.dtype), example),
      accumulation).compile)
  for extension in extensions:
    extension.compile_ahead(run)
  if latest is not None:
    state = checkpoints.restore(setup, iterator, latest)
    logger.log(f"resumed from {checkpoints.directory} at step {int(state.step)}")
  else:
    state = setup.state_from_params(initial_params(run, extensions), rngs.key("train_steps"))

  def evaluate(state: TrainState) -> dict[str, Any]:
    step, params, results = int(state.step), state.all_params(), {}
    for extension in extensions:
      results.update(extension.evaluate(run, params, step))
    if results:
      logger.scalars(step, results, "eval")
      logger.log(f"eval at step {step}: " + ", ".join(
          f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, float)))
    return results

  def next_batch():
    batches, skipped = [], 0
    for _ in range(accumulation):
      batch, stats = next(iterator)
      check_batch(batch, config)
      batches.append(batch)
      skipped += stats["skipped"]
    return global_batch(batches, mesh), skipped

  step_fn = None  # the compiled train step, once the first batch needs it
  skipped_total = 0
  rows_per_step = config.data.batch_size * accumulation
  trains_here = int(state.step) < train.steps
  with Preemption() as preemption:
    window_start, window_steps = time.perf_counter(), 0
    while int(state.step) < train.steps:
      batch, skipped = next_batch()
      skipped_total += skipped
      if step_fn is None:
        waited = time.perf_counter()
        step_fn = compiling.result()
        logger.log(f"train step compiled ({time.perf_counter() - waited:.0f} s waited for it)")
      state, metrics = step_fn(state, batch)
      step = int(state.step)
      window_steps += 1
      if step % train.log_every == 0 or step == train.steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window_start
        metrics.update(steps_per_second=window_steps / elapsed,
                       examples_per_second=window_steps * rows_per_step / elapsed,
                       skipped_documents=skipped_total)
        logger.scalars(step, metrics)
        left = (train.steps - step) / metrics["steps_per_second"]
        logger.log(f"step {step}/{train.steps}: loss {metrics['loss']:.4f} "
                   f"loss_txt {metrics['loss_txt']:.4f} loss_img {metrics['loss_img']:.4f} "
                   f"lr {metrics['learning_rate']:.2e} {metrics['steps_per_second']:.2f} "
                   f"steps/s {metrics['examples_per_second']:.1f} examples/s, "
                   f"{left:.0f} s left")
        window_start, window_steps = time.perf_counter(), 0
      if step == train.steps:
        break  # saved after the extensions' `after_training`
      checkpoints.save(state, iterator)
      if preemption.any_process():
        checkpoints.save_final(state, iterator)
        checkpoints.close()
        logger.log(f"SIGTERM: saved step {step} to {checkpoints.directory}; rerun to resume")
        logger.close()
        return {"preempted": step}
      if train.eval_every and step % train.eval_every == 0:
        evaluate(state)
    if trains_here:
      for extension in extensions:
        state = extension.after_training(run, state)
    checkpoints.save_final(state, iterator)
    results = evaluate(state)
  checkpoints.close()
  results["skipped_documents"] = skipped_total
  if skipped_total:
    logger.log(f"skipped_documents {skipped_total}: training documents the data pipeline left "
               "out because they did not fit a row (too many tokens or pictures for its "
               "sequence length or image slots; mmi_jax.data.packing), counted, not trained on")
  if process == 0:
    with open(os.path.join(workdir, "results.json"), "w") as file:
      json.dump({"step": int(state.step), **results}, file, indent=1)
  logger.close()
  return results


__all__ = ["initial_params", "train_and_evaluate"]
