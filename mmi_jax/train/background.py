"""Jobs run in one background thread, in the order given: the training command's compiles.

XLA compiles outside Python's lock, so a program lowered on the main thread compiles here
while the main thread initialises, fits or restores params, or trains: on a CPU each of these
takes minutes. Lowering (tracing) stays on the main thread: it reads the mesh and the logical
axis rules from context.

The thread is a daemon: a training command that fails while a compile is under way exits at
once instead of waiting for the compile to end.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable


class Worker:
  """One daemon thread running `submit`ted jobs one after another (so that two compiles do
  not take turns on the cores the main thread also needs)."""

  def __init__(self, name: str = "mmi_jax background"):
    self._jobs: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._run, name=name, daemon=True).start()

  def submit(self, function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """Queues `function(*args)`; the future holds its result or its exception."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._jobs.put((future, function, args))
    return future

  def _run(self) -> None:
    while True:
      future, function, args = self._jobs.get()
      if not future.set_running_or_notify_cancel():
        continue
      try:
        future.set_result(function(*args))
      except BaseException as error:  # noqa: BLE001 (re-raised by future.result())
        future.set_exception(error)


__all__ = ["Worker"]
