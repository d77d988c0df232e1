r"""Keeping a CPU run's large buffers mapped from one train step to the next.

XLA's CPU runtime allocates a step's temporaries as one buffer at the start
of each execution and frees it at the end: 0.51 GB for the MiniLM q/v LoRA
step at 32x128 tokens, 4.1 GB for SmolLM2-135M at 8x256. glibc's malloc
serves any block over 32 MiB with ``mmap`` and returns it with ``munmap``,
so the kernel maps and zeroes that buffer again every step, one 4 KiB page
fault at a time. Measured on a 2-core AMD EPYC (``getrusage`` around each
step): ~108-126 k minor faults a MiniLM step (0.3-0.5 s of system CPU
time), ~1.08 M a SmolLM2 step (3.1-4.8 s).

With ``LORAJAX_HOST_PAGES=kept``, the lorajax commands (``lorajax-train``,
``-evaluate``, ``-profile``) re-execute the same command line once with
lorajax's block cache preloaded (``LD_PRELOAD``; :func:`relaunch`), as CPU
launchers of the field do with their allocator (Intel's ``ipexrun``
preloads jemalloc or tcmalloc). The cache (``block_cache.c``, built once
with the system C compiler into ``~/.cache/lorajax``) serves every request
of at least 64 MiB (``LORAJAX_BLOCK_MIN`` bytes) from its own mapping and,
when it is freed, keeps that mapping whole for the next request of the same
size class; everything smaller goes to glibc untouched. A request no cached
block fits (the program is setting up, or its shapes changed) unmaps what
is cached first, so blocks of an earlier phase are not held.

Measured with ``python -m experiments.bench.host_pages`` (each setting in
fresh processes, alternated, alone under ``chrt -f 1``; medians of steps
2-6, glibc's defaults against the cache):

* MiniLM q/v 32x128: 1,803-1,877 against 1,405-1,759 ms; 108 k faults
  against 0-36; peak RSS 1,280-1,290 against 1,323-1,364 MB;
* SmolLM2-135M q/v 8x256: 13,794 against 11,357 ms; 1.08 M faults against
  47 k (glibc's own smaller blocks); system time 4.1 against 0.5 s; peak
  RSS 5,422 against 5,495 MB.

An earlier form set three glibc tunables instead (``arena_max=1``,
``mmap_max=0``, ``trim_threshold=2**46``: every block from one heap that is
never trimmed). It was dropped: small allocations split a freed step buffer
in that heap, the next step's buffer no longer fits the hole, and the heap
grows by a whole buffer which is faulted in afresh. It depends on the heap's
layout, so it comes and goes with unrelated changes: SmolLM2 with a chunked
loss held 7.7 GB against 4.7 GB; a small test step faulted all of its
10,240 pages again in one run of two after three more modules were
imported. The cache never splits its blocks.

Nothing happens without the switch, off Linux/glibc, when an accelerator
plugin (CUDA, ROCm, TPU) is installed and ``JAX_PLATFORMS`` does not say
``cpu``, or without a C compiler (each said on stderr). A script of your
own gets the same from::

  LD_PRELOAD=$(python -c 'from lorajax.runtime import host_memory as h; \
      print(h.block_cache_library())') LORAJAX_HOST_PAGES=kept python my_run.py

Example:

  >>> env = environ({'LD_PRELOAD': '/opt/libother.so'})
  >>> env['LD_PRELOAD'].split(':')[1]   # the user's own preload is kept
  '/opt/libother.so'
  >>> preloaded(env), env['LORAJAX_HOST_PAGES']
  (True, 'kept')
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

from absl import logging

from lorajax.runtime import native

# The variable and the value that turn the block cache on (off by default:
# it preloads a library into the process).
SWITCH = 'LORAJAX_HOST_PAGES'
ON = 'kept'
# The cache's source (package data), and the file name its builds start with.
_SOURCE = os.path.join(os.path.dirname(__file__), 'block_cache.c')
_PREFIX = 'block_cache-'
# Accelerator plugins: with one installed the backend may not be the CPU.
_ACCELERATOR_MODULES = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')


def cache_dir() -> str:
  """Where the block cache is built: ``$XDG_CACHE_HOME/lorajax`` (default
  ``~/.cache/lorajax``)."""
  return native.cache_dir()


def block_cache_library(directory: str | None = None) -> str:
  """The block cache built as a shared library, once per version of its
  source (``$CC``, else ``cc``, else ``gcc``), in ``directory`` (default
  :func:`cache_dir`); its path.

  Raises:
    RuntimeError: no C compiler, or it failed (its message included).
  """
  compiler = native.find_compiler('CC', ('cc', 'gcc'))
  if compiler is None:
    raise RuntimeError(
        f'{SWITCH}={ON} needs a C compiler to build {_SOURCE} '
        f'(none of $CC, cc, gcc on PATH)')
  return native.build(_SOURCE, _PREFIX, compiler, ['-O2'],
                      ['-ldl', '-lpthread'], directory)


def preloaded(env: Mapping[str, str] | None = None) -> bool:
  """Whether ``env`` (default: this process's) preloads a block cache."""
  env = os.environ if env is None else env
  entries = env.get('LD_PRELOAD', '').replace(' ', ':').split(':')
  return any(os.path.basename(p).startswith(_PREFIX) for p in entries)


def environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of ``base`` (default: ``os.environ``) with the switch on and
  ``LD_PRELOAD`` starting with the block cache (built if needed, see
  :func:`block_cache_library`); libraries already preloaded stay."""
  env = dict(os.environ if base is None else base)
  env[SWITCH] = ON
  if not preloaded(env):
    env['LD_PRELOAD'] = ':'.join(filter(None, [
        block_cache_library(), env.get('LD_PRELOAD', '')]))
  return env


def without(base: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of ``base`` (default: ``os.environ``) with the switch off and
  the block cache out of ``LD_PRELOAD`` (other preloads stay)."""
  env = dict(os.environ if base is None else base)
  env.pop(SWITCH, None)
  entries = [p for p in env.get('LD_PRELOAD', '').replace(' ', ':').split(':')
             if p and not os.path.basename(p).startswith(_PREFIX)]
  if entries:
    env['LD_PRELOAD'] = ':'.join(entries)
  else:
    env.pop('LD_PRELOAD', None)
  return env


def why_not(env: Mapping[str, str] | None = None) -> str | None:
  """Why the block cache does not apply to a run started with ``env``;
  None when it does (the switch is on and :func:`unsupported` finds
  nothing)."""
  env = os.environ if env is None else env
  if env.get(SWITCH, '').lower() != ON:
    return f'{SWITCH} is not {ON!r}'
  return unsupported(env)


def unsupported(env: Mapping[str, str] | None = None) -> str | None:
  """Why the block cache could not apply to a run started with ``env``
  even with the switch on (not Linux/glibc, not a CPU run); None when it
  could."""
  env = os.environ if env is None else env
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
    return f'not Linux with glibc ({sys.platform}, {platform.libc_ver()[0]!r})'
  platforms = [p.strip() for p in env.get('JAX_PLATFORMS', '').split(',')
               if p.strip()]
  if platforms:
    if platforms != ['cpu']:
      return f'JAX_PLATFORMS={env["JAX_PLATFORMS"]!r} is not the CPU alone'
    return None
  for name in _ACCELERATOR_MODULES:
    if importlib.util.find_spec(name) is not None:
      return f'{name} is installed (set JAX_PLATFORMS=cpu for a CPU run)'
  return None


def relaunch() -> None:
  """Re-executes this command with the block cache preloaded when the
  switch is on and it is not preloaded yet; returns (having done nothing)
  otherwise, saying why on stderr when the switch is on but the cache
  cannot apply (:func:`unsupported`, no C compiler).

  Call it first in a command's entry point, before any computation: the
  process image is replaced, so nothing done before survives. The command
  line is ``sys.orig_argv``, so ``python -m pkg.mod --flag`` and console
  scripts come back as they were started.
  """
  if os.environ.get(SWITCH, '').lower() != ON or preloaded():
    return
  reason = unsupported()
  env = None
  if reason is None:
    try:
      env = environ()
    except RuntimeError as e:
      reason = str(e)
  if env is None:
    print(f'lorajax: {SWITCH}={ON} ignored: {reason}', file=sys.stderr,
          flush=True)
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError as e:  # exec refused (a sandbox): run as we are
    logging.warning('host pages: could not re-execute with the block cache '
                    '(%s); running with glibc defaults', e)


def active() -> bool:
  """Whether this process runs with the block cache preloaded and it
  applies (switched on; Linux, glibc, a CPU run)."""
  return preloaded() and why_not() is None
