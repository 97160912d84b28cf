"""The training command's loop: data, state, steps, logs, checkpoints, evaluation.

`train_and_evaluate(config, workdir)`:

  1. checks the config's keys and the fits' settings (before it writes anything); builds the
     mesh (`config.mesh`), the model, the optimizer and the state's shardings (`TrainSetup`);
  2. restores the latest checkpoint of `workdir` (state and data position; refused if it is
     of another model), or starts afresh: params initialised (or loaded from
     `train.init_checkpoint`, a release checkpoint), the vision encoder fitted if
     `train.vision_fit.steps`, the VAE if `train.vae_fit.steps`, the LLM if
     `train.llm_fit.steps`, then the image decoder's Q-Former and UNet (and, reading the
     LLM, `context_feat_proj`) if `train.decoder_fit.steps`; meanwhile a background thread
     compiles the train step and the evaluation's programs, lowered from shapes alone
     (`background`);
  3. runs `train.steps` optimizer steps, each on `gradient_accumulation_steps` batches of
     this process's rows, assembled into global arrays
     (`jax.make_array_from_process_local_data`) split over the batch axes;
  4. logs step, losses, learning rate, steps/s and examples/s every `train.log_every` steps
     (stdout, `workdir/metrics.jsonl`, TensorBoard under `workdir/tensorboard`), saves
     asynchronously every `train.checkpoint_every` steps, evaluates every `train.eval_every`
     steps and at the end (`workdir/samples/*.png`, `workdir/results.json`); with
     `train.decoder_fit_after_training.steps`, the image decoder is fitted through the
     trained LLM after the last step, and that step is saved only then (a job stopped during
     the fit resumes from the checkpoint before);
  5. on SIGTERM (preemption) it finishes the current step, saves a checkpoint, waits for it
     and returns; running the same command again resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
import tensorboardX
from jax.experimental import multihost_utils

from mmi_jax import batch as batch_lib
from mmi_jax import sharding
from mmi_jax.convert import release
from mmi_jax.data import pipeline
from mmi_jax.train import background, config_check, fit_schedule
from mmi_jax.train.checkpoints import Checkpoints
from mmi_jax.train.evaluation import Evaluator
from mmi_jax.train.optimizer import merge_params, split_params
from mmi_jax.train.train_state import TrainSetup, TrainState, batch_shardings
from mmi_jax.train.train_step import lower_train_step
from mmi_jax.train import decoder_fit
from mmi_jax.train.decoder_fit import fit_decoder
from mmi_jax.train.llm_fit import fit_llm
from mmi_jax.train.vae_fit import fit_vae
from mmi_jax.train.vision_fit import fit_vision_encoder


class Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (all processes agree)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    self.requested = True

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


def global_batch(local_batches: list[Any], mesh: jax.sharding.Mesh) -> Any:
  """This process's batches (one per micro-batch) -> one global batch; with more than one,
  the arrays get a leading micro-batch axis. Rows and image slots are split over the batch
  axes; each process provides its own rows."""
  if len(local_batches) == 1:
    local, leading = local_batches[0], 0
  else:
    local, leading = jax.tree.map(lambda *xs: np.stack(xs), *local_batches), 1
  processes = jax.process_count()

  def global_shape(x):
    shape = list(np.shape(x))
    shape[leading] *= processes
    return tuple(shape)

  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(global_shape(x), np.asarray(x).dtype),
                        local)
  shardings = batch_shardings(shapes, mesh, leading)
  return jax.tree.map(
      lambda x, where, shape: jax.make_array_from_process_local_data(where, np.asarray(x),
                                                                     shape.shape),
      local, shardings, shapes)


def check_batch(batch: Any, config: Any) -> None:
  """Refuses a host batch that does not fit the model (`mmi_jax.batch.validate`: shapes,
  image sizes, each row's soi / `<|image|>` layout against its images). A multi-process
  batch's sequence ids are global rows, so there it checks the shapes only (the pipeline
  validated each process's rows before making their ids global)."""
  if jax.process_count() == 1:
    batch_lib.validate(batch, config.model)
  elif batch.text_ids.shape[1] != config.data.sequence_length:
    raise ValueError(f"batch rows have {batch.text_ids.shape[1]} tokens, config.data."
                     f"sequence_length is {config.data.sequence_length}")


class _Logger:
  """Log lines on process 0: stdout, `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, log: Callable[[str], None]):
    self.enabled = jax.process_index() == 0
    self.log = log if self.enabled else (lambda message: None)
    self._jsonl = self._writer = None
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
      self._writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
    if not self.enabled:
      return
    numbers = {key: float(value) for key, value in values.items()
               if isinstance(value, (int, float, np.floating, np.integer))}
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **numbers}) + "\n")
    self._jsonl.flush()
    for key, value in numbers.items():
      self._writer.add_scalar(f"{prefix}/{key}", value, step)
    self._writer.flush()

  def image(self, step: int, name: str, picture: np.ndarray) -> None:
    if self.enabled:
      self._writer.add_image(name, picture, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._writer.close()


def initial_params(setup: TrainSetup, config: Any, rng: jax.Array,
                   log: Callable[[str], None]) -> dict[str, Any]:
  """Fresh params: initialised (or a release checkpoint's), the vision encoder, the VAE and
  then the image decoder's Q-Former and UNet fitted if configured."""
  train = config.train
  if train.init_checkpoint:
    log(f"loading {train.init_checkpoint}")
    params = release.load(train.init_checkpoint, config.model,
                          dtype=np.dtype(config.model.param_dtype))
  else:
    params = setup.init_params(jax.random.fold_in(rng, 0))
  if train.vision_fit.steps:
    params = jax.device_get(params)
    params["visual_tokenizer"], stats = fit_vision_encoder(
        config, params["visual_tokenizer"], jax.random.fold_in(rng, 2), log=log)
    log(f"vision encoder fitted: {stats}")
  if train.vae_fit.steps and config.model.image_decoder is not None:
    params = jax.device_get(params)
    decoder = params["image_decoder"]["decoder"]
    decoder["vae"], stats = fit_vae(config, decoder["vae"], jax.random.fold_in(rng, 1), log=log)
    log(f"vae fitted: {stats}")
  if train.llm_fit.steps:
    params, stats = fit_llm(config, jax.device_get(params), jax.random.fold_in(rng, 4), log=log)
    log(f"llm fitted: {stats}")
  if train.decoder_fit.steps and config.model.image_decoder is not None:
    params, stats = fit_decoder(config, jax.device_get(params), jax.random.fold_in(rng, 3),
                                log=log)
    log(f"image decoder fitted: {stats}")
  shardings = setup.state_shardings
  return jax.device_put(params, merge_params(shardings.params, shardings.frozen))


def fit_decoder_after_training(setup: TrainSetup, config: Any, state: TrainState,
                               rng: jax.Array, log: Callable[[str], None]) -> TrainState:
  """`state` with the image decoder fitted through its trained, frozen LLM
  (`train.decoder_fit_after_training`); the optimizer state is kept."""
  params = jax.device_get(state.all_params())
  fitted, stats = fit_decoder(config, params, rng, log=log,
                              fit=decoder_fit.after_training_settings(config))
  log(f"image decoder fitted after training: {stats}")
  # Back in each param's own dtype (the fit works in float32) and placement.
  fitted = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), fitted, params)
  trainable, frozen = split_params(fitted, setup.trainable_mask)
  shardings = setup.state_shardings
  return state.replace(params=jax.device_put(trainable, shardings.params),
                       frozen=jax.device_put(frozen, shardings.frozen))


