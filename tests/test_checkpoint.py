"""Checkpoints: exact resume after SIGKILL, partial saves, mismatched runs."""

import glob
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lorajax.io import spec_json
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib
from lorajax.training import metrics as metrics_lib
from lorajax.training import tasks
from lorajax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/rt_minilm_lora.py'
STEPS, EVERY = 10, 3
OVERRIDES = {'num_train_steps': STEPS, 'checkpoint_every': EVERY}

# Runs experiments.train in a child that SIGKILLs itself at a chosen point:
# right after the train metrics of step KILL_AT are written ("train"), or
# right after the checkpoint save of step KILL_AT has started ("save"), while
# Orbax is still writing it in the background.
_KILLER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    kill_at, where = int(os.environ['KILL_AT']), os.environ['KILL_WHERE']
    if where == 'train':
      from lorajax.training import metrics
      write = metrics.MetricWriter.write
      def patched(self, step, split, scalars):
        write(self, step, split, scalars)
        if split == 'train' and step == kill_at:
          os.kill(os.getpid(), signal.SIGKILL)
      metrics.MetricWriter.write = patched
    else:
      import orbax.checkpoint as ocp
      save = ocp.CheckpointManager.save
      def patched(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        # The resume checkpoints, not the best-validation copy.
        if step == kill_at and str(self.directory).endswith('checkpoints'):
          os.kill(os.getpid(), signal.SIGKILL)
        return out
      ocp.CheckpointManager.save = patched
    from absl import app
    from experiments import train
    sys.argv = ['train'] + sys.argv[1:]
    app.run(train.main)
''')


def load_config(arg='smoke', **overrides):
  spec = importlib.util.spec_from_file_location(
      'cfg_rt', os.path.join(ROOT, CONFIG))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  with config.unlocked():
    for key, value in {**OVERRIDES, **overrides}.items():
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {step: row['loss'] for step, row in rows.items()}


def final_trainable(workdir, config):
  trainable, _ = tasks.build_task(config).split_params()
  meta = ckpt_lib.read_meta(os.path.join(workdir, 'checkpoints'), STEPS)[1]
  out, _ = ckpt_lib.restore_trainable(os.path.join(workdir, 'checkpoints'),
                                      trainable, meta, STEPS)
  return jax.device_get(out)


def run_killed(tmp_path, where, kill_at, overrides=None):
  script = tmp_path / 'killer.py'
  script.write_text(_KILLER.format(root=ROOT))
  workdir = tmp_path / 'run'
  args = [sys.executable, str(script), f'--config={CONFIG}:smoke',
          f'--workdir={workdir}'] + [
              f'--config.{k}={v}'
              for k, v in {**OVERRIDES, **(overrides or {})}.items()]
  env = dict(os.environ, KILL_AT=str(kill_at), KILL_WHERE=where)
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == -9, proc.stderr[-3000:]
  return str(workdir)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run: its losses, final adapters and workdir."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  config = load_config()
  train.train_and_evaluate(config, workdir)
  return losses(workdir), final_trainable(workdir, config), workdir


def assert_same_run(workdir, reference, **overrides):
  want_losses, want_trainable, _ = reference
  assert losses(workdir) == want_losses  # Exact, step by step.
  got = final_trainable(workdir, load_config(**overrides))
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want = jax.tree_util.tree_leaves_with_path(want_trainable)
  assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
  for (path, a), (_, b) in zip(flat_got, flat_want):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_sigkill_mid_training_resumes_exactly(tmp_path, reference):
  workdir = run_killed(tmp_path, 'train', kill_at=8)
  assert max(losses(workdir)) == 8
  summary = train.train_and_evaluate(load_config(), workdir)
  assert summary['resumed_from'] in (3, 6)
  assert_same_run(workdir, reference)


def test_sigkill_during_save_never_restores_partial(tmp_path, reference):
  workdir = run_killed(tmp_path, 'save', kill_at=6)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  partial = glob.glob(os.path.join(ckpt_dir, '*orbax-checkpoint-tmp*'))
  assert partial, os.listdir(ckpt_dir)  # Killed while writing step 6.
  manager = ckpt_lib.make_manager(ckpt_dir)
  assert manager.latest_step() == 3
  manager.close()
  summary = train.train_and_evaluate(load_config(), workdir)
  assert summary['resumed_from'] == 3
  assert_same_run(workdir, reference)


def test_other_rank_names_path_and_shapes(reference):
  workdir = reference[2]
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(load_config(**{'lora.rank': 4}), workdir)
  message = str(err.value)
  assert 'adapters/encoder/layer_0/attention/query/kernel/a' in message
  assert 'shape (32, 8)' in message and '(32, 4)' in message


def test_other_spec_names_the_leaf(reference):
  workdir = reference[2]
  with pytest.raises(ValueError, match='does not train') as err:
    train.train_and_evaluate(load_config(method='head'), workdir)
  assert 'adapters/encoder/layer_0/attention/query/kernel/a' in str(err.value)


def test_other_spec_names_the_rule():
  want = ckpt_lib.make_meta(config_lib.make_spec(load_config()), {}, {})
  have = ckpt_lib.make_meta(
      config_lib.make_spec(load_config(**{'lora.rank': 4})), {}, {})
  with pytest.raises(ValueError, match=r"rule 1 is .*'rank': 4.* \(this "
                     r"run: .*'rank': 8"):
    ckpt_lib.check_compatible(have, want, '/ckpt/3')
  # A checkpoint whose spec is not spec JSON (repr strings) is named so.
  old = dict(want, spec=[['.*', "'freeze'"]])
  with pytest.raises(ValueError, match='not spec JSON'):
    ckpt_lib.check_compatible(old, want, '/ckpt/3')


def test_other_model_is_named():
  meta = {'shapes': {'w': [[2, 2], 'float32']},
          'model': {'name': 'minilm', 'hidden_size': 32}, 'spec': []}
  other = dict(meta, model={'name': 'minilm', 'hidden_size': 384})
  with pytest.raises(ValueError, match=r'hidden_size=32 \(this run: 384\)'):
    ckpt_lib.check_compatible(meta, other, '/ckpt/3')


def test_checkpoint_holds_no_frozen_base(reference):
  workdir = reference[2]
  _, meta = ckpt_lib.read_meta(os.path.join(workdir, 'checkpoints'))
  assert all(p.startswith(('adapters/', 'params/classifier/'))
             for p in meta['shapes'])
  # The spec is real JSON, the one adapter files carry.
  assert meta['spec'] == spec_json.spec_to_json(
      config_lib.make_spec(load_config()))
  assert spec_json.spec_from_json(meta['spec']) == config_lib.make_spec(
      load_config())
  assert set(meta['data_state']) == {'epoch', 'index', 'seed'}
