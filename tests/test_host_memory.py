"""``lorajax.runtime.host_memory``: the preloaded block cache that keeps a
CPU step's buffers mapped, the commands' relaunch with it, the page faults
it saves, and its malloc contract."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

from absl.testing import absltest

from lorajax.runtime import host_memory

# Runs a small jitted grad step four times; prints whether the pages are
# kept, the XLA temporaries in pages, and the minor faults of the last call.
_FAULTS = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    import lorajax
    from lorajax.runtime import host_memory
    kept = host_memory.active()
    def loss(ws, x):
      for w in ws:
        x = jnp.tanh(x @ w)
      return (x * x).mean()
    ws = [jnp.full((256, 256), 1e-3)] * 3
    x = jnp.ones((8192, 256))
    c = jax.jit(jax.grad(loss)).lower(ws, x).compile(
        compiler_options=lorajax.compiler_options())
    per_step = []
    for _ in range(6):
      r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(c(ws, x))
      per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    # The median of steps 2-6: one step may refault when a request that no
    # cached block fits empties the cache (seen once in a full suite run).
    faults = sorted(per_step[1:])[2]
    print(kept, c.memory_analysis().temp_size_in_bytes // 4096, faults)
""")


def _skip_without_a_compiler(test):
  """The block cache is built with the system C compiler."""
  if not (shutil.which(os.environ.get('CC') or 'cc') or shutil.which('gcc')):
    test.skipTest('no C compiler to build the block cache')


def _skip_unless_it_applies(test):
  """Skips ``test`` off Linux/glibc and without a C compiler."""
  why = host_memory.unsupported({'JAX_PLATFORMS': 'cpu'})
  if why is not None:
    test.skipTest(why)
  _skip_without_a_compiler(test)


def _env(**changes):
  env = {k: v for k, v in os.environ.items()
         if k not in (host_memory.SWITCH, 'LD_PRELOAD')}
  env['JAX_PLATFORMS'] = 'cpu'
  env.update(changes)
  return env


def _run(code, env, *args):
  return subprocess.run([sys.executable, '-c', code, *args], env=env,
                        capture_output=True, text=True, timeout=300)


def _python(code, env, *args):
  out = _run(code, env, *args)
  if out.returncode:
    raise AssertionError(out.stderr[-3000:])
  return out.stdout.split()


class EnvironTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    _skip_without_a_compiler(self)

  def test_preloads_the_block_cache_and_sets_the_switch(self):
    env = host_memory.environ({'HOME': '/h'})
    self.assertEqual(env['LD_PRELOAD'], host_memory.block_cache_library())
    self.assertEqual(env['LORAJAX_HOST_PAGES'], 'kept')
    self.assertEqual(env['HOME'], '/h')
    self.assertTrue(host_memory.preloaded(env))
    self.assertFalse(host_memory.preloaded({'HOME': '/h'}))

  def test_keeps_the_users_preloads(self):
    env = host_memory.environ({'LD_PRELOAD': '/a/libx.so /b/liby.so'})
    self.assertEqual(env['LD_PRELOAD'].split(':'),
                     [host_memory.block_cache_library(),
                      '/a/libx.so /b/liby.so'])
    self.assertEqual(host_memory.without(env)['LD_PRELOAD'],
                     '/a/libx.so:/b/liby.so')
    self.assertNotIn('LORAJAX_HOST_PAGES', host_memory.without(env))
    self.assertNotIn('LD_PRELOAD',
                     host_memory.without(host_memory.environ({})))

  def test_is_idempotent(self):
    once = host_memory.environ({})
    self.assertEqual(host_memory.environ(once), once)

  def test_does_not_touch_the_mapping_it_reads(self):
    base = {'LD_PRELOAD': '/a/libx.so'}
    host_memory.environ(base)
    host_memory.without(base)
    self.assertEqual(base, {'LD_PRELOAD': '/a/libx.so'})


