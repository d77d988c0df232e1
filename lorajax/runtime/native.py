"""Shared libraries lorajax builds from its own C and C++ sources.

Two pieces of lorajax are native code shipped as source (package data) and
built on first use with the machine's compiler, once per version of the
source, the flags and the CPU: the block cache (``block_cache.c``, see
:mod:`lorajax.runtime.host_memory`) and the fused CPU attention
(``attention_cpu.cc``, see :mod:`lorajax.runtime.cpu_attention`). Builds go
to ``$XDG_CACHE_HOME/lorajax`` (default ``~/.cache/lorajax``), are written
under a temporary name and renamed into place, so a concurrent build wins or
loses whole and a killed one leaves no half-written library behind.

Example:

  >>> cache_dir().endswith('lorajax')
  True
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence


def cache_dir() -> str:
  """Where native builds go: ``$XDG_CACHE_HOME/lorajax`` (default
  ``~/.cache/lorajax``)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(base, 'lorajax')


def _cpu_signature() -> str:
  """The CPU's model and feature flags (a build with ``-march=native`` is
  only valid on a CPU like the one it was built on)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      lines = [ln for ln in f if ln.startswith(('model name', 'flags'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def find_compiler(variable: str, names: Sequence[str]) -> str | None:
  """``$variable`` if set, else the first of ``names`` on ``PATH``."""
  chosen = os.environ.get(variable)
  for name in ([chosen] if chosen else []) + list(names):
    path = shutil.which(name)
    if path:
      return path
  return None


def build(source: str, prefix: str, compiler: str, flags: Sequence[str],
          libraries: Sequence[str] = (), directory: str | None = None,
          per_cpu: bool = False) -> str:
  """``source`` built as a shared library (once; later calls find it); its
  path.

  Args:
    source: the C or C++ file.
    prefix: the start of the library's file name.
    compiler: the compiler's path.
    flags: compiler flags (``-shared -fPIC`` and ``-o`` are added).
    libraries: linker arguments after the source (``-ldl``).
    directory: where to build; default :func:`cache_dir`.
    per_cpu: the build depends on the CPU (``-march=native``): its name
      carries the CPU's model and flags.

  Raises:
    RuntimeError: the compiler failed (the end of its message included).
  """
  digest = hashlib.sha256()
  with open(source, 'rb') as f:
    digest.update(f.read())
  digest.update(repr((os.path.basename(compiler), list(flags),
                      list(libraries))).encode())
  if per_cpu:
    digest.update(_cpu_signature().encode())
  directory = directory or cache_dir()
  path = os.path.join(directory, f'{prefix}{digest.hexdigest()[:16]}.so')
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  partial = f'{path}.partial-{os.getpid()}'
  done = subprocess.run(
      [compiler, *flags, '-shared', '-fPIC', '-o', partial, source,
       *libraries], capture_output=True, text=True, check=False)
  if done.returncode != 0:
    if os.path.exists(partial):
      os.remove(partial)
    raise RuntimeError(f'{compiler} could not build {source}: '
                       f'{done.stderr.strip()[-2000:]}')
  os.replace(partial, path)
  return path
