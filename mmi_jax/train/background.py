"""Jobs run in one background thread, in the order given: the training command's compiles.

XLA compiles outside Python's lock, so a program lowered on the main thread compiles here
while the main thread initialises, fits or restores params, or trains: on a CPU each of these
takes minutes. Lowering (tracing) stays on the main thread: it reads the mesh and the logical
axis rules from context.

A job's failure is kept in its future and raised where its result is asked for. A compile
cannot be interrupted, and a process must not end while one runs (the interpreter would abort
with "terminate called ..."): so `close()` cancels the jobs not yet started, and the thread
lets the interpreter exit only once the job under way has ended. The thread ends by itself
once the main thread has finished and no job is left.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable

_POLL_SECONDS = 0.2  # how often an idle thread looks whether the main thread has finished


class Worker:
  """One thread running `submit`ted jobs one after another (so that two compiles do not take
  turns on the cores the main thread also needs). A context manager: leaving it `close`s."""

  def __init__(self, name: str = "mmi_jax background"):
    self._jobs: queue.SimpleQueue = queue.SimpleQueue()
    self._closed = False
    # Not a daemon: the interpreter waits for the job under way before it exits.
    threading.Thread(target=self._run, name=name, daemon=False).start()

  def __enter__(self) -> "Worker":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def submit(self, function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """Queues `function(*args)`; the future holds its result or its exception."""
    if self._closed:
      raise RuntimeError("the background worker is closed")
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._jobs.put((future, function, args))
    return future

  def close(self) -> None:
    """Cancels the jobs not started yet; the one under way ends on its own."""
    self._closed = True
    while True:
      try:
        future, _, _ = self._jobs.get_nowait()
      except queue.Empty:
        return
      future.cancel()

  def _run(self) -> None:
    while True:
      try:
        future, function, args = self._jobs.get(timeout=_POLL_SECONDS)
      except queue.Empty:
        if self._closed or not threading.main_thread().is_alive():
          return
        continue
      if not future.set_running_or_notify_cancel():
        continue
      try:
        future.set_result(function(*args))
      except BaseException as error:  # noqa: BLE001 (raised again by future.result())
        future.set_exception(error)


__all__ = ["Worker"]
