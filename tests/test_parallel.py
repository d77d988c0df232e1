"""Parallel runners: jit, pmap and Mesh agree; shardings follow the rules.

The multi-device runs happen in subprocesses (``tests/parallel_worker.py``)
that set 8 fake CPU devices, or join a 2-process ``jax.distributed`` run on
127.0.0.1 with 4 devices each, before JAX starts; this process keeps its
single device.
"""

import json
import os
import subprocess
import sys
import types

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import portpicker
import pytest

import lorajax
from lorajax import spec as spec_lib
from lorajax.training import optim
from lorajax.training import parallel
from lorajax.training import sharding
from lorajax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'parallel_worker.py')
TIMEOUT = 300
# Fast CPU compiles; every run (and the reference) uses the same flags.
FAST_XLA = ('--xla_backend_optimization_level=0 '
            '--xla_llvm_disable_expensive_passes=true')


def _env(xla_flags=FAST_XLA):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return env


def _run_worker(tmp_path, name, *args):
  out = tmp_path / f'{name}.json'
  proc = subprocess.run([sys.executable, WORKER, '--out', str(out), *args],
                        env=_env(), capture_output=True, text=True,
                        timeout=TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.fixture(scope='module')
def eight(tmp_path_factory):
  """jit, pmap (8 devices) and mesh (data 4 x model 2) in one process."""
  return _run_worker(tmp_path_factory.mktemp('eight'), 'eight',
                     '--devices', '8', '--modes', 'jit,pmap,mesh',
                     '--model', '2')


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """The mesh across 2 processes of 4 devices (gloo collectives)."""
  tmp = tmp_path_factory.mktemp('two')
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, WORKER, '--out', str(tmp / f'p{i}.json'),
           '--devices', '4', '--modes', 'mesh', '--model', '2',
           '--process', str(i), '--processes', '2', '--port', str(port)]
    procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f'process {i}:\n' + logs[i][-4000:]
  return [json.loads((tmp / f'p{i}.json').read_text()) for i in range(2)]


def _assert_same_run(run, ref, where):
  np.testing.assert_allclose(run['loss'], ref['loss'], rtol=1e-5,
                             err_msg=f'{where}: per-step losses')
  for key in ('count', 'correct'):
    assert run['eval'][key] == ref['eval'][key], where
  np.testing.assert_allclose(run['eval']['loss_sum'], ref['eval']['loss_sum'],
                             rtol=1e-5, err_msg=where)
  assert sorted(run['trainable']) == sorted(ref['trainable'])
  for path, value in ref['trainable'].items():
    np.testing.assert_allclose(run['trainable'][path], value, atol=1e-5,
                               rtol=1e-5, err_msg=f'{where}: {path}')


# ---- the runs agree ----------------------------------------------------------


@pytest.mark.parametrize('mode', ['pmap', 'mesh'])
def test_eight_devices_match_jit(eight, mode):
  assert eight['devices'] == 8
  _assert_same_run(eight[mode], eight['jit'], mode)
  assert eight['jit']['loss'][0] != eight['jit']['loss'][-1]  # It trains.


def test_two_processes_match_jit(eight, two_processes):
  for i, result in enumerate(two_processes):
    assert (result['processes'], result['devices']) == (2, 8)
    _assert_same_run(result['mesh'], eight['jit'], f'mesh, process {i}')


# ---- mesh shardings ----------------------------------------------------------


def test_mesh_adapters_follow_their_kernel(eight):
  specs = eight['mesh']['specs']
  kinds = set()
  for path, kernel in specs['kernel'].items():
    a = specs['trainable'].get(f'adapters/{path}/a')
    if a is None:
      continue
    b = specs['trainable'][f'adapters/{path}/b']
    assert a == [kernel[0], None], path  # in axis as the kernel's, rank None
    assert b == [None, kernel[1]], path  # out axis as the kernel's
    kinds.add(tuple(kernel))
  # Both cases occur: kernels sharded on their in and on their out axis.
  assert kinds == {('model', None), (None, 'model')}


def test_mesh_optimizer_state_follows_trainable(eight):
  specs = eight['mesh']['specs']
  assert specs['mu'] == specs['trainable']
  assert specs['kernel']['embeddings/word_embeddings/embedding'] == [
      'model', None]
  assert specs['kernel']['embeddings/ln/scale'] == [None]


