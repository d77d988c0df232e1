"""Gemma, Gemma2 and Phi-3 checkpoints through lorajax.models.load.

transformers (a test dependency) writes tiny random checkpoints with
``save_pretrained`` and is the peer: logits and bare hidden states must
equal its outputs (float32, |Δ| <= 1e-4·(1 + |logit|)), greedy generation
with the KV cache must equal its ``generate`` token for token, and every
config value lorajax does not implement is flipped in ``config.json`` and
must be refused by field and value.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorajax
from lorajax import Lora, LoraSpec
import lorajax.models
from lorajax import assets
from lorajax.data import chat
from lorajax.models import bpe_tokenizer
from lorajax.models import hf_decoders
from lorajax.models import hf_files
from lorajax.models import llama
from lorajax.models import llama_loading
from lorajax.models import lm

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, vocab_size=97,
            initializer_range=0.2, pad_token_id=0, eos_token_id=1,
            bos_token_id=2)
# Soft-caps small enough to bite on these weights; a query scale that is
# not head_dim ** -0.5; four layers: sliding, full, sliding, full.
GEMMA2 = dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
              attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
              num_hidden_layers=4)


def _save(directory, family, model_cls, **fields):
  """Writes a random checkpoint (norm weights perturbed off their zero/one
  init, so that a mapping error shows) and returns the float32 model."""
  torch.manual_seed(0)
  config = getattr(transformers, family + 'Config')(**(BASE | fields))
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  model = getattr(transformers, family + model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.add_(torch.randn_like(p) * 0.3)
  model.save_pretrained(directory)
  return model


def _peer(model, ids):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids))
  return (out.logits if hasattr(out, 'logits') else
          out.last_hidden_state).numpy()


def _assert_matches(got, want):
  got = np.asarray(got)
  assert got.shape == want.shape
  np.testing.assert_array_less(np.abs(got - want), 1e-4 * (1 + np.abs(want)))


def _ids(shape, seed=0):
  return np.random.default_rng(seed).integers(3, BASE['vocab_size'], shape)


CASES = {
    # name: (family, head, config fields, load overrides, [features off]).
    # Each feature switched off must move the logits: the checkpoint
    # exercises it.
    'gemma': ('Gemma', 'ForCausalLM', dict(head_dim=16), {},
              [dict(scale_embeddings=False), dict(activation='silu'),
               dict(norm_offset=0.0)]),
    'gemma_bias_untied_legacy_gelu': (
        'Gemma', 'ForCausalLM',
        dict(attention_bias=True, tie_word_embeddings=False,
             hidden_act='gelu'), {}, []),
    'gemma_bare': ('Gemma', 'Model', {}, {}, []),
    'gemma2': ('Gemma2', 'ForCausalLM', GEMMA2, {},
               [dict(attn_softcap=None), dict(final_softcap=None),
                dict(query_scale=None),
                dict(sliding_window=None, sliding_layers=None),
                dict(sliding_layers=None)]),
    'gemma2_scanned': ('Gemma2', 'ForCausalLM', GEMMA2,
                       dict(scan_layers=True), []),
    'gemma2_bare': ('Gemma2', 'Model', GEMMA2, {}, []),
    'phi3_partial_rope': ('Phi3', 'ForCausalLM',
                          dict(partial_rotary_factor=0.5), {},
                          [dict(rope_dim=None)]),
    'phi3_window': ('Phi3', 'ForCausalLM', dict(sliding_window=4), {},
                    [dict(sliding_window=None)]),
    'phi3_bare': ('Phi3', 'Model', {}, {}, []),
}


@pytest.mark.parametrize('name', CASES)
def test_family_matches_transformers(tmp_path, name):
  family, head, fields, overrides, features = CASES[name]
  peer = _save(tmp_path, family, head, **fields)
  ids = _ids((2, 24))
  want = _peer(peer, ids)
  model = lorajax.models.load(tmp_path, **overrides)
  assert model.architecture == family + head
  _assert_matches(model.apply(model.params, jnp.asarray(ids)), want)
  for off in features:
    other = llama.Llama(model.config.replace(**off)).apply(
        {'params': model.params}, jnp.asarray(ids))
    assert float(jnp.max(jnp.abs(other - want))) > 1e-2, off


def test_bfloat16_gemma2_stays_bfloat16_and_matches(tmp_path):
  """Stored bf16: the (1 + weight) norms and sqrt(d) scale read it right."""
  _save(tmp_path, 'Gemma2', 'ForCausalLM', **GEMMA2).to(
      torch.bfloat16).save_pretrained(tmp_path)
  peer = transformers.Gemma2ForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation='eager').eval()
  model = lorajax.models.load(tmp_path)
  dtypes = {x.dtype for x in jax.tree.leaves(model.params)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  ids = _ids((1, 12))
  _assert_matches(model.apply(model.params, jnp.asarray(ids)),
                  _peer(peer, ids))


@pytest.mark.parametrize('name', ['gemma', 'gemma2', 'phi3_window'])
def test_greedy_generation_with_cache_matches_transformers(tmp_path, name):
  family, head, fields, _, _ = CASES[name]
  peer = _save(tmp_path, family, head, **fields)
  prompt = _ids((1, 6))
  peer.generation_config.eos_token_id = None  # 12 tokens, no early stop.
  with torch.no_grad():
    want = peer.generate(torch.tensor(prompt), max_new_tokens=12,
                         do_sample=False, pad_token_id=0)[0, 6:].numpy()
  model = lorajax.models.load(tmp_path)
  apply = lambda p, *a, **k: model.module.apply({'params': p}, *a, **k)
  got = lm.generate(apply, model.params, jnp.asarray(prompt), 12)
  np.testing.assert_array_equal(np.asarray(got)[0], want)  # Past window 4.


@pytest.mark.parametrize('name', ['gemma_bias_untied_legacy_gelu', 'gemma2',
                                  'phi3_partial_rope'])
def test_hf_keys_name_every_tensor_once(tmp_path, name):
  """The path -> key map export builds on: every tensor of the checkpoint
  has exactly one path, and writing the loaded params back by it gives the
  checkpoint's tensors."""
  family, head, fields, _, _ = CASES[name]
  _save(tmp_path, family, head, **fields)
  files = hf_files.CheckpointFiles(tmp_path)
  config, params = llama_loading.load_hf_llama(tmp_path, scan_layers=True)
  keys = hf_decoders.hf_keys(config)
  assert len(set(keys.values())) == len(keys)
  assert set(keys.values()) == set(files.keys())
  state = llama_loading.hf_state_dict(config, params)
  assert set(state) == set(files.keys())
  for key, value in state.items():
    np.testing.assert_array_equal(value, files.get(key))