class WhyNotTest(absltest.TestCase):

  def test_off_unless_switched_on(self):
    self.assertEqual(host_memory.why_not({'JAX_PLATFORMS': 'cpu'}),
                     "LORAJAX_HOST_PAGES is not 'kept'")
    self.assertEqual(
        host_memory.why_not({'JAX_PLATFORMS': 'cpu',
                             'LORAJAX_HOST_PAGES': 'default'}),
        "LORAJAX_HOST_PAGES is not 'kept'")

  def test_an_accelerator_platform_is_named(self):
    reason = host_memory.why_not({'JAX_PLATFORMS': 'cuda,cpu',
                                  'LORAJAX_HOST_PAGES': 'kept'})
    self.assertIn("JAX_PLATFORMS='cuda,cpu'", reason)

  def test_cpu_alone_applies_on_linux_glibc(self):
    if not sys.platform.startswith('linux'):
      self.skipTest('Linux only')
    self.assertIsNone(host_memory.why_not({'JAX_PLATFORMS': 'cpu',
                                           'LORAJAX_HOST_PAGES': 'kept'}))


class RelaunchTest(absltest.TestCase):

  _CODE = ('from lorajax.runtime import host_memory as h; h.relaunch(); '
           'import os, sys; print(os.environ.get("LD_PRELOAD", "-"), '
           'h.active(), sys.argv[1])')

  def setUp(self):
    super().setUp()
    _skip_unless_it_applies(self)

  def test_relaunches_once_with_the_cache_and_the_same_arguments(self):
    preload, kept, arg = _python(self._CODE, _env(LORAJAX_HOST_PAGES='kept'),
                                 'an-argument')
    self.assertEqual(preload, host_memory.block_cache_library())
    self.assertEqual((kept, arg), ('True', 'an-argument'))

  def test_without_the_switch_runs_as_started(self):
    preload, kept, _ = _python(self._CODE, _env(), 'x')
    self.assertEqual((preload, kept), ('-', 'False'))

  def test_without_a_compiler_runs_as_started_and_says_so(self):
    with tempfile.TemporaryDirectory() as cache:
      out = _run(self._CODE, _env(
          LORAJAX_HOST_PAGES='kept', XDG_CACHE_HOME=cache,
          CC='no-such-compiler', PATH=os.path.dirname(sys.executable)), 'x')
    self.assertEqual(out.stdout.split()[:2], ['-', 'False'], out.stderr)
    self.assertIn('LORAJAX_HOST_PAGES=kept ignored: LORAJAX_HOST_PAGES=kept '
                  'needs a C compiler', out.stderr)

  def test_a_jax_platform_other_than_cpu_runs_as_started_and_says_so(self):
    out = _run(self._CODE,
               _env(JAX_PLATFORMS='tpu', LORAJAX_HOST_PAGES='kept'), 'x')
    self.assertEqual(out.stdout.split()[:2], ['-', 'False'])
    self.assertIn("LORAJAX_HOST_PAGES=kept ignored: JAX_PLATFORMS='tpu' is "
                  'not the CPU alone', out.stderr)


class CommandTest(absltest.TestCase):

  def test_lorajax_train_runs_relaunched_with_the_switch(self):
    _skip_unless_it_applies(self)
    config = pathlib.Path(__file__).parents[1] / 'configs/rt_minilm_lora.py'
    with tempfile.TemporaryDirectory() as workdir:
      out = subprocess.run(
          [sys.executable, '-m', 'lorajax.cli.train',
           f'--config={config}:smoke', f'--workdir={workdir}'],
          env=_env(LORAJAX_HOST_PAGES='kept'), capture_output=True,
          text=True, timeout=600)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertIn('host pages kept between steps (LORAJAX_HOST_PAGES=kept; '
                  f'LD_PRELOAD={host_memory.block_cache_library()})',
                  out.stderr)


