"""Training: spec from config, optimizer, steps, end-to-end smoke runs, bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib
from lorajax.training import finished
from lorajax.training import input_pipeline
from lorajax.training import metrics as metrics_lib
from lorajax.training import optim
from lorajax.training import parallel
from lorajax.training import step as step_lib
from lorajax.training import tasks
from lorajax.training import train

from toy_models import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('rt_minilm_lora', 'rt_minilm_full', 'rt_minilm_head',
           'shakespeare_smollm2_lora')




# ---- config -> spec, optimizer, step --------------------------------------


@pytest.mark.parametrize('method,trained,adapted', [
    ('lora', ['classifier/kernel'], ['q/kernel']),
    ('full', ['classifier/kernel', 'q/kernel'], []),
    ('head', ['classifier/kernel'], []),
])
def test_method_is_a_spec(method, trained, adapted):
  config = config_lib.base_config('classification')
  config.method = method
  config.lora.targets = r'q/kernel'
  config.frozen_rules = r'pooler/.*'
  params = {'q': {'kernel': np.zeros((4, 4))},
            'pooler': {'kernel': np.zeros((4, 4))},
            'classifier': {'kernel': np.zeros((4, 2))}}
  resolution = lorajax.resolve(config_lib.make_spec(config), params)
  assert resolution.trained == trained
  assert list(resolution.adapted) == adapted


def test_unknown_method_raises():
  config = config_lib.base_config('classification')
  config.method = 'no_such_method'
  with pytest.raises(ValueError, match="'no_such_method'.*'dora'"):
    config_lib.make_spec(config)


def test_schedule_warms_up_then_decays():
  schedule = optim.make_schedule(learning_rate=1.0, num_steps=10,
                                 warmup_steps=2, decay='linear')
  np.testing.assert_allclose(
      [float(schedule(s)) for s in (0, 1, 2, 6, 10)],
      [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  cosine = optim.make_schedule(learning_rate=1.0, num_steps=10,
                               warmup_steps=0, decay='cosine')
  assert float(cosine(5)) == pytest.approx(0.5)


def test_weight_decay_skips_vectors():
  mask = optim.decay_mask({'a': {'kernel': np.zeros((2, 3)),
                                 'bias': np.zeros(3)}})
  assert mask == {'a': {'kernel': True, 'bias': False}}


def test_lr_factors_act_as_a_per_leaf_learning_rate():
  params = {'adapters': {'q': {'a': jnp.ones((2, 2)), 'b': jnp.ones((2, 2))}},
            'params': {'head': {'kernel': jnp.ones((2, 2))}}}
  grads = jax.tree.map(lambda x: x * jnp.array([[0.3, -1.0], [2.0, 0.5]]),
                       params)
  kw = dict(num_steps=10, weight_decay=0.1)

  def first_update(tx):
    return tx.update(grads, tx.init(params), params)[0]

  base = first_update(optim.make_optimizer(learning_rate=0.1, **kw)[0])
  tenx = first_update(optim.make_optimizer(learning_rate=1.0, **kw)[0])
  both = first_update(optim.make_optimizer(
      learning_rate=0.1, lr_factors='params/head/.*=10, adapters/.*/b=0',
      **kw)[0])
  np.testing.assert_allclose(both['params']['head']['kernel'],
                             tenx['params']['head']['kernel'], rtol=1e-6)
  np.testing.assert_array_equal(both['adapters']['q']['a'],
                                base['adapters']['q']['a'])
  np.testing.assert_array_equal(both['adapters']['q']['b'], 0.0)
  assert np.abs(base['adapters']['q']['b']).min() > 0


def test_lr_factors_bad_rules_are_clear_errors():
  params = {'params': {'head': {'kernel': jnp.ones((2, 2))}}}
  tx, _ = optim.make_optimizer(learning_rate=0.1, num_steps=2,
                               lr_factors='params/classifer/.*=10')
  with pytest.raises(ValueError, match='matches no trainable leaf.*'
                     'params/head/kernel'):
    tx.init(params)
  for text, msg in (('params/head', 'not "regex=factor"'),
                    ('params/head=ten', 'not a number'),
                    ('params/(head=2', 'not a regex'),
                    ('params/head=-1', '>= 0')):
    with pytest.raises(ValueError, match=msg):
      optim.parse_lr_factors(text)


def _quadratic_loss(trainable, frozen, batch, rng):
  del rng
  pred = batch['x'] @ trainable['params']['w'] + frozen['b']
  err = (pred - batch['y']) ** 2
  return jnp.mean(err), {'loss_sum': jnp.sum(err),
                         'count': jnp.float32(err.shape[0])}


def test_accumulated_step_equals_one_big_step():
  x = jax.random.normal(jax.random.key(0), (8, 3))
  batch = {'x': x, 'y': x @ jnp.array([1.0, -2.0, 0.5])}
  trainable = {'adapters': {}, 'params': {'w': jnp.zeros(3)}}
  frozen = {'b': jnp.float32(0.1)}
  tx, _ = optim.make_optimizer(learning_rate=0.1, num_steps=4,
                               clip_norm=1.0)
  state = step_lib.create_state(trainable, tx, seed=0)
  outs = []
  for accum in (1, 4):
    fn = jax.jit(lambda s, f, b, a=accum: step_lib.train_step(
        s, f, b, loss_fn=_quadratic_loss, tx=tx, accum_steps=a))
    outs.append(fn(state, frozen, batch))
  (s1, m1), (s4, m4) = outs
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-6)
  np.testing.assert_allclose(s1.trainable['params']['w'],
                             s4.trainable['params']['w'], rtol=1e-5)
  assert int(s4.step) == 1


def test_compiler_options_change_speed_not_results():
  x = jax.random.normal(jax.random.key(0), (8, 3))
  batch = {'x': x, 'y': x @ jnp.array([1.0, -2.0, 0.5])}
  trainable = {'adapters': {}, 'params': {'w': jnp.zeros(3)}}
  frozen = {'b': jnp.float32(0.1)}
  tx, _ = optim.make_optimizer(learning_rate=0.1, num_steps=4)
  out = []
  for options in ({}, lorajax.compiler_options('cpu')):
    runner = parallel.jit_runner(loss_fn=_quadratic_loss, eval_fn=None, tx=tx,
                                 compiler_options=options)
    state, fr = runner.place(step_lib.create_state(trainable, tx, 0), frozen)
    for _ in range(3):
      state, _ = runner.train_step(state, fr, runner.put_batch(batch))
    out.append(np.asarray(state.trainable['params']['w']))
  np.testing.assert_array_equal(out[0], out[1])
  assert not np.array_equal(out[0], 0.0)


def test_train_step_does_not_recompile():
  x = jnp.ones((4, 3))
  batch = {'x': x, 'y': jnp.zeros(4)}
  trainable = {'adapters': {}, 'params': {'w': jnp.zeros(3)}}
  tx, _ = optim.make_optimizer(learning_rate=0.1, num_steps=4)
  state = step_lib.create_state(trainable, tx, seed=0)
  fn = jax.jit(lambda s, f, b: step_lib.train_step(
      s, f, b, loss_fn=_quadratic_loss, tx=tx))
  state, _ = fn(state, {'b': jnp.float32(0)}, batch)
  state, _ = fn(state, {'b': jnp.float32(0)}, batch)
  assert fn._cache_size() == 1  # pylint: disable=protected-access


# ---- end to end --------------------------------------------------------------


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """Runs a config's smoke version once per module: (config, summary, dir)."""
  runs = {}

  def get(name):
    if name not in runs:
      workdir = tmp_path_factory.mktemp(name)
      config = load_config(name)
      runs[name] = (config, train.train_and_evaluate(config, str(workdir)),
                    workdir)
    return runs[name]
  return get


