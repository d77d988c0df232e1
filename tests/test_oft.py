"""OFT: the provider (PEFT 0.21.2's rotation math, every kernel layout,
merge), Hugging Face PEFT (the peer) both ways on a tiny BERT, Llama and
Qwen2 written by transformers' save_pretrained, and training through the
config system."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import LoraSpec
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.io import spec_json
from lorajax.methods import oft as oft_lib
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib
from lorajax.training import metrics as metrics_lib
from lorajax.training import train

import toy_models
from test_kron_vera import IDS
from test_kron_vera import MASK
from test_kron_vera import MEASURED
from test_kron_vera import TARGETS
from test_kron_vera import _close
from test_kron_vera import _ours
from test_kron_vera import _torch_logits
from test_kron_vera import _torch_model
from test_kron_vera import checkpoints  # pylint: disable=unused-import
from test_more_methods import _check_provider

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

TARGETS = {**TARGETS, 'qwen2': TARGETS['llama']}


@pytest.fixture(scope='module')
def qwen2_dir(tmp_path_factory):
  """A tiny Qwen2ForCausalLM (q/k/v biases: OFT must leave them alone)."""
  return toy_models.tiny_qwen2_dir(tmp_path_factory.mktemp('qwen2'))


def _model_dir(name, checkpoints, qwen2_dir):  # pylint: disable=redefined-outer-name
  return qwen2_dir if name == 'qwen2' else checkpoints(name)


def _hf_model(directory, name):
  if name == 'qwen2':
    return transformers.Qwen2ForCausalLM.from_pretrained(
        directory, attn_implementation='eager').eval()
  return _torch_model(directory, name)


# ---- the provider ----------------------------------------------------------


@pytest.mark.parametrize('use,provider', [
    ('flax', oft_lib.Oft(block_size=5)),
    ('torch', oft_lib.Oft(block_size=0, r=1)),
    ('lhs', oft_lib.Oft(block_size=5, cayley_neumann=False)),
    ('multi_in', oft_lib.Oft(block_size=3)),
    ('multi_in', oft_lib.Oft(block_size=2, block_share=True)),
    ('multi_out', oft_lib.Oft(block_size=5, neumann_terms=3))],
                         ids=['flax', 'torch', 'lhs_cayley', 'multi_in',
                              'multi_in_share', 'multi_out_3terms'])
def test_merged_equals_adapted_and_base_at_init(use, provider):
  """float32: adapted == merged (1e-5), unmerge restores, gradients equal
  the merged formulation's, and the base at init."""
  _check_provider(use, provider)


def test_scanned_kernels_get_stacked_blocks():
  """A kernel stack [L, in, out] under lax.scan: one set of blocks a layer,
  merged == adapted, and the function under jit compiles once."""
  w = jax.random.normal(jax.random.key(0), (3, 6, 6))

  def fn(p, x):
    return jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p['w'])[0]

  x = jax.random.normal(jax.random.key(1), (2, 6))
  spec = LoraSpec([('w', oft_lib.Oft(block_size=3))])
  adapters = lorajax.init(spec, {'w': w}, jax.random.key(2), fn=fn, args=(x,))
  assert adapters['w']['skew'].shape == (3, 2, 3)
  adapters = toy_models.perturb(adapters, scale=0.5)
  g = jax.jit(lorajax.lora(fn, spec))
  merged = lorajax.merge({'w': w}, adapters, spec)
  np.testing.assert_allclose(g({'w': w}, adapters, x), fn(merged, x),
                             rtol=1e-5, atol=1e-5)
  g({'w': w}, toy_models.perturb(adapters, seed=3), x)
  assert g._cache_size() == 1   # pylint: disable=protected-access


@pytest.mark.parametrize('kw', [
    {}, dict(num_cayley_neumann_terms=3), dict(num_cayley_neumann_terms=7),
    dict(use_cayley_neumann=False), dict(block_share=True)],
                         ids=['neumann5', 'neumann3', 'neumann7', 'cayley',
                              'share'])