def test_lora_on_phi3_fused_qkv_has_peft_shapes(tmp_path):
  """The fused kernels stay fused: a rank-r adapter on qkv_proj has the
  shapes PEFT gives it on transformers' Phi3."""
  peft = pytest.importorskip('peft')
  peer = _save(tmp_path, 'Phi3', 'ForCausalLM')
  model = lorajax.models.load(tmp_path)
  ids = jnp.asarray(_ids((2, 8)))
  spec = LoraSpec([(r'.*/(qkv_proj|gate_up_proj)/kernel', Lora(rank=2,
                                                              alpha=4)),
                   (r'.*', 'freeze')])
  adapters = lorajax.init(spec, model.params, jax.random.key(0),
                          fn=model.apply, args=(ids,))
  theirs = peft.get_peft_model(peer, peft.LoraConfig(
      r=2, target_modules=['qkv_proj', 'gate_up_proj'])).state_dict()
  for ours, hf in (('attn/qkv_proj', 'self_attn.qkv_proj'),
                   ('mlp/gate_up_proj', 'mlp.gate_up_proj')):
    node = adapters['layers_1']
    for name in ours.split('/'):
      node = node[name]
    prefix = f'base_model.model.model.layers.1.{hf}.lora_'
    assert node['kernel']['a'].shape == theirs[
        prefix + 'A.default.weight'].T.shape
    assert node['kernel']['b'].shape == theirs[
        prefix + 'B.default.weight'].T.shape
  fn = lorajax.lora(model.apply, spec)
  grads = jax.grad(lambda a: jnp.sum(fn(model.params, a, ids) ** 2))(adapters)
  b = grads['layers_0']['attn']['qkv_proj']['kernel']['b']
  assert float(jnp.max(jnp.abs(b))) > 0


