"""One training run per workdir: an exclusive lock that dies with its process.

`WorkdirLock(workdir)` takes `fcntl.flock` on `workdir/run.lock` and writes who holds it (host,
process id, start time) into the file. The kernel releases the lock when the process ends,
however it ends (a crash or `kill -9` included), so a stale file never blocks the next run. A
second run on the same workdir is refused with a message naming the holder. In a
multi-process job, process 0 holds it for all.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from mmi_jax.command_line import UsageError

LOCK_FILE = "run.lock"


class WorkdirLock:
  """Context manager: held from `__enter__` to `__exit__` (or the process's end)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._descriptor: int | None = None

  def __enter__(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      with os.fdopen(descriptor) as file:
        holder = file.read().strip() or "another process"
      raise UsageError(f"--workdir: {os.path.dirname(self.path)} is in use by another run "
                       f"({holder}); wait for it to end or use another workdir") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    self._descriptor = descriptor
    return self

  def __exit__(self, *exc) -> None:
    if self._descriptor is not None:
      fcntl.flock(self._descriptor, fcntl.LOCK_UN)
      os.close(self._descriptor)
      self._descriptor = None


__all__ = ["LOCK_FILE", "WorkdirLock"]