def test_linear_equals_peft_s(kw):
  """A PEFT OFT Linear (random oft_R) against Oft on its [in, out] kernel:
  outputs, and the merged kernel against PEFT's merge."""
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(12, 5))
  pm = peft.get_peft_model(net, peft.OFTConfig(
      oft_block_size=4, target_modules=['0'], init_weights=False, **kw))
  layer = pm.base_model.model[0]
  with torch.no_grad():
    layer.oft_R['default'].weight.mul_(4.0)   # rotations far from I
    x = torch.randn(3, 12)
    want = pm(x).numpy()
  skew = layer.oft_R['default'].weight.detach().numpy()
  w = layer.base_layer.weight.detach().numpy().T.copy()   # Flax [in, out]
  bias = layer.base_layer.bias.detach().numpy()
  provider = oft_lib.Oft(block_size=4, block_share=kw.get('block_share', False),
                         cayley_neumann=kw.get('use_cayley_neumann', True),
                         neumann_terms=kw.get('num_cayley_neumann_terms', 5))
  spec = LoraSpec([('w', provider)])
  adapters = lorajax.init(spec, {'w': jnp.asarray(w)}, jax.random.key(0))
  assert adapters['w']['skew'].shape == skew.shape
  adapters = jax.tree.map(lambda _: jnp.asarray(skew), adapters)
  fn = lambda p, x: x @ p['w'] + bias  # pylint: disable=unnecessary-lambda-assignment
  got = lorajax.lora(fn, spec)({'w': w}, adapters, jnp.asarray(x.numpy()))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  pm.merge_adapter()
  merged = lorajax.merge({'w': jnp.asarray(w)}, adapters, spec)['w']
  np.testing.assert_allclose(merged, layer.base_layer.weight.detach().T,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kw,match', [
    (dict(block_size=32, r=4), 'exactly one of block_size and r'),
    (dict(block_size=0), 'exactly one of block_size and r'),
    (dict(neumann_terms=0), 'neumann_terms must be'),
    (dict(block_size=-2), 'block_size must be an integer >= 0')])
def test_bad_provider_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    oft_lib.Oft(**kw)


def test_block_size_that_does_not_divide_is_refused():
  """PEFT would move the block size with a warning; lorajax names it."""
  spec = LoraSpec([('w', oft_lib.Oft(block_size=5))])
  with pytest.raises(ValueError, match=r"w: Oft block_size=5 does not split "
                     r"the kernel's input of 12"):
    lorajax.init(spec, {'w': jnp.ones((12, 3))}, jax.random.key(0))
  with pytest.raises(ValueError, match='r=5 does not split'):
    lorajax.init(LoraSpec([('w', oft_lib.Oft(block_size=0, r=5))]),
                 {'w': jnp.ones((12, 3))}, jax.random.key(0))


def test_spec_round_trips_json():
  spec = LoraSpec([('q', oft_lib.Oft(block_size=0, r=4, block_share=True,
                                     cayley_neumann=False)),
                   ('.*', 'freeze')])
  assert spec_json.spec_from_json(spec_json.spec_to_json(spec)) == spec


# ---- lorajax -> PEFT -> lorajax --------------------------------------------


@pytest.mark.parametrize('name,provider', [
    ('bert', oft_lib.Oft(block_size=8)),
    ('llama', oft_lib.Oft(block_size=0, r=4)),
    ('qwen2', oft_lib.Oft(block_size=4, block_share=True, neumann_terms=4))])