@pytest.mark.parametrize('fields,match', [
    (dict(sliding_layers=(True, False)), 'needs a sliding_window'),
    (dict(sliding_window=4, sliding_layers=(True,)), 'one entry for each'),
    (dict(activation='relu'), "activation='relu'"),
    (dict(fused_proj=True, qkv_bias=True), 'no q/k/v or MLP biases'),
    (dict(rope_dim=3), 'rope_dim=3'),
    (dict(rope_dim=16), 'rope_dim=16'),
])
def test_bad_config_raises(fields, match):
  with pytest.raises(ValueError, match=match):
    llama.LlamaConfig.tiny(**fields)


# Refusals: (checkpoint, config.json change, what the message must name).
REFUSALS = [
    ('gemma', {'hidden_act': 'relu'}, "hidden_act='relu'"),
    ('gemma', {'use_bidirectional_attention': True},
     'use_bidirectional_attention=True'),
    ('gemma', {'attn_logit_softcapping': 50.0}, 'attn_logit_softcapping=50'),
    ('gemma', {'partial_rotary_factor': 0.5}, 'partial_rotary_factor=0.5'),
    ('gemma', {'rope_parameters': {'rope_type': 'yarn', 'factor': 2.0,
                                   'rope_theta': 10000.0}},
     "rope_type='yarn'"),
    ('gemma', {'attention_dropout': 0.1}, 'attention_dropout=0.1'),
    ('gemma', {'attention_bias': True}, r'no tensor .*q_proj\.bias'),
    ('gemma', {'tie_word_embeddings': False}, 'tie_word_embeddings=False'),
    ('gemma', {'architectures': ['GemmaForSequenceClassification']},
     'architectures'),
    ('gemma2', {'hidden_activation': 'relu'}, "hidden_activation='relu'"),
    ('gemma2', {'layer_types': ['sliding_attention', 'chunked_attention']},
     'layer_types'),
    ('gemma2', {'sliding_window': None}, 'sliding_window=None'),
    ('gemma2', {'use_bidirectional_attention': True},
     'use_bidirectional_attention=True'),
    ('gemma2', {'model_type': 'gemma'}, 'attn_logit_softcapping=3.0'),
    ('gemma2', {'model_type': 'gemma', 'attn_logit_softcapping': None,
                'final_logit_softcapping': None},
     r'no place.*pre_feedforward_layernorm'),
    ('phi3', {'rope_parameters': {'rope_type': 'longrope',
                                  'rope_theta': 10000.0,
                                  'short_factor': [1.0] * 4,
                                  'long_factor': [2.0] * 4}},
     "rope_type='longrope'"),
    ('phi3', {'rope_parameters': None, 'rope_scaling': {
        'type': 'su', 'short_factor': [1.0] * 4, 'long_factor': [2.0] * 4}},
     "rope_type='su'"),
    ('phi3', {'rope_parameters': {'rope_type': 'llama3', 'factor': 8.0,
                                  'rope_theta': 10000.0}},
     "rope_type='llama3'"),
    ('phi3', {'partial_rotary_factor': 0.375,
              'rope_parameters': {'rope_type': 'default',
                                  'rope_theta': 10000.0,
                                  'partial_rotary_factor': 0.375}},
     'partial_rotary_factor=0.375'),
    ('phi3', {'resid_pdrop': 0.1}, 'resid_pdrop=0.1'),
    ('phi3', {'embd_pdrop': 0.1}, 'embd_pdrop=0.1'),
    ('phi3', {'hidden_act': 'relu'}, "hidden_act='relu'"),
    ('phi3', {'final_logit_softcapping': 30.0},
     'final_logit_softcapping=30'),
    ('phi3', {'model_type': 'llama'}, r'no place.*qkv_proj'),
    ('phi3', {'model_type': 'gemma3_text'}, "model_type='gemma3_text'"),
]
_CHECKPOINTS = {'gemma': ('Gemma', {}), 'gemma2': ('Gemma2', GEMMA2),
                'phi3': ('Phi3', {})}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  out = {}
  for name, (family, fields) in _CHECKPOINTS.items():
    out[name] = tmp_path_factory.mktemp(name)
    _save(out[name], family, 'ForCausalLM', **fields)
  return out


