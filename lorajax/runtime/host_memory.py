r"""Keeping a CPU run's freed memory mapped from one train step to the next.

XLA's CPU runtime allocates a step's temporaries as one buffer at the start
of each execution and frees it at the end: 0.51 GB for the MiniLM q/v LoRA
step at 32x128 tokens, 4.1 GB for SmolLM2-135M at 8x256. glibc's malloc
serves any block over 32 MiB with ``mmap`` and returns it with ``munmap``
(and a worker thread's arena cannot hold a block over 64 MiB at all), so the
kernel maps and zeroes that buffer again every step, one 4 KiB page fault at
a time. Measured on a 2-core AMD EPYC (``getrusage`` around each step):
~126 k minor faults a MiniLM step (0.4-0.5 s of system CPU time), ~1.06 M a
SmolLM2 step (3.1-3.8 s).

Three glibc tunables keep the pages. glibc reads them only when a process
starts (``GLIBC_TUNABLES``):

* ``glibc.malloc.arena_max=1``: every thread allocates from the main heap.
  XLA allocates the buffer on its dispatch thread, and a thread's own arena
  cannot hold a block over 64 MiB: such a block goes to ``mmap`` whatever
  else is set;
* ``glibc.malloc.mmap_max=0``: no block goes to ``mmap``; the main heap
  grows instead;
* ``glibc.malloc.trim_threshold=2**46``: freed memory at the top of the
  heap stays mapped.

Measured on a 2-core AMD EPYC (load 2-3), each pair in one run:

* ``python -m experiments.bench peft --sizes=minilm,flaxbert --targets=qv
  --host_pages=both``: the shipped MiniLM q/v step 2,024 vs 2,238 ms with
  glibc's defaults, a user's own plain Flax BERT 1,966 vs 3,362 ms; peak RSS
  1,053 vs 1,054 MB and 1,473 vs 1,463 MB (five workers alternated there;
  with two, the Flax BERT row took 2,309-2,446 ms with glibc's defaults in
  earlier runs, so its gain is nearer 15-20%);
* the main job for 50 steps (``lorajax-train --config.num_train_steps=50``,
  two runs each): 83 and 86 s against 101 and 90 s, 3.6-4.1 s of system CPU
  time against 18.7-21.2 s, peak RSS 1,145-1,238 MB against 1,218-1,253 MB.

Keeping every block in one heap can leave a hole that the next step's
buffer no longer fits, once small allocations have split it; the heap then
grows by one more buffer, which stays mapped. In the benchmark's SmolLM2
step with a chunked loss (3.4 GB of temporaries) the second step did so:
peak RSS 7.7 GB against 4.7 GB with glibc's defaults. The other rows
measured (MiniLM, a plain Flax BERT, SmolLM2 with whole logits, the main
job) kept their peak within 6% in the benchmark, but the same MiniLM step
alone in one process (``python -m experiments.bench.host_pages``) grew from
1,337 to 1,680 MB the same way.

Running XLA inline (``jax_cpu_enable_async_dispatch=False``, so the buffer
comes from the main thread's arena without ``arena_max``) also kept the
pages, but gave the main job 18% more peak RSS and no time back (50 steps:
93-95 s against 90-101 s).

With ``LORAJAX_HOST_PAGES=kept`` in the environment, the lorajax commands
(``lorajax-train``, ``-evaluate``, ``-profile``) re-execute the same command
line once with the tunables added (:func:`relaunch`; a few seconds of
imports), as CPU launchers of the field do with their allocator (Intel's
``ipexrun`` preloads jemalloc or tcmalloc). It is off by default because
of the growth above: where it happens, a run needs one step buffer more
memory than with glibc's defaults, and a machine sized for the latter would
kill it. A script of your own gets the same from::

  GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=70368744177664:glibc.malloc.arena_max=1 \
      LORAJAX_HOST_PAGES=kept python my_run.py

Nothing happens without the switch, off Linux/glibc, or when an
accelerator plugin (CUDA, ROCm, TPU) is installed and ``JAX_PLATFORMS``
does not say ``cpu``.

Example:

  >>> env = environ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  >>> env['GLIBC_TUNABLES'].split(':')[0]  # the user's own tunables come first
  'glibc.malloc.arena_max=2'
  >>> tunables_set(env), env['LORAJAX_HOST_PAGES']
  (True, 'kept')
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

from absl import logging

# The variable and the value that turn the tunables on (they are off by
# default: the heap can grow by a step buffer, see above).
SWITCH = 'LORAJAX_HOST_PAGES'
ON = 'kept'

TUNABLES = (
    ('glibc.malloc.mmap_max', '0'),
    ('glibc.malloc.trim_threshold', str(2**46)),
    ('glibc.malloc.arena_max', '1'),
)
# Accelerator plugins: with one installed the backend may not be the CPU.
_ACCELERATOR_MODULES = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')


def _parse(value: str) -> dict[str, str]:
  """``a=1:b=2`` as ``{'a': '1', 'b': '2'}`` (entries without ``=`` kept as
  keys with an empty value)."""
  out = {}
  for item in filter(None, value.split(':')):
    key, _, val = item.partition('=')
    out[key] = val
  return out


def tunables_set(env: Mapping[str, str] | None = None) -> bool:
  """Whether ``env`` (default: this process's) names every tunable of
  :data:`TUNABLES`, with any value (a user's own value is theirs)."""
  env = os.environ if env is None else env
  named = _parse(env.get('GLIBC_TUNABLES', ''))
  return all(key in named for key, _ in TUNABLES)


def environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of ``base`` (default: ``os.environ``) with the switch on and
  ``GLIBC_TUNABLES`` naming :data:`TUNABLES` too; tunables already there
  keep their values."""
  env = dict(os.environ if base is None else base)
  env[SWITCH] = ON
  current = env.get('GLIBC_TUNABLES', '')
  named = _parse(current)
  extra = [f'{k}={v}' for k, v in TUNABLES if k not in named]
  env['GLIBC_TUNABLES'] = ':'.join(filter(None, [current, *extra]))
  return env


def why_not(env: Mapping[str, str] | None = None) -> str | None:
  """Why the tunables do not apply to a run started with ``env``; None when
  they do (the switch is on and :func:`unsupported` finds nothing)."""
  env = os.environ if env is None else env
  if env.get(SWITCH, '').lower() != ON:
    return f'{SWITCH} is not {ON!r}'
  return unsupported(env)


def unsupported(env: Mapping[str, str] | None = None) -> str | None:
  """Why the tunables could not apply to a run started with ``env`` even
  with the switch on (not Linux/glibc, not a CPU run); None when they
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
  """Re-executes this command with :data:`TUNABLES` when they apply and are
  not set yet; returns (having done nothing) otherwise, saying why on
  stderr when the switch is on but :func:`unsupported` objects.

  Call it first in a command's entry point, before any computation: the
  process image is replaced, so nothing done before survives. The command
  line is ``sys.orig_argv``, so ``python -m pkg.mod --flag`` and console
  scripts come back as they were started.
  """
  if tunables_set():
    return
  if os.environ.get(SWITCH, '').lower() == ON and unsupported() is not None:
    print(f'lorajax: {SWITCH}={ON} ignored: {unsupported()}',
          file=sys.stderr, flush=True)
    return
  if why_not() is not None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, environ())
  except OSError as e:  # exec refused (a sandbox): run as we are
    logging.warning('host pages: could not re-execute with %s (%s); '
                    'running with glibc defaults', TUNABLES, e)


def active() -> bool:
  """Whether this process was started with :data:`TUNABLES` and they apply
  (switched on; Linux, glibc, a CPU run)."""
  return tunables_set() and why_not() is None

