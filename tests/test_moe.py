"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE) against transformers.

transformers writes tiny random checkpoints with ``save_pretrained`` (its
per-expert file format) and is the peer: ``lorajax.models.load`` must give
its logits (float32, |Δ| <= 1e-4·(1 + |logit|)) and its greedy ``generate``
tokens. LoRA on the expert kernels gives one adapter per expert; a config
value lorajax does not implement is refused by name.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorajax
from lorajax import assets
import lorajax.models
from lorajax.io import hf_models
from lorajax.io import hf_targets
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.io import peft_moe
from lorajax.models import bpe_tokenizer
from lorajax.models import hf_moe
from lorajax.models import llama_loading
from lorajax.models import lm
from lorajax.models import moe
from lorajax.training import metrics as metrics_lib
from lorajax.training import train

from toy_models import load_config

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, initializer_range=0.2,
            num_experts_per_tok=2)
CASES = {
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM',
                dict(intermediate_size=24, num_local_experts=4)),
    'mixtral_window': ('MixtralConfig', 'MixtralForCausalLM',
                       dict(intermediate_size=24, num_local_experts=4,
                            sliding_window=4)),
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM',
                  dict(intermediate_size=64, moe_intermediate_size=16,
                       num_experts=4, norm_topk_prob=True)),
    'qwen3_moe_unnormed': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM',
                           dict(intermediate_size=64, moe_intermediate_size=16,
                                num_experts=5, num_experts_per_tok=3,
                                norm_topk_prob=False, attention_bias=True)),
}


def _save(directory, config_cls, model_cls, **fields):
  """Writes a random checkpoint (norms and biases perturbed) and returns
  the float32 transformers model."""
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**(BASE | fields))
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.add_(torch.randn_like(p) * 0.3)
  model.save_pretrained(directory)
  return model


def _ids(shape, vocab=97, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape)


def _assert_logits_close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  tol = 1e-4 * (1 + np.abs(want))
  assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want))


# 'mixtral' itself is the base of the PEFT tests below, checked there.
@pytest.mark.parametrize('name', ['mixtral_window', 'qwen3_moe',
                                  'qwen3_moe_unnormed'])
def test_logits_match_transformers(tmp_path, name):
  peer = _save(tmp_path, *CASES[name][:2], **CASES[name][2])
  ids = _ids((2, 11))
  with torch.no_grad():
    want = peer(torch.tensor(ids)).logits.numpy()
  model = lorajax.models.load(tmp_path)
  assert isinstance(model.module, moe.MoeDecoder)
  assert model.architecture == CASES[name][1]
  _assert_logits_close(model.apply(model.params, jnp.asarray(ids)), want)


def test_bare_model_hidden_states_match_transformers(tmp_path):
  torch.manual_seed(0)
  fields = BASE | CASES['qwen3_moe'][2]
  config = transformers.Qwen3MoeConfig(**fields)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  peer = transformers.Qwen3MoeModel(config).eval()
  peer.save_pretrained(tmp_path)
  ids = _ids((2, 9), seed=3)
  with torch.no_grad():
    want = peer(torch.tensor(ids)).last_hidden_state.numpy()
  model = lorajax.models.load(tmp_path)
  assert model.head == 'base'
  _assert_logits_close(model.apply(model.params, jnp.asarray(ids)), want)


@pytest.mark.parametrize('name', ['mixtral_window', 'qwen3_moe'])
def test_greedy_generation_with_cache_matches_transformers(tmp_path, name):
  peer = _save(tmp_path, *CASES[name][:2], **CASES[name][2])
  prompt = _ids((1, 6), seed=5)
  peer.generation_config.eos_token_id = None
  with torch.no_grad():
    want = peer.generate(torch.tensor(prompt), max_new_tokens=12,
                         do_sample=False, pad_token_id=0)[0, 6:].numpy()
  model = lorajax.models.load(tmp_path)
  apply = lambda p, *a, **k: model.module.apply({'params': p}, *a, **k)  # pylint: disable=unnecessary-lambda-assignment
  got = lm.generate(apply, model.params, jnp.asarray(prompt), 12)
  np.testing.assert_array_equal(np.asarray(got)[0], want)