@pytest.mark.parametrize('name', CONFIGS)
def test_config_runs_end_to_end(name, smoke_run):
  config, summary, workdir = smoke_run(name)
  steps = config.num_train_steps
  rows = metrics_lib.read_jsonl(str(workdir / 'metrics.jsonl'))
  assert list(rows) == list(range(1, steps + 1))
  assert all(np.isfinite(r['loss']) for r in rows.values())
  assert summary['checkpoint_step'] == steps
  assert summary['trainable_params'] > 0
  metric = 'accuracy' if config.task == 'classification' else 'perplexity'
  assert metric in summary['test'] and metric in summary['final_validation']
  assert os.listdir(workdir / 'tensorboard')
  saved = json.loads((workdir / 'summary.json').read_text())
  assert saved['test'] == summary['test']
  # Never the frozen base: the trainable item holds only trained leaves.
  _, meta = ckpt_lib.read_meta(workdir / 'checkpoints')
  n_saved = sum(int(np.prod(s)) for s, _ in meta['shapes'].values())
  assert n_saved == summary['trainable_params']
  if config.method != 'full':
    assert n_saved < summary['all_params'] / 10


def test_lm_reports_perplexity_before_and_after(smoke_run):
  _, summary, _ = smoke_run('shakespeare_smollm2_lora')
  before = summary['initial_validation']['perplexity']
  after = summary['final_validation']['perplexity']
  assert np.isfinite(before) and np.isfinite(after)
  assert 'initial_validation' in summary


