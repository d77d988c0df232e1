"""What a run shows a person, and where the library chatter goes instead.

A run's terminal (stdout) gets four things: the setup summary, one progress
display, evaluation lines and the final summary, last. Everything logged at
INFO while the run lasts -- Orbax's checkpoint chatter, absl, JAX, lorajax's
own records of matched rules and timings -- goes to ``<workdir>/info.log``
(``capture_logs``); WARNING and above still reach stderr.

The progress display (``Progress``) is a tqdm bar when stdout is a terminal.
When it is not (a log file, CI, a sweep's run log) a bar would be thousands
of carriage-return fragments, so it prints a plain line every ~10% of the
run (sooner when steps are slow) instead::

  step 120/400 (30%)  loss 0.5121  1,906 tokens/s  elapsed 0:51  ETA 1:59

Only process 0 prints.

Example (stdout is not a terminal here):

  >>> progress = Progress(20, 0, tty=False, lines=2)
  >>> for step in range(1, 21):
  ...   progress.update(step, loss=0.5, tokens=1000, seconds=0.5)
  step 10/20 ( 50%)  loss 0.5000  2,000 tokens/s  elapsed 0:00  ETA 0:00
  step 20/20 (100%)  loss 0.5000  2,000 tokens/s  elapsed 0:00  ETA 0:00
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import math
import os
import sys
import time
from typing import Callable, Iterator, TextIO, TypeVar

from absl import logging as absl_logging
import jax
import tqdm

T = TypeVar('T')

LOG_FILE = 'info.log'


def log_path(workdir: str) -> str:
  """``<workdir>/info.log`` (``info.p<i>.log`` on process ``i`` > 0)."""
  index = jax.process_index()
  name = LOG_FILE if index == 0 else f'info.p{index}.log'
  return os.path.join(workdir, name)


def _prints_to_terminal(handler: logging.Handler) -> bool:
  """A handler that writes to the console: absl's, or a stream handler
  that is not a file (pytest's capture handlers count; they only hold)."""
  if isinstance(handler, absl_logging.ABSLHandler):
    return True
  return (isinstance(handler, logging.StreamHandler)
          and not isinstance(handler, logging.FileHandler))


def quietly(fn: Callable[[], T]) -> T:
  """``fn()`` with the console's log handlers at WARNING: for a call that
  starts JAX's backend (``jax.process_index()``) before ``capture_logs``
  has a file to send its INFO records to."""
  root = logging.getLogger()
  quieted = [(h, h.level) for h in root.handlers if _prints_to_terminal(h)]
  try:
    for handler, level in quieted:
      handler.setLevel(max(level, logging.WARNING))
    return fn()
  finally:
    for handler, level in quieted:
      handler.setLevel(level)


@contextlib.contextmanager
def capture_logs(workdir: str) -> Iterator[str]:
  """Sends INFO logging to ``log_path(workdir)`` while the block runs.

  The root logger (which absl's, Orbax's and JAX's records reach) gets a
  file handler in absl's format and is opened to INFO; the handlers that
  print to the console are raised to WARNING. If the root logger had no
  console handler (a plain script without ``app.run``) one for WARNING is
  added, so warnings and errors still show. Everything is put back when the
  block exits.

  Yields:
    The log file's path (appended to when a run resumes).
  """
  root = logging.getLogger()
  root_level = root.level
  quieted = [(h, h.level) for h in root.handlers if _prints_to_terminal(h)]
  added = []
  try:
    for handler, level in quieted:
      handler.setLevel(max(level, logging.WARNING))
    if not quieted:
      stderr = logging.StreamHandler(sys.stderr)
      stderr.setLevel(logging.WARNING)
      stderr.setFormatter(absl_logging.PythonFormatter())
      added.append(stderr)
    if root.level == logging.NOTSET or root.level > logging.INFO:
      root.setLevel(logging.INFO)
    # The file's name needs jax.process_index(), whose backend start-up
    # logs: hold those records until the file is open.
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=100)
    added.append(held)
    for handler in added:
      root.addHandler(handler)
    path = log_path(workdir)
    file_handler = logging.FileHandler(path, encoding='utf-8')
    file_handler.setFormatter(absl_logging.PythonFormatter())
    root.addHandler(file_handler)
    added.append(file_handler)
    held.setTarget(file_handler)
    held.flush()
    root.removeHandler(held)
    added.remove(held)
    yield path
  finally:
    root.setLevel(root_level)
    for handler in added:
      root.removeHandler(handler)
      handler.close()
    for handler, level in quieted:
      handler.setLevel(level)