def test_export_loads_in_peft(checkpoints, qwen2_dir, tmp_path, name,  # pylint: disable=redefined-outer-name
                              provider):
  directory = _model_dir(name, checkpoints, qwen2_dir)
  model = lorajax.models.load(directory)
  spec = LoraSpec([(TARGETS[name][1], provider), ('.*', 'freeze')])
  adapters = toy_models.perturb(
      lorajax.init(spec, model.params, jax.random.key(1)), seed=2, scale=0.3)
  ours = _ours(model, spec, adapters, name)
  base = _torch_logits(_hf_model(directory, name), name)
  assert np.abs(ours - base).max() > 1e-2   # the adapter changes the logits
  peft_export.export_peft(tmp_path, model.config, spec, adapters, model.params,
                          source=directory)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert (cfg['peft_type'], cfg['oft_block_size'], cfg['r']) == (
      'OFT', provider.block_size, provider.r)
  pm = peft.PeftModel.from_pretrained(_hf_model(directory, name), tmp_path)
  _close(f'{name} oft lorajax->PEFT', ours, _torch_logits(pm, name))
  back = peft_format.import_peft(tmp_path, model.config, model.params,
                                 source=directory)
  assert [a for _, a in back.spec.rules if not isinstance(a, str)] == [
      provider]
  again = _ours(model, back.spec, back.adapters, name,
                back.params_for(model.params))
  _close(f'{name} oft round trip', again, ours)
  merged = lorajax.merge(model.params, adapters, spec)
  plain = jax.jit(model.apply)(merged, jnp.asarray(IDS), jnp.asarray(MASK)
                               if name == 'bert' else None)
  _close(f'{name} oft merged', np.asarray(plain), ours)


# ---- PEFT -> lorajax ---------------------------------------------------------


def _peft_made(directory, name, out, **kw):
  torch.manual_seed(0)
  cfg = peft.OFTConfig(**{'oft_block_size': 8, **kw},
                       target_modules=TARGETS[name][0], init_weights=False)
  pm = peft.get_peft_model(_hf_model(directory, name), cfg)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if 'oft_R' in n:
        p.add_(torch.randn_like(p) * 0.3)
  pm.save_pretrained(out)
  return _torch_logits(pm.eval(), name)


@pytest.mark.parametrize('name,kw', [
    ('bert', {}),
    ('llama', dict(oft_block_size=0, r=4, use_cayley_neumann=False)),
    ('llama', dict(oft_block_size=4, block_share=True, module_dropout=0.1,
                   num_cayley_neumann_terms=3)),
    ('qwen2', {})], ids=['bert', 'llama-r_cayley', 'llama-share_3terms',
                         'qwen2'])
def test_peft_adapter_imports(checkpoints, qwen2_dir, tmp_path, name, kw):  # pylint: disable=redefined-outer-name
  directory = _model_dir(name, checkpoints, qwen2_dir)
  model = lorajax.models.load(directory)
  theirs = _peft_made(directory, name, tmp_path, **kw)
  base = _torch_logits(_hf_model(directory, name), name)
  assert np.abs(theirs - base).max() > 1e-2
  imported = peft_format.import_peft(tmp_path, model.config, model.params,
                                     source=directory)
  ours = _ours(model, imported.spec, imported.adapters, name,
               imported.params_for(model.params))
  _close(f'{name} oft{kw or ""} PEFT->lorajax', ours, theirs)


@pytest.mark.parametrize('field,value,match', [
    ('coft', True, 'coft=True is not supported'),
    ('bias', 'all', "bias='all' is not supported"),
    ('fan_in_fan_out', True, 'fan_in_fan_out=True is not supported'),
    ('peft_version', '0.17.1', "peft_version='0.17.1'"),
    ('peft_version', None, 'peft_version=None'),
    ('oft_block_size', None, 'no oft_block_size'),
    ('r', 4, 'exactly one must be'),
    ('num_cayley_neumann_terms', 0, 'num_cayley_neumann_terms=0')])
def test_unimplemented_peft_options_are_refused(checkpoints, tmp_path, field,  # pylint: disable=redefined-outer-name
                                                value, match):
  directory = checkpoints('llama')
  model = lorajax.models.load(directory)
  _peft_made(directory, 'llama', tmp_path)
  path = tmp_path / 'adapter_config.json'
  cfg = json.loads(path.read_text())
  if value is None:
    del cfg[field]
  else:
    cfg[field] = value
  path.write_text(json.dumps(cfg))
  with pytest.raises(peft_format.PeftFormatError, match=match):
    peft_format.import_peft(tmp_path, model.config, model.params,
                            source=directory)