def test_saved_adapter_evaluates_on_its_base(smoke_run):
  config, summary, workdir = smoke_run('rt_minilm_lora')
  got = finished.evaluate_checkpoint(config, str(workdir), 'test')  # latest
  assert got['accuracy'] == pytest.approx(summary['test_final']['accuracy'])
  assert got['loss'] == pytest.approx(summary['test_final']['loss'],
                                      rel=1e-5)


def test_evaluation_loads_its_split_and_export_no_data(smoke_run, tmp_path,
                                                      monkeypatch):
  config, _, workdir = smoke_run('rt_minilm_lora')
  loaded = []
  real = input_pipeline.load_split

  def spy(config, model, split):
    loaded.append(split)
    return real(config, model, split)

  monkeypatch.setattr(input_pipeline, 'load_split', spy)
  finished.evaluate_checkpoint(config, str(workdir), 'validation')
  assert loaded == ['validation']
  finished.export_checkpoint(config, str(workdir), str(tmp_path / 'ad'))
  assert loaded == ['validation']


def test_pissa_run_starts_at_the_base_and_its_adapter_reloads(smoke_run,
                                                              tmp_path):
  _, plain, _ = smoke_run('shakespeare_smollm2_lora')
  config = load_config('shakespeare_smollm2_lora', **{'lora.init': 'pissa'})
  summary = train.train_and_evaluate(config, str(tmp_path))
  # Residual base + principal factors == the pretrained model at step 0.
  assert summary['initial_validation']['perplexity'] == pytest.approx(
      plain['initial_validation']['perplexity'], rel=1e-4)
  assert summary['final_validation'] != plain['final_validation']
  # The saved adapter runs on the residual rebuilt from the base.
  got = finished.evaluate_checkpoint(config, str(tmp_path), 'test')
  assert got['perplexity'] == pytest.approx(summary['test']['perplexity'],
                                            rel=1e-5)


@pytest.mark.parametrize('name, init', [('rt_minilm_lora', 'kaiming'),
                                         ('shakespeare_smollm2_lora', 'pissa')])
def test_exported_adapter_fits_the_pretrained_base(name, init, smoke_run,
                                                   tmp_path):
  """``export_checkpoint`` writes a file that loads onto the pretrained base
  (fingerprint checked) and computes what the run computed; a PiSSA run is
  converted to plain LoRA on the way (it trained on the residual)."""
  if init == 'kaiming':
    config, _, workdir = smoke_run(name)
  else:
    config = load_config(name, **{'lora.init': init})
    workdir = tmp_path / 'run'
    train.train_and_evaluate(config, str(workdir))
  out = finished.export_checkpoint(config, str(workdir), str(tmp_path / 'ad'))
  task = tasks.build_task(config)
  trainable, frozen = task.split_params()
  trainable, _ = ckpt_lib.restore_trainable(
      workdir / 'checkpoints', trainable,
      ckpt_lib.make_meta(task.spec, task.model_info, trainable))
  bundle = lorajax.io.load_adapter(out, task.original_params)
  assert lorajax.pissa.uses_pissa(task.spec) == (init == 'pissa')
  assert not lorajax.pissa.uses_pissa(bundle.spec)
  ran = lorajax.merge(lorajax.combine(trainable['params'], frozen),
                      trainable['adapters'], task.spec)
  got = lorajax.merge(bundle.params_for(task.original_params),
                      bundle.adapters, bundle.spec)
  moved = 0.0
  for (path, want), (_, have), (_, base) in zip(
      lorajax.spec.flatten_paths(ran), lorajax.spec.flatten_paths(got),
      lorajax.spec.flatten_paths(task.original_params)):
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6,
                               err_msg=path)
    moved = max(moved, float(np.abs(np.asarray(want) - base).max()))
  assert moved > 1e-4   # The run changed the model; the file carries it.


