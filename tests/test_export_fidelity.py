"""Exports reproduce or refuse: every PEFT or merged Hugging Face export gives,
in transformers / PEFT, the logits lorajax gives (1e-4), or it raises a
ValueError that says what the target cannot express and writes nothing.

The models are tiny random BERTs (2 layers, H=16), so the peer runs in
float32 in well under a second; the main job's config is run shrunk
(``:smoke``) through training and ``export_checkpoint``.
"""

import json

import jax
import numpy as np
import pytest

import lorajax
from lorajax import kernels
from lorajax import Lora, LoraSpec
from lorajax.io import hf_models
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.methods import bottleneck
from lorajax.methods import dora
from lorajax.methods import qlora
from lorajax.models import bert
from lorajax.training import finished
from lorajax.training import tasks
from lorajax.training import train
import toy_models

TOL = 1e-4
IDS = np.array([[2, 17, 33, 5, 41, 9, 3, 0],
                [2, 60, 11, 3, 0, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
QV = r'.*/attention/(query|value)/kernel'


@pytest.fixture(scope='module')
def peer():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  torch.set_num_threads(2)
  return torch, transformers, peft


def _tiny(pooling='cls', num_labels=2, seed=0):
  config = bert.BertConfig(vocab_size=64, hidden_size=16, num_layers=2,
                           num_heads=2, intermediate_size=32, max_position=16,
                           num_labels=num_labels, pooling=pooling)
  params = bert.Bert(config).init(jax.random.key(seed), IDS)['params']
  rng = np.random.default_rng(seed)
  # Unit-scale heads so that logits are O(1), not ~0.01.
  params = dict(params, classifier={
      'kernel': rng.standard_normal((16, num_labels)).astype(np.float32),
      'bias': rng.standard_normal(num_labels).astype(np.float32)})
  return config, params


def _randomize(tree, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x) + scale * rng.standard_normal(
          np.shape(x)).astype(np.float32), tree)


def _ours(config, spec, params, adapters):
  model = bert.Bert(config)
  fn = lorajax.lora(lambda p, *a: model.apply({'params': p}, *a).logits,
                    spec)
  return np.asarray(jax.jit(fn)(params, adapters, IDS, MASK))


def _theirs(peer, model):
  torch = peer[0]
  with torch.no_grad():
    out = model.eval()(input_ids=torch.tensor(IDS, dtype=torch.long),
                       attention_mask=torch.tensor(MASK, dtype=torch.long))
  return out.logits.numpy()


def _close(ours, theirs, what):
  diff = float(np.abs(ours - theirs).max())
  print(f'{what}: max |logit diff| {diff:.1e}')
  np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL, err_msg=what)


def _check_both(peer, tmp_path, config, spec, params, adapters, *,
                base=None):
  """Exports PEFT and merged; both must give lorajax's logits."""
  _, transformers, peft = peer
  ours = _ours(config, spec, params, adapters)
  auto = transformers.AutoModelForSequenceClassification
  hf_models.export_merged(tmp_path / 'merged', config, params, adapters, spec)
  _close(ours, _theirs(peer, auto.from_pretrained(str(tmp_path / 'merged'))),
         'merged')
  peft_export.export_peft(tmp_path / 'peft', config, spec, adapters,
                          params if base is None else base)
  hf_models.export_merged(tmp_path / 'base', config,
                          params if base is None else base)
  model = peft.PeftModel.from_pretrained(
      auto.from_pretrained(str(tmp_path / 'base')), str(tmp_path / 'peft'))
  _close(ours, _theirs(peer, model), 'PEFT')
  return ours


# ---- the main job --------------------------------------------------------------


def test_main_job_exports_reproduce_its_logits(peer, tmp_path):
  """``configs/rt_minilm_lora.py`` (shrunk): what it trains is what its PEFT
  and merged exports compute in transformers."""
  _, transformers, peft = peer
  config = toy_models.load_config('rt_minilm_lora', num_train_steps=4,
                                  eval_every=4, checkpoint_every=4)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = {fmt: finished.export_checkpoint(config, workdir, str(tmp_path / fmt),
                                         fmt)
         for fmt in ('lorajax', 'peft', 'merged')}
  task = tasks.build_task(config)
  bundle = lorajax.io.load_adapter(out['lorajax'], task.original_params)
  apply_fn = tasks.classifier_apply(bert.Bert(task.model_config),
                                    config.model.pooling)
  batch = {'input_ids': IDS, 'attention_mask': MASK,
           'token_type_ids': np.zeros_like(IDS)}
  ours = np.asarray(jax.jit(lorajax.lora(apply_fn, bundle.spec))(
      bundle.params_for(task.original_params), bundle.adapters, batch))
  auto = transformers.AutoModelForSequenceClassification
  _close(ours, _theirs(peer, auto.from_pretrained(out['merged'])),
         'main job merged')
  hf_models.export_merged(tmp_path / 'base', task.model_config,
                          task.original_params)
  model = peft.PeftModel.from_pretrained(
      auto.from_pretrained(str(tmp_path / 'base')), out['peft'])
  _close(ours, _theirs(peer, model), 'main job PEFT')


# ---- what exports faithfully ---------------------------------------------------


@pytest.mark.parametrize('rules', [
    [(QV, Lora(rank=2, alpha=4))],
    [(QV, Lora(rank=2, alpha=4, use_rslora=True))],
    [(QV, dora.Dora(rank=2, alpha=4))],
    [(QV, dora.Dora(rank=2, alpha=4, use_rslora=True))],
    [(QV, Lora(rank=2, alpha=4, dropout=0.1)), (r'pooler/.*', 'train'),
     (r'classifier/.*', 'train')],
    [(r'.*/(intermediate|output)/kernel', Lora(rank=3, alpha=2)),
     (r'pooler/kernel', Lora(rank=2, alpha=8))],
], ids=['lora', 'rslora', 'dora', 'dora_rslora', 'trained_pooler_dropout',
        'ffn_and_pooler'])
def test_lora_variants_export_faithfully(peer, tmp_path, rules):
  config, params = _tiny()
  spec = LoraSpec(rules + [(r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, jax.random.key(1)), 2)
  base = params
  if any(rule == 'train' for _, rule in rules):
    params = dict(params, pooler=_randomize(params['pooler'], 3),
                  classifier=_randomize(params['classifier'], 4))
  ours = _check_both(peer, tmp_path, config, spec, params, adapters)
  plain = bert.Bert(config).apply({'params': base}, IDS, MASK).logits
  moved = float(np.abs(ours - plain).max())
  assert moved > 10 * TOL, moved   # the adapter matters far beyond TOL


def test_quantized_base_exports_merged_not_peft(peer, tmp_path):
  """QLoRA ran on dequant(W): the merged export folds the adapter into the
  dequantized kernels (faithful); PEFT would put it on the float W."""
  _, transformers, _ = peer
  config, params = _tiny()
  spec = LoraSpec([(QV, qlora.QLora(rank=2, alpha=4, quant='int8')),
                   (r'.*/intermediate/kernel', qlora.Quantized('int8')),
                   (r'.*', 'freeze')])
  quantized = lorajax.quantize_params(params, spec)
  adapters = _randomize(lorajax.init(spec, quantized, jax.random.key(1)), 2)
  ours = _ours(config, spec, quantized, adapters)
  hf_models.export_merged(tmp_path / 'merged', config, quantized, adapters,
                          spec)
  auto = transformers.AutoModelForSequenceClassification
  _close(ours, _theirs(peer, auto.from_pretrained(str(tmp_path / 'merged'))),
         'QLoRA merged')
  for base in (quantized, params):
    with pytest.raises(peft_format.PeftFormatError,
                       match="quantized kernel.*Export format 'merged'"):
      peft_export.export_peft(tmp_path / 'peft', config, spec, adapters, base)
  assert not (tmp_path / 'peft').exists()


def test_mean_pooling_is_the_token_mean():
  """``BertConfig(pooling='mean')`` is what the main job used to compute in
  its task: the head on the float32 mean of the real tokens."""
  config, params = _tiny(pooling='mean')
  out = bert.Bert(config).apply({'params': params}, IDS, MASK)
  head = params['classifier']
  want = bert.mean_pool(out.hidden, MASK) @ head['kernel'] + head['bias']
  np.testing.assert_allclose(out.logits, want, rtol=1e-6, atol=1e-6)
  cls = bert.Bert(config.replace(pooling='cls')).apply({'params': params},
                                                       IDS, MASK)
  assert np.abs(cls.logits - out.logits).max() > 0.1
  with pytest.raises(ValueError, match="pooling='max'"):
    config.replace(pooling='max')


# ---- what is refused, and nothing written --------------------------------------


def _case(name):
  """(config, spec, params, adapters) of a refused export."""
  config, params = _tiny()
  spec = LoraSpec([(QV, Lora(rank=2, alpha=4)), (r'.*', 'freeze')])
  if name == 'mean_pooling':
    config = config.replace(pooling='mean')
  elif name == 'bottleneck':
    spec = LoraSpec(bottleneck.pfeiffer_rules(4) + [(r'.*', 'freeze')])
  elif name == 'head_shape':
    params = dict(params, classifier={'kernel': np.ones((16, 3), np.float32),
                                      'bias': np.zeros(3, np.float32)})
  elif name == 'extra_param':
    params = dict(params, adapter_gate={'scale': np.ones(16, np.float32)})
  adapters = lorajax.init(spec, params, jax.random.key(1))
  return config, spec, params, adapters


@pytest.mark.parametrize('name, peft_match, merged_match', [
    ('mean_pooling', r"pooling='mean' cannot be exported.*\[CLS\]",
     r"pooling='mean' cannot be exported.*\[CLS\]"),
    ('bottleneck', 'Bottleneck adapters have no PEFT format',
     'not linear in the kernel'),
    ('head_shape', r'classifier/kernel has shape \(16, 3\).*num_labels=2',
     r'classifier/kernel has shape \(16, 3\).*num_labels=2'),
    ('extra_param', r'no key in BertForSequenceClassification.*adapter_gate',
     r'no key in BertForSequenceClassification.*adapter_gate'),
])
def test_unfaithful_exports_are_refused_and_write_nothing(
    tmp_path, name, peft_match, merged_match):
  config, spec, params, adapters = _case(name)
  with pytest.raises(ValueError, match=peft_match):
    peft_export.export_peft(tmp_path / 'peft', config, spec, adapters, params)
  with pytest.raises(ValueError, match=merged_match):
    hf_models.export_merged(tmp_path / 'merged', config, params, adapters,
                            spec)
  assert list(tmp_path.iterdir()) == []


def test_prompt_tuning_run_is_refused_before_anything(tmp_path):
  config = toy_models.load_config('rt_minilm_lora', method='prompt')
  for fmt in ('peft', 'merged'):
    with pytest.raises(ValueError, match='trains virtual tokens'):
      finished.export_checkpoint(config, str(tmp_path / 'run'),
                                 str(tmp_path / fmt), fmt)
  assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_directory_as_it_was(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'config.json').write_text('{"old": 1}')
  with pytest.raises(TypeError):
    hf_models.write_files(out, {'model.safetensors': {
        'w': np.zeros(2, np.float32)}, 'config.json': {'bad': object()}})
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
  assert sorted(p.name for p in out.iterdir()) == ['config.json']
  assert json.loads((out / 'config.json').read_text()) == {'old': 1}


def test_adapter_of_a_transposed_kernel_is_not_written_as_peft(tmp_path):
  """PEFT applies lora_A/lora_B to a Linear as [in, out] factors; an adapter
  recorded for a kernel used as x·Wᵀ ([out, in]) would be applied
  transposed."""
  config, params = _tiny()
  spec = LoraSpec([(QV, Lora(rank=2, alpha=4)), (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, jax.random.key(1))
  path = 'encoder/layer_0/attention/query/kernel'
  node = lorajax.spec.get_by_path(adapters, path)
  lorajax.spec.set_by_path(adapters, path, kernels.AdapterParams(
      node, layout=kernels.KernelLayout(0, (1,), (0,))))
  with pytest.raises(peft_format.PeftFormatError,
                     match=r'used as \[out, in\].*logits would differ'):
    peft_export.export_peft(tmp_path / 'peft', config, spec, adapters, params)
  assert list(tmp_path.iterdir()) == []
