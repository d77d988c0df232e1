"""``lorajax.runtime.host_memory``: the glibc tunables that keep a CPU
step's buffers mapped, the commands' relaunch with them, and the page
faults they save."""

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

from lorajax.runtime import host_memory

_TUNABLES = ':'.join(f'{k}={v}' for k, v in host_memory.TUNABLES)

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
    for _ in range(4):
      r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(c(ws, x))
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
    print(kept, c.memory_analysis().temp_size_in_bytes // 4096, faults)
""")


def _env(**changes):
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', host_memory.SWITCH)}
  env['JAX_PLATFORMS'] = 'cpu'
  env.update(changes)
  return env


def _python(code, env, *args):
  out = subprocess.run([sys.executable, '-c', code, *args], env=env,
                       capture_output=True, text=True, timeout=300)
  if out.returncode:
    raise AssertionError(out.stderr[-3000:])
  return out.stdout.split()


class EnvironTest(absltest.TestCase):

  def test_adds_every_tunable_to_an_empty_environment(self):
    env = host_memory.environ({'HOME': '/h'})
    self.assertEqual(env['GLIBC_TUNABLES'], _TUNABLES)
    self.assertEqual(env['LORAJAX_HOST_PAGES'], 'kept')
    self.assertEqual(env['HOME'], '/h')
    self.assertTrue(host_memory.tunables_set(env))
    self.assertFalse(host_memory.tunables_set({'HOME': '/h'}))

  def test_keeps_the_users_tunables_and_values(self):
    env = host_memory.environ(
        {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.mmap_max=7'})
    parts = env['GLIBC_TUNABLES'].split(':')
    self.assertEqual(parts[:2], ['glibc.malloc.arena_max=2',
                                 'glibc.malloc.mmap_max=7'])
    self.assertEqual([p for p in parts if p.startswith('glibc.malloc.mmap')],
                     ['glibc.malloc.mmap_max=7'])   # not overridden
    self.assertIn('glibc.malloc.trim_threshold=' + str(2**46), parts)

  def test_is_idempotent(self):
    once = host_memory.environ({})
    self.assertEqual(host_memory.environ(once), once)

  def test_does_not_touch_the_mapping_it_reads(self):
    base = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
    host_memory.environ(base)
    self.assertEqual(base, {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})


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
           'import os, sys; print(os.environ.get("GLIBC_TUNABLES", "-"), '
           'h.active(), sys.argv[1])')

  def setUp(self):
    super().setUp()
    if host_memory.unsupported({'JAX_PLATFORMS': 'cpu'}) is not None:
      self.skipTest(host_memory.unsupported({'JAX_PLATFORMS': 'cpu'}))

  def test_relaunches_once_with_the_tunables_and_the_same_arguments(self):
    tunables, kept, arg = _python(self._CODE, _env(LORAJAX_HOST_PAGES='kept'),
                                  'an-argument')
    self.assertEqual(tunables, _TUNABLES)
    self.assertEqual((kept, arg), ('True', 'an-argument'))

  def test_without_the_switch_runs_as_started(self):
    tunables, kept, _ = _python(self._CODE, _env(), 'x')
    self.assertEqual((tunables, kept), ('-', 'False'))

  def test_a_jax_platform_other_than_cpu_runs_as_started_and_says_so(self):
    out = subprocess.run(
        [sys.executable, '-c', self._CODE, 'x'],
        env=_env(JAX_PLATFORMS='tpu', LORAJAX_HOST_PAGES='kept'),
        capture_output=True, text=True, timeout=300)
    self.assertEqual(out.stdout.split()[:2], ['-', 'False'])
    self.assertIn("LORAJAX_HOST_PAGES=kept ignored: JAX_PLATFORMS='tpu' is "
                  'not the CPU alone', out.stderr)


class CommandTest(absltest.TestCase):

  def test_lorajax_train_runs_relaunched_with_the_switch(self):
    if host_memory.unsupported({'JAX_PLATFORMS': 'cpu'}) is not None:
      self.skipTest(host_memory.unsupported({'JAX_PLATFORMS': 'cpu'}))
    config = pathlib.Path(__file__).parents[1] / 'configs/rt_minilm_lora.py'
    with tempfile.TemporaryDirectory() as workdir:
      out = subprocess.run(
          [sys.executable, '-m', 'lorajax.cli.train',
           f'--config={config}:smoke', f'--workdir={workdir}'],
          env=_env(LORAJAX_HOST_PAGES='kept'), capture_output=True,
          text=True, timeout=600)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertIn('host pages kept between steps (LORAJAX_HOST_PAGES=kept; '
                  f'glibc tunables {_TUNABLES})', out.stderr)


class PageFaultTest(absltest.TestCase):
  """What a user relies on: with the tunables, a repeated step does not
  fault its temporaries in again; without them it does."""

  def setUp(self):
    super().setUp()
    if host_memory.unsupported({'JAX_PLATFORMS': 'cpu'}) is not None:
      self.skipTest(host_memory.unsupported({'JAX_PLATFORMS': 'cpu'}))

  def test_kept_pages_take_almost_no_faults(self):
    kept, temp_pages, faults = _python(
        _FAULTS, _env(GLIBC_TUNABLES=_TUNABLES, LORAJAX_HOST_PAGES='kept'))
    self.assertEqual(kept, 'True')
    self.assertGreater(int(temp_pages), 4096)          # > 16 MiB of temps
    self.assertLess(int(faults), int(temp_pages) // 10)

  def test_glibc_defaults_fault_the_temporaries_every_step(self):
    kept, temp_pages, faults = _python(_FAULTS, _env())
    self.assertEqual(kept, 'False')
    self.assertGreater(int(faults), int(temp_pages) // 2)


if __name__ == '__main__':
  absltest.main()

