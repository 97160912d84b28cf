"""Evaluating one saved step of a training run, without training or touching the run.

`evaluate_step(config, workdir, step)` restores the train state of `step` (default: the
latest) from `workdir/checkpoints` read-only (verified against its digests; for the last step,
the state after the extensions' `after_training` from `workdir/after_training/` when it is
there, the state the run's own final evaluation saw), runs the `evaluate` of the extensions that
`config.train.extensions` selects, with the random draws of that step (the run's own
evaluation at that step draws the same), and writes what it finds to
`workdir/evaluations/step_<step>/`: `results.json`, `metrics.jsonl`, TensorBoard, and the
files the extensions write (the demo's sample grid). The run's checkpoints, `results.json`,
logs and samples stay as they were.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax

from mmi_jax import sharding
from mmi_jax.command_line import UsageError
from mmi_jax.data import pipeline
from mmi_jax.train import background, config_check
from mmi_jax.train.batches import global_batch
from mmi_jax.train.checkpoints import Checkpoints
from mmi_jax.train.extensions import Extension, Run, evaluate, extension_classes, rng_tables
from mmi_jax.train.metrics_log import MetricsLog
from mmi_jax.train.rng_streams import CORE_STREAMS, RngStreams
from mmi_jax.train.train_state import TrainSetup


def evaluate_step(config: Any, workdir: str, step: int | None = None, *,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """Evaluates the checkpoint of `step` (None: the latest) of the run in `workdir`; returns
  the results (also in `workdir/evaluations/step_<step>/results.json`)."""
  config_check.check_config_keys(config)
  extensions = [extension(config) for extension in extension_classes(config)]
  if not any(type(extension).evaluate is not Extension.evaluate for extension in extensions):
    raise UsageError("config.train.extensions: none of them evaluates (the release config "
                     "selects none; the demo's is mmi_jax.demo.shapes_evaluation)")
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise UsageError(f"--workdir: {directory} does not exist (no training run here)")
  checkpoints = Checkpoints(workdir, config, read_only=True)
  saved = sorted(checkpoints.manager.all_steps())
  if step is None:
    if not saved:
      raise UsageError(f"--workdir: no checkpoint in {directory}")
    step = saved[-1]
  if step not in saved:
    raise UsageError(f"--step={step}: {directory} holds steps {saved}")
  checkpoints.check_architecture(step)

  output = os.path.join(workdir, "evaluations", f"step_{step}")
  os.makedirs(output, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  example = global_batch([pipeline.make_dataset(config, "train")[0][0]], mesh)
  setup = TrainSetup.create(config, mesh, example,
                            image_slots=pipeline.image_slots_per_row(config.data))
  logger = MetricsLog(output, log)
  run = Run(config=config, workdir=output, setup=setup,
            rngs=RngStreams(config.seed, ("the training core", CORE_STREAMS),
                            *rng_tables(extensions)),
            worker=background.Worker(), logger=logger)
  for extension in extensions:
    extension.compile_ahead(run)
  finished = os.path.join(workdir, "after_training")
  if os.path.isdir(os.path.join(finished, str(step))):
    checkpoints.close()
    checkpoints = Checkpoints(workdir, config, read_only=True, name="after_training")
    logger.log(f"evaluating step {step} of {workdir} (after the extensions' after_training)")
  else:
    logger.log(f"evaluating step {step} of {workdir}")
  state = checkpoints.restore_state(setup, step)
  checkpoints.close()
  results = evaluate(extensions, run, state.all_params(), step)
  if jax.process_index() == 0:
    with open(os.path.join(output, "results.json"), "w") as file:
      json.dump({"step": step, **results}, file, indent=1)
  logger.close()
  return results


__all__ = ["evaluate_step"]
