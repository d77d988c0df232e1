"""Training with each PEFT method: config -> spec, smoke runs, qlora, resume."""

import os
import shutil

import jax
import numpy as np
import pytest

import lorajax
from lorajax.methods import prompts
from lorajax.sweeps import grid
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib
from lorajax.training import metrics as metrics_lib
from lorajax.training import train

from toy_models import load_config
from toy_models import set_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS_CONFIG = 'rt_minilm_methods'
# Shorter than the smoke default (6 steps): checkpoints at 2 and 4.
SHORT = {'num_train_steps': 4, 'eval_every': 4, 'checkpoint_every': 2}
PARAMS = {'encoder': {'layer_0': {
    'attention': {'query': {'kernel': np.ones((4, 4))},
                  'value': {'kernel': np.ones((4, 4))},
                  'output': {'kernel': np.ones((4, 4))}},
    'output': {'kernel': np.ones((8, 4))}}},
          'pooler': {'kernel': np.ones((4, 4))},
          'classifier': {'kernel': np.ones((4, 2))}}




def _config(method, **fields):
  config = config_lib.base_config('classification')
  config.method = method
  config.frozen_rules = r'pooler/.*'
  return set_fields(config, fields)


# ---- config -> spec ---------------------------------------------------------


@pytest.mark.parametrize('method,fields,adapted', [
    ('dora', {}, {'attention/query': 'Dora', 'attention/value': 'Dora'}),
    ('qlora', {}, {'attention/query': 'QLora', 'attention/value': 'QLora',
                   'attention/output': 'Quantized', 'output': 'Quantized'}),
    ('qlora', {'quant_targets': ''},
     {'attention/query': 'QLora', 'attention/value': 'QLora'}),
    ('bottleneck', {'bottleneck.style': 'pfeiffer'}, {'output': 'Bottleneck'}),
    ('bottleneck', {'bottleneck.style': 'houlsby'},
     {'attention/output': 'Bottleneck', 'output': 'Bottleneck'}),
    ('ia3', {}, {'attention/value': 'Ia3', 'output': 'Ia3'}),
    ('loha', {}, {'attention/query': 'LoHa', 'attention/value': 'LoHa'}),
    ('prompt', {}, {}),
    ('prefix', {}, {}),
])
def test_method_is_a_spec(method, fields, adapted):
  resolution = lorajax.resolve(config_lib.make_spec(_config(method, **fields)),
                               PARAMS)
  got = {p: type(a).__name__ for p, a in resolution.adapted.items()}
  assert got == {f'encoder/layer_0/{k}/kernel': v for k, v in adapted.items()}
  assert resolution.trained == ['classifier/kernel']


def test_ia3_scales_feed_forward_inputs_and_attention_outputs():
  rules = dict(config_lib.make_spec(_config('ia3')).rules)
  assert rules[r'.*layer_\d+/output/kernel'] == lorajax.Ia3(feedforward=True)
  assert lorajax.Ia3() in rules.values()


def test_loha_refuses_lora_fields_it_does_not_have():
  with pytest.raises(ValueError, match=r"'loha' has no lora.dropout"):
    config_lib.make_spec(_config('loha', **{'lora.dropout': 0.1}))


def test_qlora_takes_the_lora_fields_and_format():
  config = _config('qlora', quant='int8', **{'lora.rank': 4,
                                              'lora.alpha': 8.0})
  action = dict(config_lib.make_spec(config).rules)[config.lora.targets]
  assert (action.rank, action.alpha, action.quant) == (4, 8.0, 'int8')


def test_bad_bottleneck_style_raises():
  with pytest.raises(ValueError, match="style='parallel'"):
    config_lib.make_spec(_config('bottleneck', **{'bottleneck.style':
                                                  'parallel'}))


def test_methods_sweep_expands_to_one_run_per_method(tmp_path):
  runs = grid.expand(os.path.join(ROOT, 'configs', f'{METHODS_CONFIG}.py'),
                     str(tmp_path))
  assert [r.config.method for r in runs] == [
      'lora', 'dora', 'qlora', 'bottleneck', 'prefix', 'prompt', 'ptuning',
      'loha', 'lokr', 'vera', 'oft', 'ia3', 'adalora', 'full', 'head']
  vera = runs[9]
  assert (vera.config.lora.rank, vera.config.optim.learning_rate) == (256, 1e-2)
  adalora = runs[12].config.adalora
  assert (adalora.init_r, adalora.target_r, adalora.tinit,
          adalora.tfinal) == (12, 8, 5, 10)
  assert runs[1].command().endswith(
      '--config.method=dora --config.optim.learning_rate=0.005')


def test_lm_methods_sweep_expands_to_one_run_per_method(tmp_path):
  runs = grid.expand(
      os.path.join(ROOT, 'configs', 'shakespeare_smollm2_methods.py'),
      str(tmp_path))
  assert [r.config.method for r in runs] == [
      'lora', 'lokr', 'vera', 'ia3', 'adalora']
  assert {r.config.task for r in runs} == {'lm'}
  assert runs[2].config.lora.rank == 256
  adalora = runs[4].config.adalora
  assert (adalora.init_r, adalora.target_r, adalora.tinit,
          adalora.tfinal) == (12, 8, 10, 20)


# ---- end to end --------------------------------------------------------------


