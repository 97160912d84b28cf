"""The one loop of the stand-in fits: loss -> jitted step -> schedule -> log.

Each fit (`vision_fit`, `vae_fit`, `llm_fit`, `decoder_fit`) says what it trains, on which
batches and under which loss; `fit` runs its optimizer steps and logs them. A fit's settings (a
section such as `config.stand_ins.vae_fit`) name `steps`, `batch_size`, `learning_rate` and,
for the fits with a schedule, `schedule` and `warmup_steps` (`fit_schedule`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import optax

from mmi_jax.command_line import UsageError

SCHEDULES = ("constant", "cosine")
LOG_EVERY = 100  # steps between log lines (and the first and last step)
RECORD_EVERY = 10  # steps between the scalars given to `record` (and the last step)
Record = Callable[[int, dict[str, float]], None]
# Called after each step with where the fit is ("vae fit step 3/400"); raises to stop the fit
# (the training job's `run.preemption.check`).
CheckStop = Callable[[str], None]

# `(trained, frozen, batch, key) -> (loss, {name: scalar})`.
LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def fit_schedule(settings: Any, where: str) -> optax.Schedule:
  """The learning rate of a fit's `settings` (steps, learning_rate, schedule, warmup_steps):
  "constant" (`learning_rate` throughout), or "cosine": a linear warm-up from 0 over
  `warmup_steps` (at most `steps`), then half a cosine down to 2% of `learning_rate` at
  `steps`. `where` names the settings in errors ("stand_ins.vae_fit")."""
  rate, steps = float(settings.learning_rate), int(settings.steps)
  if settings.schedule == "constant":
    return optax.constant_schedule(rate)
  if settings.schedule == "cosine":
    warmup = min(int(settings.warmup_steps), steps)
    return optax.warmup_cosine_decay_schedule(0.0, rate, warmup, max(steps, warmup + 1),
                                              end_value=0.02 * rate)
  raise UsageError(f"{where}.schedule must be one of {SCHEDULES}, got {settings.schedule!r}")


def fit(name: str, loss_fn: LossFn, trained: Any, frozen: Any, batches: Iterator[Any], *,
        steps: int, optimizer: optax.GradientTransformation, rng: jax.Array,
        log: Callable[[str], None], schedule: optax.Schedule | None = None,
        record: Record | None = None, check_stop: CheckStop | None = None
        ) -> tuple[Any, dict[str, float]]:
  """`steps` optimizer steps of `trained` on `loss_fn`, one jitted program for all.

  Args:
    name: the fit's name in log lines ("vae fit").
    loss_fn: `(trained, frozen, batch, key) -> (loss, aux)`, aux a dict of scalars to log.
    trained: the params the fit changes.
    frozen: what the loss reads but the fit keeps (params, tables); an argument of the
      step, not a constant of its program.
    batches: the batches, one per step.
    optimizer: the optax transformation over `trained`.
    rng: step i draws from `fold_in(rng, i)`.
    log: receives a line every `LOG_EVERY` steps and at the last: the loss, aux, learning
      rate (with `schedule`), steps per second and the time left.
    schedule: the optimizer's learning rate, for the log.
    record: receives `(step, {loss, aux..., learning_rate})` every `RECORD_EVERY` steps and
      at the last (steps counted from 1): the fit's curves (`MetricsLog.scalars`).
    check_stop: called after each step; what it raises (`preemption.Stopped`) ends the fit.
  Returns:
    `(trained, metrics)`: the fitted params (device arrays) and the last step's `loss` and
    aux as floats.
  """

  @jax.jit
  def step(trained, opt_state, frozen, batch, key):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained, frozen, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, dict(aux, loss=loss)

  log(f"{name}: {steps} steps; compiling its step")
  opt_state = optimizer.init(trained)
  metrics: dict[str, Any] = {"loss": float("nan")}
  started = time.perf_counter()
  for index in range(steps):
    trained, opt_state, metrics = step(trained, opt_state, frozen, next(batches),
                                       jax.random.fold_in(rng, index))
    if record is not None and ((index + 1) % RECORD_EVERY == 0 or index == steps - 1):
      values = {key: float(value) for key, value in metrics.items()}
      if schedule is not None:
        values["learning_rate"] = float(schedule(index))
      record(index + 1, values)
    if index % LOG_EVERY == 0 or index == steps - 1:
      values = ", ".join(f"{key} {float(metrics[key]):.5f}"
                         for key in ["loss", *sorted(set(metrics) - {"loss"})])
      rate = "" if schedule is None else f", learning rate {float(schedule(index)):.2e}"
      elapsed = time.perf_counter() - started
      if index == 0:  # the first step compiles; the rate counts the steps after it
        timing, started = f"first step {elapsed:.1f} s with its compile", time.perf_counter()
      else:
        speed = index / elapsed
        timing = f"{speed:.1f} steps/s, {(steps - index - 1) / speed:.0f} s left"
      log(f"{name} {index + 1}/{steps}: {values}{rate} ({timing})")
    if check_stop is not None:
      check_stop(f"{name} step {index + 1}/{steps}")
  return trained, {key: float(value) for key, value in metrics.items()}


__all__ = ["CheckStop", "LOG_EVERY", "RECORD_EVERY", "Record", "SCHEDULES", "fit", "fit_schedule"]