# --- refusals -----------------------------------------------------------------

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """One small checkpoint per family, written once."""
  out = {}
  for name in ('mixtral', 'qwen3_moe'):
    out[name] = tmp_path_factory.mktemp(name)
    _save(out[name], *CASES[name][:2], **CASES[name][2])
  return out


def _flipped(saved, tmp_path, name, **changes):
  directory = tmp_path / name
  shutil.copytree(saved[name], directory)
  path = directory / 'config.json'
  config = json.loads(path.read_text())
  path.write_text(json.dumps(config | changes))
  return directory


@pytest.mark.parametrize('name,field,value,named', [
    ('mixtral', 'router_jitter_noise', 0.1, None),
    ('mixtral', 'hidden_act', 'gelu', None),
    ('mixtral', 'attention_dropout', 0.1, None),
    ('mixtral', 'rope_parameters', {'rope_type': 'linear', 'factor': 2.0,
                                    'rope_theta': 1e6},
     "rope_parameters.rope_type='linear'"),
    ('qwen3_moe', 'decoder_sparse_step', 2, None),
    ('qwen3_moe', 'mlp_only_layers', [0], None),
    ('qwen3_moe', 'shared_expert_intermediate_size', 8, None),
    ('qwen3_moe', 'partial_rotary_factor', 0.5, None),
    ('qwen3_moe', 'num_local_experts', 0, 'num_experts=0'),
])
def test_unimplemented_config_values_are_refused_by_name(
    saved, tmp_path, name, field, value, named):
  directory = _flipped(saved, tmp_path, name, **{field: value})
  with pytest.raises(ValueError,
                     match=re.escape(named or f'{field}={value!r}')):
    lorajax.models.load(directory)


def test_tied_embeddings_contradicted_by_the_tensors_are_refused(saved,
                                                                 tmp_path):
  directory = _flipped(saved, tmp_path, 'mixtral', tie_word_embeddings=True)
  with pytest.raises(ValueError, match='tie_word_embeddings=True'):
    lorajax.models.load(directory)


def test_a_tensor_with_no_place_is_refused(saved, tmp_path):
  directory = _flipped(saved, tmp_path, 'qwen3_moe')
  tensors = safetensors.numpy.load_file(directory / 'model.safetensors')
  tensors['model.layers.0.mlp.shared_expert.up_proj.weight'] = np.ones(
      (8, 32), np.float32)
  safetensors.numpy.save_file(tensors, directory / 'model.safetensors',
                              metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='shared_expert.up_proj'):
    lorajax.models.load(directory)


def test_fused_expert_tensors_load_as_transformers_reads_them(saved,
                                                              tmp_path):
  """transformers 5's own names (3-D ``mlp.experts.gate_up_proj``) load to
  the same numbers as the per-expert files save_pretrained writes."""
  directory = _flipped(saved, tmp_path, 'mixtral')
  peer = transformers.MixtralForCausalLM.from_pretrained(directory).eval()
  fused = {k: v.detach().numpy() for k, v in peer.state_dict().items()}
  assert 'model.layers.0.mlp.experts.gate_up_proj' in fused
  (directory / 'model.safetensors').unlink()
  safetensors.numpy.save_file(fused, directory / 'model.safetensors',
                              metadata={'format': 'pt'})
  ids = _ids((1, 7), seed=2)
  with torch.no_grad():
    want = peer(torch.tensor(ids)).logits.numpy()
  model = lorajax.models.load(directory)
  _assert_logits_close(model.apply(model.params, jnp.asarray(ids)), want)


# --- LoRA on the experts ------------------------------------------------------