@pytest.mark.parametrize('shape,size,skip,expected', [
    ((32, 64), 2, 0, P(None, 'model')),
    ((64, 32), 2, 0, P('model', None)),
    ((32, 32), 2, 0, P(None, 'model')),  # equal axes: the last
    ((30, 7), 4, 0, P()),                # nothing divides
    ((30, 8), 4, 0, P(None, 'model')),   # the divisible one
    ((64,), 2, 0, P()),                  # vectors stay whole
    ((32, 64), 1, 0, P()),               # no model axis
    ((64, 8, 8), 2, 1, P(None, None, 'model')),  # never a stack axis
])
def test_fsdp_spec(shape, size, skip, expected):
  assert sharding.fsdp_spec(shape, size, skip=skip) == expected


def _stacked_case(kernel_shape, rank=2):
  """A stacked [L, in, out] kernel with LoRA factors, and a trained head."""
  s, i, o = kernel_shape
  params = {'layers': {'q': {'kernel': np.zeros(kernel_shape, np.float32)}},
            'head': {'kernel': np.zeros((o, 2), np.float32)}}
  spec = lorajax.LoraSpec([(r'layers/q/kernel', lorajax.Lora(rank=rank)),
                           (r'head/.*', lorajax.TRAIN),
                           (r'.*', lorajax.FREEZE)])
  adapters = {'layers': {'q': {'kernel': lorajax.AdapterParams({
      'a': np.zeros((s, i, rank), np.float32),
      'b': np.zeros((s, rank, o), np.float32)},
      layout=lorajax.KernelLayout(1, (0,), (1,)))}}}
  train, frozen = lorajax.partition(params, spec)
  return spec, {'adapters': adapters, 'params': train}, frozen


@pytest.mark.parametrize('kernel_shape,size,kernel,a,b', [
    ((3, 8, 16), 2, P(None, None, 'model'), P(None, None, None),
     P(None, None, 'model')),
    ((3, 64, 16), 4, P(None, 'model', None), P(None, 'model', None),
     P(None, None, None)),
    ((64, 8, 8), 2, P(None, None, 'model'), P(None, None, None),
     P(None, None, 'model')),
    ((3, 9, 5), 2, P(), P(None, None, None), P(None, None, None)),
])
def test_stacked_adapters_follow_kernel_not_stack(kernel_shape, size, kernel,
                                                  a, b):
  spec, trainable, frozen = _stacked_case(kernel_shape)
  t_specs, f_specs = sharding.param_specs(trainable, frozen, spec, size)
  assert f_specs['layers']['q']['kernel'] == kernel
  ad = t_specs['adapters']['layers']['q']['kernel']
  assert (ad['a'], ad['b']) == (a, b)


def test_multi_axis_kernel_adapters():
  layout = spec_lib.KernelLayout(0, (0,), (1, 2))  # [in, heads, dim]
  specs = sharding.adapter_specs(
      P(None, None, 'model'), 3, layout,
      {'a': (16, 4), 'b': (4, 2, 8), 'magnitude': (2, 8), 'other': (5,)})
  assert specs == {'a': P(None, None), 'b': P(None, None, 'model'),
                   'magnitude': P(None, 'model'), 'other': P()}


def test_optimizer_state_specs_follow_trainable():
  spec, trainable, _ = _stacked_case((3, 8, 16))
  tx, _ = optim.make_optimizer(learning_rate=1e-3, num_steps=10,
                               weight_decay=0.1, clip_norm=1.0)
  state = jax.eval_shape(lambda t: step_lib.create_state(t, tx, 0),
                         trainable)
  t_specs = jax.tree.map(lambda _: P('model'), trainable)
  specs = sharding.state_specs(tx, state, t_specs)
  adam = specs.opt_state[1][0]
  assert adam.mu == t_specs and adam.nu == t_specs
  assert adam.count == P() and specs.step == P() and specs.rng == P()


# ---- meshes and bad input ----------------------------------------------------


def _fake_devices(processes, per_process):
  return [types.SimpleNamespace(process_index=p, id=p * per_process + i)
          for p in range(processes) for i in range(per_process)]


def test_mesh_model_axis_may_not_span_processes():
  with pytest.raises(ValueError, match='spans processes'):
    sharding.make_mesh(model=4, devices=_fake_devices(2, 2))


