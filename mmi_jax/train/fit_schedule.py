"""The learning-rate schedule of the fits that stand in for pretrained weights.

`train.vae_fit`, `train.decoder_fit` and `train.decoder_fit_after_training` each name a
`schedule`: "constant" (`learning_rate` throughout), or "cosine": a linear warm-up from 0 over
`warmup_steps` (at most `steps`), then half a cosine down to 2% of `learning_rate` at `steps`.
"""

from __future__ import annotations

from typing import Any

import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(fit: Any, where: str) -> optax.Schedule:
  """The schedule of the fit settings `fit` (steps, learning_rate, schedule, warmup_steps);
  `where` names them in errors ("train.vae_fit")."""
  rate, steps = float(fit.learning_rate), int(fit.steps)
  if fit.schedule == "constant":
    return optax.constant_schedule(rate)
  if fit.schedule == "cosine":
    warmup = min(int(fit.warmup_steps), steps)
    return optax.warmup_cosine_decay_schedule(0.0, rate, warmup, max(steps, warmup + 1),
                                              end_value=0.02 * rate)
  raise ValueError(f"{where}.schedule must be one of {SCHEDULES}, got {fit.schedule!r}")


__all__ = ["SCHEDULES", "learning_rate_schedule"]
