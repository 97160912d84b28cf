"""The training job's log: lines on stdout, scalars in `metrics.jsonl` and TensorBoard.

Only process 0 writes; on the others every call does nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np
import tensorboardX


class MetricsLog:
  """Log lines (`log`), scalars and images of one job, under `workdir`.

  Args:
    workdir: `metrics.jsonl` (one JSON record per `scalars` call, appended) and
      `tensorboard/` go here.
    log: writes a line (print, by default).
  """

  def __init__(self, workdir: str, log: Callable[[str], None] = print):
    self.enabled = jax.process_index() == 0
    self.log = log if self.enabled else (lambda message: None)
    self._jsonl = self._writer = None
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
      self._writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
    """Records the numbers of `values` (others are skipped) under `prefix/<name>`."""
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
    """Records a `[H, W, 3]` uint8 picture in TensorBoard."""
    if self.enabled:
      self._writer.add_image(name, picture, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._writer.close()


__all__ = ["MetricsLog"]