@pytest.mark.parametrize('data,model,match', [
    (-1, 3, 'does not divide'),
    (2, 2, 'needs 4 devices'),
])
def test_bad_mesh_sizes_raise(data, model, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(data=data, model=model, devices=_fake_devices(1, 2))


def test_unknown_mode_raises():
  with pytest.raises(ValueError, match="'tpu'.*jit.*pmap.*mesh"):
    parallel.make_runner('tpu')


# ---- end to end --------------------------------------------------------------


def _train(workdir, mode, *flags):
  env = _env(FAST_XLA + ' --xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train',
       '--config=configs/rt_minilm_lora.py:smoke', f'--config.mode={mode}',
       '--config.mesh.model=2', '--config.eval_every=2',
       f'--workdir={workdir}', *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
      check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in
          (workdir / 'metrics.jsonl').read_text().splitlines()]
  summary = json.loads((workdir / 'summary.json').read_text())
  return rows, summary


@pytest.mark.parametrize('mode', ['pmap', 'mesh'])
def test_train_command_runs_in_mode(tmp_path, mode):
  _, summary = _train(tmp_path, mode, '--config.num_train_steps=2')
  assert summary['checkpoint_step'] == 2
  assert np.isfinite(summary['test']['loss'])


@pytest.mark.parametrize('mode, method', [('mesh', 'prefix'),
                                          ('pmap', 'prompt')])
def test_prompt_methods_train_alike_in_every_mode(tmp_path, mode, method):
  """The 'prompts' part of the trainable tree (virtual tokens, prefix
  keys/values) is placed, stepped and saved under pmap and on a mesh as under
  jit: same losses (dropout off, so every mode draws nothing)."""
  flags = (f'--config.method={method}', '--config.num_train_steps=3',
           '--config.model.dropout=0.0')
  runs = {m: _train(tmp_path / m, m, *flags) for m in ('jit', mode)}
  losses = {m: [(r['step'], r['split'], r['loss']) for r in rows]
            for m, (rows, _) in runs.items()}
  assert [k[:2] for k in losses['jit']] == [k[:2] for k in losses[mode]]
  np.testing.assert_allclose([k[2] for k in losses[mode]],
                             [k[2] for k in losses['jit']], rtol=2e-5)
  assert len({k[2] for k in losses['jit'] if k[1] == 'train'}) == 3
  assert all((tmp_path / m / 'prompts.npz').stat().st_size > 0
             for m in runs)


_PLACED = '''
import sys
import jax
sys.path.insert(0, "tests")
from toy_models import load_config
from lorajax.training import model_loading, sharding
config = load_config("rt_minilm_lora", **{"model.path": sys.argv[1],
                     "mode": "mesh", "mesh.model": 2})
model = model_loading.load_model(config, labels=("neg", "pos"))
for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
  spec = sharding.fsdp_spec(leaf.shape, 2)
  assert leaf.sharding.mesh.shape == {"data": 4, "model": 2}, path
  assert leaf.sharding.spec == spec, (path, leaf.sharding.spec, spec)
print(sum(leaf.sharding.spec != () for leaf in jax.tree.leaves(model.params)))
'''


def test_mesh_mode_loads_a_checkpoint_onto_its_shardings(tmp_path):
  """config.model.path in mode mesh: every tensor is put on its FSDP
  sharding as it is read (no whole host copy first), and the run trains
  as under jit."""
  pytest.importorskip('transformers')
  from toy_models import tiny_distilbert_dir  # pylint: disable=g-import-not-at-top
  (tmp_path / 'model').mkdir()
  tiny_distilbert_dir(tmp_path / 'model')
  env = _env(FAST_XLA + ' --xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-c', _PLACED,
                         str(tmp_path / 'model')], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert int(proc.stdout.split()[-1]) > 10  # Kernels and tables split.
  flags = (f'--config.model.path={tmp_path / "model"}',
           '--config.num_train_steps=2', '--config.model.dropout=0.0')
  runs = {m: _train(tmp_path / m, m, *flags) for m in ('jit', 'mesh')}
  np.testing.assert_allclose([r['loss'] for r in runs['mesh'][0]],
                             [r['loss'] for r in runs['jit'][0]], rtol=1e-4)
