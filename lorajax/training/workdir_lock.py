"""One run a workdir: a lock file held with ``flock`` while the run lasts.

``<workdir>/run.lock`` holds the holder's host, pid, start time and command
line. The kernel releases an ``flock`` when its process dies, however it
dies (SIGKILL, OOM, a power loss), so a second process that cannot take the
lock knows the holder is alive and refuses at once, naming it; one that
takes the lock over a file still naming another process reports that
stale holder in a note. A clean exit empties the file (it is never removed:
removing it would race with a process that has just opened it).

Example:

  >>> import tempfile
  >>> with hold(tempfile.mkdtemp()) as holder:
  ...   sorted(holder)
  ['argv', 'host', 'pid', 'started']
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable, Iterator

from absl import logging

LOCK_FILE = 'run.lock'


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir."""


def _describe(holder: dict) -> str:
  return (f'pid {holder.get("pid")} on host {holder.get("host")!r}, started '
          f'{holder.get("started")}'
          + (f' ({" ".join(holder["argv"])[:200]})' if holder.get('argv')
             else ''))


def _read(f) -> dict:
  f.seek(0)
  text = f.read()
  try:
    return json.loads(text) if text.strip() else {}
  except ValueError:
    return {'unreadable': text[:200]}


@contextlib.contextmanager
def hold(workdir: str, *, note: Callable[[str], None] = logging.warning
         ) -> Iterator[dict]:
  """Holds ``<workdir>/run.lock`` while the block runs.

  Args:
    workdir: an existing folder.
    note: receives the sentence about a stale lock taken over.

  Yields:
    The holder record written (host, pid, started, argv).

  Raises:
    WorkdirLocked: naming the live holder, when another process holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  f = os.fdopen(fd, 'r+', encoding='utf-8')
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(f)
      raise WorkdirLocked(
          f'workdir {workdir} is in use by another run: '
          f'{_describe(holder) if "pid" in holder else "(holder unknown)"}. '
          f'Wait for it to finish, stop it, or pass another --workdir. '
          f'(Lock file: {path})') from None
    previous = _read(f)
    if previous:
      note(f'took over the lock of {workdir} from a run that ended without '
           f'releasing it: {_describe(previous)}')
    holder = {'host': socket.gethostname(), 'pid': os.getpid(),
              'started': time.strftime('%Y-%m-%d %H:%M:%S %z'),
              'argv': list(sys.argv)}
    f.seek(0)
    f.truncate()
    json.dump(holder, f)
    f.flush()
    os.fsync(f.fileno())
    try:
      yield holder
    finally:
      f.seek(0)
      f.truncate()
      f.flush()
      fcntl.flock(f, fcntl.LOCK_UN)
  finally:
    f.close()