def _randomize(tree, seed=1):
  """Every factor random (``b`` starts at zero), drawn with NumPy so that
  no shape costs a compilation."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda l: jnp.asarray(rng.normal(size=l.shape) / 2, l.dtype), tree)


EXPERT_SPEC = lorajax.LoraSpec([
    (r'.*/mlp/experts/.*/kernel', lorajax.Lora(rank=2, alpha=4)),
    (r'.*/attn/(q|v)_proj/kernel', lorajax.Lora(rank=2, alpha=4)),
    (r'.*', 'freeze')])


def test_lora_on_experts_gives_one_adapter_per_expert_and_merges():
  config = moe.MoeConfig.tiny(num_experts=4, expert_size=16, num_layers=1)
  model = moe.MoeDecoder(config)
  ids = jnp.asarray(_ids((2, 8), vocab=256))
  variables = jax.jit(model.init)(jax.random.key(0), ids)
  adapters = lorajax.init(EXPERT_SPEC, variables, jax.random.key(1),
                          fn=model.apply, args=(ids,))
  experts = adapters['params']['layers_0']['mlp']['experts']
  gate_up, down = experts['gate_up_proj']['kernel'], experts['down_proj'][
      'kernel']
  assert gate_up.layout.describe() == '[E, in, out]'
  assert gate_up['a'].shape == (4, 32, 2) and gate_up['b'].shape == (4, 2, 32)
  assert down['a'].shape == (4, 16, 2) and down['b'].shape == (4, 2, 32)
  adapters = _randomize(adapters)
  down = adapters['params']['layers_0']['mlp']['experts']['down_proj'][
      'kernel']
  merged = lorajax.merge(variables, adapters, EXPERT_SPEC)
  kernel = lambda v: v['params']['layers_0']['mlp']['experts']['down_proj'][  # pylint: disable=unnecessary-lambda-assignment
      'kernel']
  # Expert e's kernel moves by (alpha/r)·a[e]·b[e], its own update only.
  np.testing.assert_allclose(
      kernel(merged) - kernel(variables),
      2.0 * np.einsum('eir,ero->eio', down['a'], down['b']), atol=1e-5)
  adapted = jax.jit(lorajax.lora(model.apply, EXPERT_SPEC))(variables,
                                                            adapters, ids)
  np.testing.assert_allclose(adapted, jax.jit(model.apply)(merged, ids),
                             atol=1e-5, rtol=1e-5)


def test_expert_adapters_get_gradients_exactly_where_tokens_went():
  # One expert per token and 3 tokens: at most 3 of 4 experts run a layer.
  config = moe.MoeConfig.tiny(num_experts=4, experts_per_token=1,
                              num_layers=1)
  model = moe.MoeDecoder(config)
  ids = jnp.asarray([[5, 17, 200]])
  variables = jax.jit(model.init)(jax.random.key(0), ids)
  adapters = lorajax.init(EXPERT_SPEC, variables, jax.random.key(1),
                          fn=model.apply, args=(ids,))
  _, captured = jax.jit(lambda v: model.apply(
      v, ids, capture_intermediates=lambda m, _: m.name == 'gate',
      mutable=['intermediates']))(variables)
  router_logits = captured['intermediates']['layers_0']['mlp']['gate'][
      '__call__'][0]
  hit = set(np.asarray(jnp.argmax(router_logits, -1)).tolist())
  fn = lorajax.lora(model.apply, EXPERT_SPEC)
  grads = jax.jit(jax.grad(
      lambda ad: jnp.sum(fn(variables, ad, ids) ** 2)))(adapters)
  for name in ('gate_up_proj', 'down_proj'):
    g = grads['params']['layers_0']['mlp']['experts'][name]['kernel']['b']
    norms = np.abs(np.asarray(g)).reshape(4, -1).max(1)
    for e in range(4):
      assert (norms[e] > 0) == (e in hit), (name, e, hit, norms)


# --- PEFT (target_parameters on the experts) ---------------------------------

peft = pytest.importorskip('peft')

ATTN_AND_EXPERTS = lorajax.LoraSpec([
    (r'.*/mlp/experts/.*/kernel', lorajax.Lora(rank=2, alpha=6)),
    (r'layers_0/mlp/gate/kernel', lorajax.Lora(rank=2, alpha=6)),
    (r'.*/attn/(q|o)_proj/kernel', lorajax.Lora(rank=2, alpha=6)),
    (r'.*', 'freeze')])
ATTN_ONLY = lorajax.LoraSpec([
    (r'.*/attn/(q|k|v|o)_proj/kernel', lorajax.Lora(rank=3, alpha=4)),
    (r'.*', 'freeze')])


@pytest.mark.parametrize('which', ['experts', 'attention'])
def test_peft_export_reproduces_lorajax_logits(saved, tmp_path, which):
  spec = ATTN_AND_EXPERTS if which == 'experts' else ATTN_ONLY
  model = lorajax.models.load(saved['mixtral'])
  ids = jnp.asarray(_ids((2, 9), seed=4))
  adapters = _randomize(lorajax.init(spec, model.params, jax.random.key(2),
                                     fn=model.apply, args=(ids,)))
  ours = jax.jit(lorajax.lora(model.apply, spec))(model.params, adapters,
                                                    ids)
  peft_export.export_peft(tmp_path / 'peft', model.config, spec, adapters,
                          model.params)
  base = transformers.MixtralForCausalLM.from_pretrained(saved['mixtral'])
  peer = peft.PeftModel.from_pretrained(base, tmp_path / 'peft').eval()
  with torch.no_grad():
    want = peer(torch.tensor(np.asarray(ids))).logits.numpy()
  _assert_logits_close(ours, want)


def test_peft_adapter_on_experts_imports(saved, tmp_path):
  base = transformers.Qwen3MoeForCausalLM.from_pretrained(saved['qwen3_moe'])
  torch.manual_seed(1)
  config = peft.LoraConfig(
      r=2, lora_alpha=5, init_lora_weights=False,
      target_modules=['k_proj', 'v_proj'],
      target_parameters=['mlp.experts.down_proj', 'mlp.experts.gate_up_proj',
                         'layers.1.mlp.gate.weight'])
  peer = peft.get_peft_model(base, config).eval()
  peer.save_pretrained(tmp_path / 'peft')
  ids = _ids((2, 9), seed=6)
  with torch.no_grad():
    want = peer(torch.tensor(ids)).logits.numpy()
  model = lorajax.models.load(saved['qwen3_moe'])
  imported = peft_format.import_peft(tmp_path / 'peft', model.config)
  spec, adapters = imported.spec, imported.adapters
  assert adapters['layers_0']['mlp']['experts']['gate_up_proj']['kernel'][
      'a'].shape == (4, 32, 2)
  got = jax.jit(lorajax.lora(model.apply, spec))(model.params, adapters,
                                                   jnp.asarray(ids))
  _assert_logits_close(got, want)
  plain = model.apply(model.params, jnp.asarray(ids))
  assert np.max(np.abs(np.asarray(plain) - want)) > 1e-2  # it adapts


def test_peft_export_refuses_what_param_wrapper_cannot_hold(saved, tmp_path):
  model = lorajax.models.load(saved['mixtral'])
  ids = jnp.asarray(_ids((1, 4)))
  spec = lorajax.LoraSpec([
      (r'.*/mlp/experts/.*/kernel', lorajax.Lora(rank=2, dropout=0.1)),
      (r'.*', 'freeze')])
  adapters = lorajax.init(spec, model.params, jax.random.key(2),
                          fn=model.apply, args=(ids,))
  with pytest.raises(ValueError, match='dropout=0.1'):
    peft_moe.export_moe_lora(tmp_path / 'a', model.config, spec, adapters,
                             model.params)
  spec = lorajax.LoraSpec([
      (r'.*/mlp/experts/.*/kernel', lorajax.Lora(rank=2)),
      (r'.*/attn/q_proj/kernel', lorajax.Lora(rank=4)),
      (r'.*', 'freeze')])
  adapters = lorajax.init(spec, model.params, jax.random.key(2),
                          fn=model.apply, args=(ids,))
  with pytest.raises(ValueError, match='rank, alpha, use_rslora'):
    peft_moe.export_moe_lora(tmp_path / 'b', model.config, spec, adapters,
                             model.params)
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_merged_export_loads_in_transformers_and_lorajax(saved, tmp_path):
  """Expert adapters folded into the kernels: transformers reads the
  export (its own 3-D expert names) and gives lorajax's adapted logits."""
  model = lorajax.models.load(saved['qwen3_moe'])
  ids = jnp.asarray(_ids((2, 9), seed=8))
  adapters = _randomize(lorajax.init(ATTN_AND_EXPERTS, model.params,
                                     jax.random.key(3), fn=model.apply,
                                     args=(ids,)))
  ours = jax.jit(lorajax.lora(model.apply, ATTN_AND_EXPERTS))(
      model.params, adapters, ids)
  hf_models.export_merged(tmp_path / 'merged', model.config, model.params,
                          adapters, ATTN_AND_EXPERTS,
                          source=saved['qwen3_moe'])
  peer = transformers.Qwen3MoeForCausalLM.from_pretrained(
      tmp_path / 'merged').eval()
  with torch.no_grad():
    want = peer(torch.tensor(np.asarray(ids))).logits.numpy()
  _assert_logits_close(ours, want)
  again = lorajax.models.load(tmp_path / 'merged')
  _assert_logits_close(again.apply(again.params, ids), want)


