"""One JSON line in, one JSON line out: the loop of a benchmark worker.

A benchmark that compares frameworks runs each one in its own long-lived
process (so that they share no allocator, thread pool or imports) and drives
them from a parent over pipes. The worker side is ``serve(handlers)``; the
parent side is ``Worker``. This module imports only the standard library, so
that a worker's memory is its framework's and nothing else's.

Requests are ``{"cmd": name, ...}``; replies are JSON objects, or
``{"error": message}``. Every worker answers ``stats`` (its peak and current
resident memory) and ``quit``.

Example (worker side):

  >>> serve({'step': lambda req: {'step_s': run_one_step()}})  # doctest: +SKIP

Example (parent side):

  >>> w = Worker([sys.executable, '-m', 'experiments.bench.peft_worker'], 'peft')  # doctest: +SKIP
  >>> w.call('step')['step_s']  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from typing import Any, Callable, Sequence

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def _status_mb(field: str) -> float:
  """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) / 1024.0
  raise OSError(f'/proc/self/status has no {field} line')


def peak_rss_mb() -> float:
  """Peak resident memory of this process image (``VmHWM``), in MB.

  ``VmHWM`` starts afresh at ``exec``, unlike ``ru_maxrss``, which a child
  inherits from its parent.
  """
  return _status_mb('VmHWM')


def rss_mb() -> float:
  """Current resident memory of this process (``VmRSS``), in MB."""
  return _status_mb('VmRSS')


def serve(handlers: dict[str, Handler]) -> None:
  """Answers requests from stdin until ``quit`` or end of input.

  The protocol uses the process's original stdout; anything else written to
  stdout (library banners, prints) is sent to stderr so it cannot corrupt a
  reply.

  Args:
    handlers: command name -> function of the request dict returning the
      reply dict. ``stats`` and ``quit`` are built in.
  """
  channel = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  for line in sys.stdin:
    if not line.strip():
      continue
    request = json.loads(line)
    cmd = request.get('cmd')
    if cmd == 'quit':
      channel.write(json.dumps({'ok': True}) + '\n')
      break
    try:
      if cmd == 'stats':
        reply = {'peak_rss_mb': round(peak_rss_mb(), 1),
                 'rss_mb': round(rss_mb(), 1)}
      elif cmd in handlers:
        reply = handlers[cmd](request)
      else:
        reply = {'error': f'unknown command {cmd!r}; expected one of '
                          f'{sorted(handlers) + ["stats", "quit"]}'}
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      reply = {'error': f'{type(e).__name__}: {e}'}
    channel.write(json.dumps(reply) + '\n')
  channel.close()


class WorkerError(RuntimeError):
  """A worker answered with an error or died."""


class Worker:
  """The parent's handle on one worker process.

  Attributes:
    name: a label for messages.
  """

  def __init__(self, argv: Sequence[str], name: str, *,
               env: dict[str, str] | None = None, stderr: Any = None):
    self.name = name
    self._proc = subprocess.Popen(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=stderr, env=env, text=True, bufsize=1)

  def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
    """Sends one request and waits for its reply.

    Raises:
      WorkerError: the worker replied with an error or exited.
    """
    self._proc.stdin.write(json.dumps({'cmd': cmd, **fields}) + '\n')
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      code = self._proc.wait()
      raise WorkerError(f'worker {self.name} exited with status {code} '
                        f'during {cmd!r}')
    reply = json.loads(line)
    if 'error' in reply:
      raise WorkerError(f'worker {self.name} failed {cmd!r}: '
                        f'{reply["error"]}')
    return reply

  def close(self) -> None:
    """Asks the worker to quit and waits for it."""
    if self._proc.poll() is None:
      try:
        self.call('quit')
      except (WorkerError, BrokenPipeError, OSError):
        pass
    try:
      self._proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()

  def __enter__(self) -> Worker:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