@pytest.fixture(scope='module')
def method_run(tmp_path_factory):
  """Runs a method's smoke config once per module: (config, summary, dir)."""
  runs = {}

  def get(name, config_name=METHODS_CONFIG, **overrides):
    if name not in runs:
      workdir = tmp_path_factory.mktemp(name)
      config = load_config(config_name, **{**SHORT, **overrides})
      runs[name] = (config, train.train_and_evaluate(config, str(workdir)),
                    workdir)
    return runs[name]
  return get


RUNS = {
    'dora': dict(method='dora'),
    'ia3': dict(method='ia3'),
    'loha': dict(method='loha'),
    'lm_ia3': dict(config_name='shakespeare_smollm2_lora', method='ia3'),
    'qlora_int8': dict(method='qlora', quant='int8'),
    'bottleneck_houlsby': dict(method='bottleneck',
                               **{'bottleneck.style': 'houlsby',
                                  'bottleneck.size': 4}),
    'prompt': dict(method='prompt', **{'prompt.num_tokens': 3}),
    'prefix_mlp': dict(method='prefix', **{'prefix.num_tokens': 2,
                                           'prefix.mlp_hidden': 8}),
    'lm_qlora_nf4': dict(config_name='shakespeare_smollm2_qlora'),
}


@pytest.mark.parametrize('name', list(RUNS))
def test_method_trains_end_to_end(name, method_run):
  config, summary, workdir = method_run(name, **RUNS[name])
  rows = metrics_lib.read_jsonl(str(workdir / 'metrics.jsonl'))
  assert list(rows) == list(range(1, config.num_train_steps + 1))
  assert all(np.isfinite(r['loss']) for r in rows.values())
  assert np.isfinite(summary['test']['loss'])
  assert summary['method'] == config.method
  _, meta = ckpt_lib.read_meta(workdir / 'checkpoints')
  n_saved = sum(int(np.prod(s)) for s, _ in meta['shapes'].values())
  assert n_saved == summary['trainable_params'] < summary['all_params'] / 10


@pytest.mark.parametrize('name', ['qlora_int8', 'lm_qlora_nf4'])
def test_qlora_checkpoint_holds_no_base_kernel(name, method_run):
  config, summary, workdir = method_run(name, **RUNS[name])
  _, meta = ckpt_lib.read_meta(workdir / 'checkpoints')
  actions = [a for _, a in meta['spec']['rules'] if isinstance(a, dict)]
  assert [a['method'] for a in actions] == ['QLora', 'Quantized']
  assert {a['quant'] for a in actions} == {config.quant}
  saved = list(meta['shapes'])
  assert all(p.startswith('adapters/') or p.startswith('params/classifier/')
             for p in saved), saved
  assert any(p.startswith('adapters/') for p in saved)
  # Only the adapters (float32, plus the head): nothing the size of the
  # base, quantized or not.
  assert summary['adapter_bytes'] < 8 * 4 * summary['trainable_params']
  assert summary['adapter_bytes'] < 4 * (summary['all_params']
                                         - summary['trainable_params']) / 20


def test_prefix_mlp_is_folded_at_the_end(method_run):
  config, summary, workdir = method_run('prefix_mlp', **RUNS['prefix_mlp'])
  trainable, _ = ckpt_lib.restore_trainable(
      workdir / 'checkpoints', train.tasks.build_task(config).split_params()[0],
      ckpt_lib.read_meta(workdir / 'checkpoints')[1])
  assert set(trainable['prompts']) == {'prefix_mlp'}  # Kept for resuming.
  with np.load(summary['prompts_file']) as folded:
    assert set(folded.files) == {'prefix'}
    want = prompts.fold(trainable['prompts'])['prefix']
    np.testing.assert_allclose(folded['prefix'], want, rtol=1e-5, atol=1e-7)
    assert folded['prefix'].shape == (2, 2, 2, 4, 8)  # [L, 2, n, heads, hd]
    assert summary['prompts_params'] == folded['prefix'].size


def test_prompts_resume_exactly(method_run, tmp_path):
  config, _, workdir = method_run('prompt', **RUNS['prompt'])
  steps = config.num_train_steps
  again = tmp_path / 'resumed'
  shutil.copytree(workdir, again)
  shutil.rmtree(again / 'checkpoints' / str(steps))
  os.remove(again / 'summary.json')
  os.remove(again / 'metrics.jsonl')  # Only the resumed steps' rows.
  summary = train.train_and_evaluate(config, str(again))
  assert summary['resumed_from'] == steps - 2

  def final(folder):
    out, _ = ckpt_lib.restore_trainable(
        folder / 'checkpoints',
        ckpt_lib.abstract(train.tasks.build_task(config).split_params()[0]),
        ckpt_lib.read_meta(folder / 'checkpoints')[1], steps)
    return jax.device_get(out)

  got, want = final(again), final(workdir)
  assert set(got['prompts']) == {'prompt'}
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got),
                               jax.tree_util.tree_leaves_with_path(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  resumed = metrics_lib.read_jsonl(str(again / 'metrics.jsonl'))
  first = metrics_lib.read_jsonl(str(workdir / 'metrics.jsonl'))
  assert list(resumed) == [steps - 1, steps]
  assert [r['loss'] for r in resumed.values()] == [
      first[s]['loss'] for s in resumed]
