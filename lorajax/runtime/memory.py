"""Resident memory of this process, from ``/proc/self/status`` (Linux).

``peak_rss_bytes`` reads ``VmHWM``, the high-water mark of this process
image. It starts afresh at ``exec``, so a run launched as a subprocess
reports only its own peak. ``resource.getrusage(...).ru_maxrss`` does not:
a child inherits its parent's peak across ``fork``/``exec``, so every
child of a large parent would report the parent's size.

Example:

  >>> peak_rss_bytes() is None or peak_rss_bytes() > 0
  True
"""

from __future__ import annotations

_STATUS = '/proc/self/status'


def _status_bytes(field: str) -> int | None:
  """A ``kB`` field of ``/proc/self/status`` in bytes; None if unavailable."""
  try:
    with open(_STATUS, encoding='ascii') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def peak_rss_bytes() -> int | None:
  """Peak resident set size of this process (``VmHWM``), or None off Linux."""
  return _status_bytes('VmHWM')


def rss_bytes() -> int | None:
  """Current resident set size of this process (``VmRSS``), or None."""
  return _status_bytes('VmRSS')