def say(text: str, *, stream: TextIO | None = None) -> None:
  """Prints ``text`` for a person (process 0 only) and flushes."""
  if jax.process_index() == 0:
    print(text, file=stream or sys.stdout, flush=True)


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return (f'{h}:{rest // 60:02d}:{rest % 60:02d}' if h
          else f'{rest // 60}:{rest % 60:02d}')


class Progress:
  """The run's one progress display: step, loss, tokens/s, ETA.

  A tqdm bar on a terminal; otherwise a line every ``ceil(steps / lines)``
  steps, or sooner when the steps since the last line took ``every_s``
  seconds, and at the last step.

  Args:
    total: the run's last step.
    initial: the step it starts after (a resumed run's checkpoint).
    enabled: False shows no progress (``write`` still prints).
    stream: where to print; stdout by default.
    tty: force the bar (True) or the lines (False); default
      ``stream.isatty()``.
    lines: plain lines over the steps to go.
    every_s: at most this many seconds of training steps between plain
      lines.
  """

  def __init__(self, total: int, initial: int = 0, *, enabled: bool = True,
               stream: TextIO | None = None, tty: bool | None = None,
               lines: int = 10, every_s: float = 120.0):
    self._stream = stream or sys.stdout
    self._total, self._initial = int(total), int(initial)
    self._active = enabled and jax.process_index() == 0
    if tty is None:
      tty = hasattr(self._stream, 'isatty') and self._stream.isatty()
    self._bar = None
    if self._active and tty:
      self._bar = tqdm.tqdm(total=total, initial=initial, unit='step',
                            file=self._stream, dynamic_ncols=True,
                            smoothing=0.1)
    self._every = max(1, math.ceil((total - initial) / max(lines, 1)))
    self._every_s = every_s
    self._start = time.perf_counter()
    self._last_step = self._initial
    self._window = []  # (loss, tokens, seconds) since the last line

  def update(self, step: int, *, loss: float, tokens: int,
             seconds: float) -> None:
    """Records step ``step``: its loss, real tokens and step seconds."""
    if not self._active:
      return
    self._window.append((loss, tokens, seconds))
    if self._bar is not None:
      self._bar.set_postfix_str(
          f'loss={loss:.4f} tok/s={tokens / max(seconds, 1e-9):,.0f}',
          refresh=False)
      self._bar.update(1)
      return
    # Seconds of training steps only: evaluations and checkpoints print
    # their own lines, so a line after one would only repeat the last.
    step_time = sum(w[2] for w in self._window)
    on_schedule = (step % self._every == 0
                   and 2 * (step - self._last_step) >= self._every)
    if not (on_schedule or step == self._total
            or step_time >= self._every_s):
      return
    now = time.perf_counter()
    done = step - self._initial
    elapsed = now - self._start
    eta = elapsed / max(done, 1) * (self._total - step)
    mean_loss = sum(w[0] for w in self._window) / len(self._window)
    rate = sum(w[1] for w in self._window) / max(step_time, 1e-9)
    width = len(str(self._total))
    print(f'step {step:{width}d}/{self._total} '
          f'({100 * step / max(self._total, 1):3.0f}%)  loss {mean_loss:.4f}'
          f'  {rate:,.0f} tokens/s  elapsed {_clock(elapsed)}  '
          f'ETA {_clock(eta)}', file=self._stream, flush=True)
    self._window, self._last_step = [], step

  def write(self, line: str) -> None:
    """Prints a line (an evaluation) without breaking the bar."""
    if jax.process_index() != 0:
      return
    if self._bar is not None:
      self._bar.write(line, file=self._stream)
    else:
      print(line, file=self._stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