def test_all_linear_targets_what_peft_all_linear_targets(saved):
  """PEFT's ``'all-linear'`` on Mixtral reaches the attention Linears, the
  router and both expert parameters (through ParamWrapper); lorajax's
  shorthand selects the same kernels."""
  model = lorajax.models.load(saved['mixtral'])
  hf = hf_models.hf_model(model.config, source=saved['mixtral'])
  pattern = hf_targets.lora_targets('all-linear', hf, model.params)
  ours = {p for p, _ in lorajax.spec.flatten_paths(model.params)
          if re.fullmatch(pattern, p)}
  base = transformers.MixtralForCausalLM.from_pretrained(saved['mixtral'])
  wrapped = peft.get_peft_model(base, peft.LoraConfig(
      r=2, target_modules='all-linear'))
  names = set()
  for name, module in wrapped.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer):
      name = name.removeprefix('base_model.model.').replace('.base_layer', '')
      names.add(f'{name}.{getattr(module, "parameter_name", "weight")}')
  by_key = {k: p for p, k in hf_moe.hf_keys(model.config).items()}
  assert ours == {by_key[n] for n in names}
  assert 'layers_1/mlp/experts/gate_up_proj/kernel' in ours


def test_scanned_layers_compute_the_same_logits(saved):
  ids = jnp.asarray(_ids((1, 7), seed=9))
  plain = lorajax.models.load(saved['qwen3_moe'])
  scanned = lorajax.models.load(saved['qwen3_moe'], scan_layers=True,
                                remat=True)
  kernel = scanned.params['layers']['mlp']['experts']['gate_up_proj'][
      'kernel']
  assert kernel.shape == (2, 4, 32, 32)  # [L, E, d, 2f]
  np.testing.assert_allclose(
      jax.jit(scanned.apply)(scanned.params, ids),
      jax.jit(plain.apply)(plain.params, ids), atol=1e-5, rtol=1e-5)