class PageFaultTest(absltest.TestCase):
  """What a user relies on: with the block cache, a repeated step does not
  fault its temporaries in again; without it, it does."""

  def setUp(self):
    super().setUp()
    _skip_unless_it_applies(self)

  def test_cached_blocks_take_almost_no_faults(self):
    # The test's step has 40 MiB of temporaries: cache blocks from 8 MiB.
    kept, temp_pages, faults = _python(_FAULTS, _env(
        LD_PRELOAD=host_memory.block_cache_library(),
        LORAJAX_HOST_PAGES='kept', LORAJAX_BLOCK_MIN=str(8 << 20)))
    self.assertEqual(kept, 'True')
    self.assertGreater(int(temp_pages), 4096)          # > 16 MiB of temps
    self.assertLess(int(faults), int(temp_pages) // 10)

  def test_glibc_defaults_fault_the_temporaries_every_step(self):
    kept, temp_pages, faults = _python(_FAULTS, _env())
    self.assertEqual(kept, 'False')
    self.assertGreater(int(faults), int(temp_pages) // 2)


# The C library's allocation calls, made through ctypes in a process that
# preloads the block cache with a 1 MiB threshold.
_CONTRACT = textwrap.dedent("""
    import ctypes
    libc = ctypes.CDLL(None)
    for f in (libc.malloc, libc.calloc, libc.realloc, libc.aligned_alloc):
      f.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
    libc.malloc_usable_size.restype = ctypes.c_size_t
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.c_size_t, ctypes.c_size_t]
    big = 3 << 20
    a = libc.malloc(big)
    ctypes.memset(a, 0x5a, big)
    print('usable', libc.malloc_usable_size(a) >= big)
    libc.free(a)
    b = libc.malloc(big)                        # the same block, kept
    print('reused', b == a)
    libc.free(b)
    c = libc.calloc(big // 8, 8)                # a dirty block, zeroed
    print('zeroed', ctypes.string_at(c, big) == bytes(big))
    ctypes.memset(c, 0x33, big)
    d = libc.realloc(c, 2 * big)                # grows, keeps the bytes
    print('realloc', ctypes.string_at(d, big) == b'\x33' * big)
    e = libc.realloc(d, 100)                    # shrinks into glibc's heap
    print('shrink', ctypes.string_at(e, 100) == b'\x33' * 100)
    libc.free(e)
    p = ctypes.c_void_p()
    rc = libc.posix_memalign(ctypes.byref(p), 4096, big)
    print('memalign', rc == 0 and p.value % 4096 == 0)
    libc.free(p)
    q = libc.aligned_alloc(64, big)
    print('aligned', q % 64 == 0)
    libc.free(q)
    s = libc.malloc(100)                        # small: glibc's own
    print('small', libc.malloc_usable_size(s) < 4096)
    libc.free(s)
""")


class BlockCacheTest(absltest.TestCase):
  """The preloaded block cache keeps malloc's contract."""

  def setUp(self):
    super().setUp()
    _skip_unless_it_applies(self)

  def test_large_blocks_are_reused_zeroed_and_resized_correctly(self):
    out = _python(_CONTRACT, _env(
        LD_PRELOAD=host_memory.block_cache_library(),
        LORAJAX_BLOCK_MIN=str(1 << 20)))
    names = out[::2]
    self.assertEqual(names, ['usable', 'reused', 'zeroed', 'realloc',
                             'shrink', 'memalign', 'aligned', 'small'])
    self.assertEqual(dict(zip(names, out[1::2])),
                     dict.fromkeys(names, 'True'))

  def test_without_a_compiler_says_what_is_missing(self):
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(
        os.environ, {'CC': 'no-such-compiler', 'PATH': ''}):
      with self.assertRaisesRegex(RuntimeError, r'needs a C compiler'):
        host_memory.block_cache_library(cache)
      self.assertEqual(os.listdir(cache), [])

  def test_built_once_per_source(self):
    with tempfile.TemporaryDirectory() as cache:
      path = host_memory.block_cache_library(cache)
      mtime = os.stat(path).st_mtime_ns
      self.assertEqual(host_memory.block_cache_library(cache), path)
      self.assertEqual(os.stat(path).st_mtime_ns, mtime)
      self.assertEqual(os.listdir(cache), [os.path.basename(path)])


if __name__ == '__main__':
  absltest.main()