@pytest.mark.parametrize('base,change,match', REFUSALS,
                         ids=[f'{b}-{"-".join(c)}' for b, c, _ in REFUSALS])
def test_unimplemented_config_is_refused(checkpoints, tmp_path, base, change,
                                         match):
  directory = tmp_path / 'checkpoint'
  shutil.copytree(checkpoints[base], directory)
  lorajax.models.load(directory)  # Loads before the change.
  config_file = directory / 'config.json'
  config = json.loads(config_file.read_text()) | change
  config_file.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=match):
    lorajax.models.load(directory)


def test_unexpected_tensor_is_refused(checkpoints, tmp_path):
  directory = tmp_path / 'checkpoint'
  shutil.copytree(checkpoints['phi3'], directory)
  weights = directory / 'model.safetensors'
  tensors = safetensors.numpy.load_file(str(weights))
  tensors['model.layers.0.self_attn.q_proj.weight'] = np.zeros((32, 32),
                                                               np.float32)
  safetensors.numpy.save_file(tensors, str(weights))
  with pytest.raises(ValueError, match=r'no place.*q_proj\.weight'):
    lorajax.models.load(directory)


# Gemma's turn markup (its real template, less the system-turn handling).
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_chat_template_and_eos_of_the_folder_as_transformers(tmp_path):
  """A Gemma2 folder with tokenizer files (SmolLM2's BPE, a Gemma chat
  template): the prompt ids equal transformers' apply_chat_template and
  greedy generation stops at the folder's EOS where transformers' does."""
  reader = llama_loading.as_reader(
      assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
  tok = bpe_tokenizer.gguf_tokenizer(reader)
  bos = bpe_tokenizer.gguf_special_ids(reader)['bos']
  peer = _save(tmp_path, 'Gemma2', 'ForCausalLM', **GEMMA2 | dict(
      vocab_size=tok.get_vocab_size(), bos_token_id=bos))
  tok.save(str(tmp_path / 'tokenizer.json'))
  messages = [{'role': 'user', 'content': 'Name a colour.'}]

  def write_tokenizer_config(eos):
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'PreTrainedTokenizerFast', 'chat_template':
        GEMMA_CHAT, 'bos_token': tok.id_to_token(bos),
        'eos_token': tok.id_to_token(eos)}))

  write_tokenizer_config(1)
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
  out = hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                   tokenize=True)
  prompt = list(out['input_ids'] if hasattr(out, 'keys') else out)
  with torch.no_grad():  # Without an EOS: pick one it will produce.
    free = peer.generate(torch.tensor([prompt]), max_new_tokens=10,
                         do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
  eos = free[4]
  config = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps(config | {
      'eos_token_id': eos}))
  (tmp_path / 'generation_config.json').unlink(missing_ok=True)
  write_tokenizer_config(eos)
  with torch.no_grad():
    want = peer.generate(torch.tensor([prompt]), max_new_tokens=10,
                         do_sample=False, eos_token_id=eos,
                         pad_token_id=0)[0, len(prompt):].tolist()
  want = want[:want.index(eos) + 1]

  model = lorajax.models.load(tmp_path)
  assert model.eos_id == eos
  template = chat.ChatTemplate(model.chat_template, model.special_tokens)
  ids, _ = chat.encode_chat(model.tokenizer, template, messages,
                            add_generation_prompt=True)
  assert ids.tolist() == prompt
  apply = lambda p, *a, **k: model.module.apply({'params': p}, *a, **k)
  got = lm.generate(apply, model.params, jnp.asarray([ids]), 10,
                    eos_id=model.eos_id)
  got = np.asarray(got)[0].tolist()
  assert got[:len(want)] == want
  assert set(got[len(want):]) <= {eos}  # Stopped: EOS repeats.
