"""Clean stops: SIGTERM and SIGINT end a run at a step boundary.

``stop_requests()`` installs handlers that only record the signal; the
training loop asks ``requested()`` after each step and, when one came,
finishes that step, writes a checkpoint, says where to resume and raises
``RunStopped`` -- a ``SystemExit`` whose code is the shell's for that
signal (143 for SIGTERM, 130 for SIGINT), so ``python -m lorajax.cli.train``
exits with it and no traceback (and no KeyboardInterrupt raised inside the
data iterator). A second Ctrl-C while the checkpoint is written stops at
once, as Ctrl-C usually does.

Handlers can only be installed from the main thread; elsewhere (a run in a
thread) the block runs without them.

Example:

  >>> import os, signal
  >>> with stop_requests() as stop:
  ...   os.kill(os.getpid(), signal.SIGTERM)
  ...   stop.signum == signal.SIGTERM, exit_code(stop.signum)
  (True, 143)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(SystemExit):
  """A run stopped by a signal after writing its checkpoint.

  ``code`` is 128 + the signal number; ``step`` the step saved.
  """

  def __init__(self, code: int, step: int, message: str):
    super().__init__(code)
    self.step = step
    self.message = message

  def __str__(self) -> str:
    return self.message


class StopRequest:
  """The first stop signal received (``signum``; None until one comes)."""

  def __init__(self):
    self.signum: int | None = None

  def __bool__(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ''


def exit_code(signum: int) -> int:
  """The status a shell reports for a process ended by ``signum``."""
  return 128 + int(signum)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
  """Records SIGTERM/SIGINT in the yielded ``StopRequest`` while the block
  runs; the previous handlers come back after it."""
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return

  def handler(signum, frame):
    del frame
    if request and signum == signal.SIGINT:   # A second Ctrl-C: now.
      raise KeyboardInterrupt
    request.signum = signum

  previous = {s: signal.signal(s, handler) for s in SIGNALS}
  try:
    yield request
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
