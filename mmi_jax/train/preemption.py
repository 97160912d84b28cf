"""Stopping a job cleanly: SIGTERM (a preempted or cancelled job) and SIGINT (Ctrl-C).

While a `Preemption` is entered, either signal only sets a flag; the job checks it at the end
of each unit of work of every long phase (a train step, a fit step, a part of an evaluation)
with `check()`, which raises `Stopped` when a stop was asked for, so that the job saves what it
has and ends. A second signal of the same kind gives the process back its former handler and
delivers that signal to it again: Ctrl-C twice interrupts at once (`KeyboardInterrupt`), two
SIGTERMs end the process as SIGTERM does.

In a multi-process job every process checks at the same points, and `check()` tells every
process whether any of them received a signal (a collective), so that all stop at the same
step.
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """A stop was asked for (SIGTERM or SIGINT); the phase under way ended early.

  Attributes:
    where: the phase that noticed it ("train step 4", "decoder fit step 30/400").
  """

  def __init__(self, where: str, signal_name: str):
    super().__init__(f"{signal_name} during {where}")
    self.where = where
    self.signal_name = signal_name


class Preemption:
  """Context manager: SIGTERM and SIGINT become a flag (`requested`: the first signal's name,
  or None) from `__enter__` to `__exit__`, which gives both signals back to their handlers."""

  def __init__(self):
    self.requested: str | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "Preemption":
    for number in SIGNALS:
      self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}

  def _handle(self, number: int, frame) -> None:
    name = signal.Signals(number).name
    if self.requested == name:  # the second of its kind: the former handler takes it
      signal.signal(number, self._previous.pop(number, signal.SIG_DFL))
      signal.raise_signal(number)
      return
    self.requested = self.requested or name
    print(f"{name}: stopping at the end of the step under way (saving what is done); "
          f"{'Ctrl-C' if number == signal.SIGINT else name} again to stop at once", flush=True)

  def any_process(self) -> str | None:
    """The name of the signal that asks to stop, received by this or any other process (a
    collective in a multi-process job); None when none did."""
    if jax.process_count() == 1:
      return self.requested
    index = SIGNALS.index(signal.Signals[self.requested]) + 1 if self.requested else 0
    gathered = np.asarray(multihost_utils.process_allgather(np.int32(index)))
    first = int(gathered[gathered > 0].min()) if np.any(gathered > 0) else 0
    return SIGNALS[first - 1].name if first else None

  def check(self, where: str) -> None:
    """Raises `Stopped` naming `where` if a stop was asked for (in any process)."""
    name = self.any_process()
    if name:
      raise Stopped(where, name)


__all__ = ["Preemption", "SIGNALS", "Stopped"]