def test_resumed_finished_run_only_evaluates(smoke_run):
  config, summary, workdir = smoke_run('rt_minilm_head')
  again = train.train_and_evaluate(config, str(workdir))
  assert again['resumed_from'] == config.num_train_steps
  assert again['test'] == pytest.approx(summary['test'])


def test_bfloat16_compute_keeps_float32_state(tmp_path):
  config = load_config('rt_minilm_lora', num_train_steps=2, eval_every=2,
                       checkpoint_every=2, **{'model.dtype': 'bfloat16'})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary['test']['loss'])
  _, meta = ckpt_lib.read_meta(tmp_path / 'checkpoints')
  assert {dtype for _, dtype in meta['shapes'].values()} == {'float32'}


# ---- bad input --------------------------------------------------------------


def test_unknown_config_field_names_it(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train',
       '--config=configs/rt_minilm_lora.py:smoke', '--config.lora.rnak=8',
       f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode != 0
  assert 'rnak' in proc.stderr and 'Did you mean "rank"' in proc.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_lr_factor_rule_matching_nothing_stops_before_training(tmp_path):
  config = load_config('rt_minilm_lora',
                       **{'optim.lr_factors': 'params/classifer/.*=10'})
  with pytest.raises(ValueError, match=r"'params/classifer/\.\*' matches "
                     'no trainable leaf.*params/classifier/kernel'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_unknown_config_argument_names_it():
  with pytest.raises(ValueError, match='smok'):
    load_config('rt_minilm_lora', arg='smok')


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(ValueError, match='not writable') as err:
    train.train_and_evaluate(load_config('rt_minilm_lora'),
                             str(blocker / 'run'))
  assert str(blocker) in str(err.value)


@pytest.mark.parametrize('per_call', [1, 4])   # 4: step 5 is inside a call
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch,
                                                       per_call):
  real_step = step_lib.train_step

  def poisoned(state, frozen, batch, **kw):
    new_state, m = real_step(state, frozen, batch, **kw)
    bad = new_state.step >= 5
    m = dict(m, loss=jnp.where(bad, jnp.nan, m['loss']))
    trainable = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x),
                             new_state.trainable)
    return new_state._replace(trainable=trainable), m

  monkeypatch.setattr(step_lib, 'train_step', poisoned)
  config = load_config('rt_minilm_lora', checkpoint_every=2,
                       eval_every=100, steps_per_call=per_call)
  with pytest.raises(FloatingPointError, match='step 5') as err:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'last good checkpoint is step 4' in str(err.value)
  monkeypatch.setattr(step_lib, 'train_step', real_step)
  manager = ckpt_lib.make_manager(tmp_path / 'checkpoints')
  assert manager.latest_step() == 4
  manager.close()
  trainable, _ = ckpt_lib.restore_trainable(
      tmp_path / 'checkpoints',
      train.tasks.build_task(config).split_params()[0],
      {'shapes': ckpt_lib.read_meta(tmp_path / 'checkpoints')[1]['shapes'],
       'model': ckpt_lib.read_meta(tmp_path / 'checkpoints')[1]['model'],
       'spec': lorajax.io.spec_to_json(config_lib.make_spec(config))})
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(trainable))
  assert optax.tree.norm(trainable) > 0


def test_test_is_scored_at_the_best_validation_step(tmp_path):
  """Validation every step at a rate that overshoots: the best validation
  step is not the last, its adapter is kept, and test is scored there."""
  config = load_config('rt_minilm_lora')
  with config.unlocked():
    config.eval_every = 1
    config.checkpoint_every = 6
    config.max_to_keep = 1
    config.optim.learning_rate = 0.5
  summary = train.train_and_evaluate(config, str(tmp_path))
  vals = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'),
                                'validation')
  best = max(vals, key=lambda s: vals[s]['accuracy'])  # First of the ties.
  assert summary['best_validation_step'] == summary['test_step'] == best
  assert best != config.num_train_steps
  assert os.listdir(tmp_path / ckpt_lib.BEST_DIR) == [str(best)]
  got = finished.evaluate_checkpoint(config, str(tmp_path), 'test', step='best')
  assert got == pytest.approx(summary['test'])
  last = finished.evaluate_checkpoint(config, str(tmp_path), 'test')
  assert last == pytest.approx(summary['test_final'])
  assert summary['test_examples'] == 24
  assert 0.5 <= summary['test_majority_rate'] <= 1.0
  rows = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert rows[6]['tokens_seen'] > rows[1]['tokens_seen'] > 0