def test_mixed_oft_options_are_refused_on_export(checkpoints, tmp_path):  # pylint: disable=redefined-outer-name
  directory = checkpoints('llama')
  model = lorajax.models.load(directory)
  spec = LoraSpec([(r'.*/q_proj/kernel', oft_lib.Oft(block_size=8)),
                   (r'.*/v_proj/kernel', oft_lib.Oft(block_size=4)),
                   ('.*', 'freeze')])
  adapters = lorajax.init(spec, model.params, jax.random.key(0))
  with pytest.raises(peft_format.PeftFormatError,
                     match='one OFT configuration per adapter'):
    peft_export.export_peft(tmp_path / 'x', model.config, spec, adapters,
                            model.params, source=directory)
  assert not (tmp_path / 'x').exists()


# ---- the config system -----------------------------------------------------


@pytest.mark.parametrize('fields,match', [
    ({'oft.r': 4}, r'config.oft \(block_size=32, r=4.*exactly one'),
    ({'oft.neumann_terms': 0}, 'neumann_terms=0'),
    ({'lora.dropout': 0.1}, "method='oft' has no lora.dropout")])
def test_bad_oft_config_is_refused(fields, match):
  config = toy_models.load_config('rt_minilm_methods', method='oft', **fields)
  with pytest.raises(ValueError, match=match):
    config_lib.make_spec(config)


def test_config_method_trains_and_resumes_exactly(tmp_path):
  """config.method='oft' (smoke MiniLM, blocks of 8 on query and value) runs
  2 steps; resumed from step 1 it ends with the same blocks and loss."""
  config = toy_models.load_config(
      'rt_minilm_methods', method='oft', num_train_steps=2, eval_every=2,
      checkpoint_every=1, **{'oft.block_size': 8})
  workdir = tmp_path / 'run'
  summary = train.train_and_evaluate(config, str(workdir))
  rows = metrics_lib.read_jsonl(str(workdir / 'metrics.jsonl'))
  assert list(rows) == [1, 2] and summary['method'] == 'oft'
  assert all(np.isfinite(r['loss']) for r in rows.values())
  _, meta = ckpt_lib.read_meta(workdir / 'checkpoints')
  shapes = {p: tuple(s) for p, (s, _) in meta['shapes'].items()
            if p.startswith('adapters/')}
  assert shapes and all(s == (4, 28) for s in shapes.values()), shapes
  again = tmp_path / 'again'
  shutil.copytree(workdir, again)
  shutil.rmtree(again / 'checkpoints' / '2')
  os.remove(again / 'summary.json')
  os.remove(again / 'metrics.jsonl')
  assert train.train_and_evaluate(config, str(again))['resumed_from'] == 1
  task = train.tasks.build_task(config)

  def final(folder):
    out, _ = ckpt_lib.restore_trainable(
        folder / 'checkpoints', ckpt_lib.abstract(task.split_params()[0]),
        ckpt_lib.read_meta(folder / 'checkpoints')[1], 2)
    return jax.device_get(out)

  ends = [final(again), final(workdir)]
  skews = [l for p, l in jax.tree_util.tree_leaves_with_path(ends[1])
           if 'skew' in jax.tree_util.keystr(p)]
  assert skews and all(np.abs(s).max() > 0 for s in skews)  # it trained
  for a, b in zip(*map(jax.tree.leaves, ends)):
    np.testing.assert_array_equal(a, b)
  resumed = metrics_lib.read_jsonl(str(again / 'metrics.jsonl'))
  assert [r['loss'] for r in resumed.values()] == [rows[2]['loss']]


def test_zz_print_measured():
  for what, delta in sorted(MEASURED.items()):
    if ' oft' in what:
      print(f'{what}: {delta:.2e}')