def test_lora_all_linear_trains_a_mixtral_directory(tmp_path):
  """config.model.path + lora.targets='all-linear': per-expert adapters on
  a Mixtral directory (SmolLM2's tokenizer beside it) train end to end."""
  reader = llama_loading.as_reader(
      assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
  tok = bpe_tokenizer.gguf_tokenizer(reader)
  directory = tmp_path / 'model'
  _save(directory, 'MixtralConfig', 'MixtralForCausalLM',
        intermediate_size=16, num_local_experts=4,
        vocab_size=tok.get_vocab_size(), tie_word_embeddings=True)
  tok.save(str(directory / 'tokenizer.json'))
  config = load_config('shakespeare_smollm2_lora',
                       **{'model.path': str(directory),
                          'lora.targets': 'all-linear', 'lora.rank': 4})
  summary = train.train_and_evaluate(config, str(tmp_path / 'work'))
  rows = metrics_lib.read_jsonl(str(tmp_path / 'work' / 'metrics.jsonl'))
  assert list(rows) == list(range(1, config.num_train_steps + 1))
  assert all(np.isfinite(r['loss']) for r in rows.values())
  # Per layer: q, k, v, o (256 + 192 + 192 + 256), router (32 + 4) * 4,
  # and one rank-4 adapter per expert on gate_up (4 * 64 * 4) and down
  # (4 * 48 * 4).
  assert summary['trainable_params'] == 2 * (896 + 144 + 1024 + 768)