def train_and_evaluate(config: Any, workdir: str, *, log: Callable[[str], None] = print
                       ) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the final
  evaluation (or `{"preempted": step}` after a SIGTERM)."""
  config_check.check_known_keys(config)
  train = config.train
  fit_schedule.learning_rate_schedule(train.vae_fit, "train.vae_fit")
  decoder_fit.check_settings(train.decoder_fit)
  decoder_fit.check_settings(decoder_fit.after_training_settings(config),
                             "train.decoder_fit_after_training")
  os.makedirs(workdir, exist_ok=True)
  accumulation = int(train.gradient_accumulation_steps)
  if accumulation < 1:
    raise ValueError(f"train.gradient_accumulation_steps must be >= 1, got {accumulation}")
  mesh = sharding.make_mesh(config.mesh)
  process, processes = jax.process_index(), jax.process_count()
  logger = _Logger(workdir, log)
  logger.log(f"{config.name}: {processes} process(es), mesh {dict(mesh.shape)}, "
             f"{jax.device_count()} {jax.devices()[0].platform} device(s)")

  train_data = pipeline.make_dataset(config, "train", process_index=process,
                                     process_count=processes)
  example, _ = train_data[0]
  example = global_batch([example], mesh)
  setup = TrainSetup.create(config, mesh, example,
                            image_slots=pipeline.image_slots_per_row(config.data))
  iterator = iter(train_data)
  checkpoints = Checkpoints(workdir, config)
  latest = checkpoints.latest_step()
  if latest is not None:
    checkpoints.check_architecture(latest)
  # The train step and the evaluation are lowered from shapes alone and compiled in the
  # background while the params are initialised, fitted or restored (`background`).
  worker = background.Worker()
  leading = (accumulation,) if accumulation > 1 else ()
  compiling = worker.submit(lower_train_step(setup, jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leading + leaf.shape, leaf.dtype), example),
      accumulation).compile)
  evaluator = Evaluator(config, setup.model, mesh)
  evaluator.compile_ahead(setup.abstract_state().all_params(), worker)
  key = jax.random.key(int(config.seed))
  if latest is not None:
    state = checkpoints.restore(setup, iterator, latest)
    logger.log(f"resumed from {checkpoints.directory} at step {int(state.step)}")
  else:
    params = initial_params(setup, config, key, logger.log)
    state = setup.state_from_params(params, jax.random.fold_in(key, 2))

  def evaluate(state) -> dict[str, Any]:
    step = int(state.step)
    results = evaluator(state.all_params(), jax.random.fold_in(key, 3 + step), step, workdir)
    logger.scalars(step, results, "eval")
    if "picture_grid" in results:
      from PIL import Image  # noqa: PLC0415

      logger.image(step, "eval/pictures", np.asarray(Image.open(results["picture_grid"])))
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
  results: dict[str, Any] = {}
  rows_per_step = config.data.batch_size * accumulation
  # With a decoder fit after training, the last step is saved only once the fit is done.
  fit_after = (bool(train.decoder_fit_after_training.steps)
               and config.model.image_decoder is not None and int(state.step) < train.steps)
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
        logger.log(f"step {step}/{train.steps}: loss {metrics['loss']:.4f} "
                   f"loss_txt {metrics['loss_txt']:.4f} loss_img {metrics['loss_img']:.4f} "
                   f"lr {metrics['learning_rate']:.2e} {metrics['steps_per_second']:.2f} "
                   f"steps/s {metrics['examples_per_second']:.1f} examples/s")
        window_start, window_steps = time.perf_counter(), 0
      if fit_after and step == train.steps:
        break
      checkpoints.save(state, iterator)
      if preemption.any_process():
        checkpoints.save_final(state, iterator)
        checkpoints.close()
        logger.log(f"SIGTERM: saved step {step} to {checkpoints.directory}; rerun to resume")
        logger.close()
        return {"preempted": step}
      if train.eval_every and step % train.eval_every == 0 and step < train.steps:
        evaluate(state)
    if fit_after:
      state = fit_decoder_after_training(setup, config, state, jax.random.fold_in(key, 5),
                                         logger.log)
    checkpoints.save_final(state, iterator)
    results = evaluate(state)
  checkpoints.close()
  results["skipped_documents"] = skipped_total
  if process == 0:
    with open(os.path.join(workdir, "results.json"), "w") as file:
      json.dump({"step": int(state.step), **results}, file, indent=1)
  logger.close()
  return results


__all__ = ["Preemption", "check_batch", "global_batch", "initial_params", "train_and_evaluate"]
