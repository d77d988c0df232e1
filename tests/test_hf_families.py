"""lorajax.models.load on tiny random Hugging Face checkpoints of each family.

transformers (a test dependency) writes each checkpoint with
``save_pretrained`` and is the peer: lorajax's logits must equal its logits
(float32, |Δ| <= 1e-4·(1 + |logit|)). A config value lorajax does not
implement is flipped in ``config.json`` and must be refused by name.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorajax
from lorajax import LoraSpec, Lora
import lorajax.models
from lorajax.models import bert_loading
from lorajax.models import llama
from lorajax.models import llama_loading
from lorajax.models import lm

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64, vocab_size=97,
               initializer_range=0.2)
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, vocab_size=99, max_position_embeddings=64,
               initializer_range=0.3)
LLAMA3 = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
          'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16}


def _save(directory, config_cls, model_cls, *, dtype=None, shard='60KB',
          **fields):
  """Writes a random checkpoint (biases and norms perturbed off their
  zero/one init, so that a mapping error shows) and returns the model."""
  torch.manual_seed(0)
  config = config_cls(**fields)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'LayerNorm' in name:
        p.add_(torch.randn_like(p) * 0.3)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(directory, max_shard_size=shard)
  return model.float()


def _peer(model, ids, mask=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is
                None else torch.tensor(mask))
  return (out.logits if hasattr(out, 'logits') else
          out.last_hidden_state).numpy()


def _assert_matches(got, want):
  got = np.asarray(got)
  assert got.shape == want.shape
  np.testing.assert_array_less(np.abs(got - want), 1e-4 * (1 + np.abs(want)))


def _ids(shape, vocab, seed=0):
  return np.random.default_rng(seed).integers(3, vocab, shape)


DECODER_CASES = {
    # name: (config class, model class, fields, the feature switched off)
    'llama_rope_parameters': (
        'LlamaConfig', 'LlamaForCausalLM',
        dict(rope_parameters={'rope_type': 'default', 'rope_theta': 500000.0}),
        dict(rope_base=10000.0)),
    'llama3_rope_scaling': (
        'LlamaConfig', 'LlamaForCausalLM',
        dict(rope_parameters=LLAMA3, max_position_embeddings=64),
        dict(rope_scaling=None)),
    'llama_biases_tied': (
        'LlamaConfig', 'LlamaForCausalLM',
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
        None),
    'mistral_sliding_window': (
        'MistralConfig', 'MistralForCausalLM', dict(sliding_window=4),
        dict(sliding_window=None)),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', {}, None),
    'qwen2_sliding_window': (
        'Qwen2Config', 'Qwen2ForCausalLM',
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
        dict(sliding_window=None)),
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', dict(head_dim=16), None),
    'qwen2_bare': ('Qwen2Config', 'Qwen2Model', {}, None),
}


@pytest.mark.parametrize('name', DECODER_CASES)
def test_decoder_matches_transformers(tmp_path, name):
  config_cls, model_cls, fields, switched_off = DECODER_CASES[name]
  peer = _save(tmp_path, getattr(transformers, config_cls),
               getattr(transformers, model_cls), **DECODER, **fields)
  ids = _ids((2, 24), 97)
  want = _peer(peer, ids)
  model = lorajax.models.load(tmp_path)
  assert model.architecture == model_cls
  got = model.apply(model.params, jnp.asarray(ids))
  _assert_matches(got, want)
  if switched_off:  # The checkpoint exercises the feature: off, it differs.
    plain = llama.Llama(model.config.replace(**switched_off))
    other = plain.apply({'params': model.params}, jnp.asarray(ids))
    assert float(jnp.max(jnp.abs(other - want))) > 1e-2


def test_mistral_sliding_window_by_the_old_loader(tmp_path):
  """Was loaded as Llama without the window (logits off by 0.65)."""
  peer = _save(tmp_path, transformers.MistralConfig,
               transformers.MistralForCausalLM, sliding_window=4, **DECODER)
  ids = _ids((1, 32), 97)
  config, params = llama_loading.load_hf_llama(tmp_path)
  assert config.sliding_window == 4
  _assert_matches(llama.Llama(config).apply({'params': params}, ids),
                  _peer(peer, ids))


def test_rope_parameters_theta_by_the_old_loader(tmp_path):
  """transformers 5 writes rope_parameters; the theta was ignored."""
  _save(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM,
        rope_parameters={'rope_type': 'default', 'rope_theta': 500000.0},
        **DECODER)
  assert 'rope_theta' not in json.loads((tmp_path / 'config.json').read_text())
  config, _ = llama_loading.load_hf_llama(tmp_path)
  assert config.rope_base == 500000.0


def test_roberta_refused_by_the_bert_loader(tmp_path):
  """Was loaded as BERT (positions and head differ: off by 3.1)."""
  _save(tmp_path, transformers.RobertaConfig, transformers.RobertaModel,
        shard='10MB', **ENCODER)
  with pytest.raises(ValueError, match="model_type='roberta'"):
    bert_loading.load_hf_bert(tmp_path)


ENCODER_CASES = {
    'bert': ('BertConfig', 'BertModel', {}),
    'bert_cls': ('BertConfig', 'BertForSequenceClassification',
                 dict(num_labels=3)),
    'roberta': ('RobertaConfig', 'RobertaModel', {}),
    'roberta_cls': ('RobertaConfig', 'RobertaForSequenceClassification',
                    dict(num_labels=3)),
    'xlm_roberta_cls': ('XLMRobertaConfig',
                        'XLMRobertaForSequenceClassification',
                        dict(num_labels=2)),
    # DistilBERT names its widths dim/hidden_dim (intermediate_size is
    # ignored by its config); one ReLU and one sinusoidal case.
    'distilbert': ('DistilBertConfig', 'DistilBertModel', dict(hidden_dim=37)),
    'distilbert_cls': ('DistilBertConfig',
                       'DistilBertForSequenceClassification',
                       dict(hidden_dim=37, num_labels=3)),
    'distilbert_relu_sinusoidal_cls': (
        'DistilBertConfig', 'DistilBertForSequenceClassification',
        dict(hidden_dim=37, num_labels=2, activation='relu',
             sinusoidal_pos_embds=True)),
}


@pytest.mark.parametrize('name', ENCODER_CASES)
def test_encoder_matches_transformers(tmp_path, name):
  config_cls, model_cls, fields = ENCODER_CASES[name]
  peer = _save(tmp_path, getattr(transformers, config_cls),
               getattr(transformers, model_cls), **ENCODER, **fields)
  ids = _ids((2, 10), 99)
  mask = np.ones_like(ids)
  pad = peer.config.pad_token_id
  ids[1, 7:], mask[1, 7:] = pad, 0  # Right padding, as tokenizers pad.
  want = _peer(peer, ids, mask)
  model = lorajax.models.load(tmp_path)
  assert model.architecture == model_cls
  got = np.asarray(model.apply(model.params, jnp.asarray(ids),
                               jnp.asarray(mask)))
  if want.ndim == 3:  # Hidden states: padding positions are not compared.
    got, want = got[mask > 0], want[mask > 0]
  _assert_matches(got, want)


def test_bfloat16_stays_bfloat16_and_matches(tmp_path):
  _save(tmp_path, transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
        dtype=torch.bfloat16, shard='30KB', **DECODER)
  # Read back in float32 (a cast model would keep RoPE buffers rounded).
  peer = transformers.Qwen2ForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation='eager').eval()
  assert len(list(tmp_path.glob('model-*.safetensors'))) > 1  # Sharded.
  model = lorajax.models.load(tmp_path)
  dtypes = {x.dtype for x in jax.tree.leaves(model.params)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  ids = _ids((1, 12), 97)
  _assert_matches(model.apply(model.params, jnp.asarray(ids)),
                  _peer(peer, ids))


def test_lora_on_a_loaded_qwen2(tmp_path):
  _save(tmp_path, transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
        **DECODER)
  model = lorajax.models.load(tmp_path)
  ids = jnp.asarray(_ids((2, 8), 97))
  spec = LoraSpec([(r'.*/(q_proj|v_proj)/kernel', Lora(rank=2, alpha=4)),
                   (r'.*', 'freeze')])
  adapters = lorajax.init(spec, model.params, jax.random.key(0),
                          fn=model.apply, args=(ids,))
  fn = lorajax.lora(model.apply, spec)
  np.testing.assert_allclose(fn(model.params, adapters, ids),
                             model.apply(model.params, ids), atol=1e-6)
  grads = jax.grad(lambda a: jnp.sum(fn(model.params, a, ids) ** 2))(adapters)
  b = grads['layers_0']['attn']['q_proj']['kernel']['b']
  assert float(jnp.max(jnp.abs(b))) > 0


# Refusals: (checkpoint, config.json change, what the message must name).
_GPT_TYPES = ('gemma3', 'phi', 'olmoe', 'deepseek_v3')
REFUSALS = [
    ('llama', {'rope_parameters': {'rope_type': 'yarn', 'factor': 2.0,
                                   'rope_theta': 10000.0}},
     "rope_type='yarn'"),
    ('llama', {'rope_parameters': {'rope_type': 'linear', 'factor': 2.0,
                                   'rope_theta': 10000.0}},
     "rope_type='linear'"),
    ('llama', {'rope_parameters': None, 'rope_theta': 10000.0,
               'rope_scaling': {'type': 'dynamic', 'factor': 2.0}},
     "rope_type='dynamic'"),
    ('llama', {'partial_rotary_factor': 0.5}, 'partial_rotary_factor=0.5'),
    ('llama', {'hidden_act': 'gelu'}, "hidden_act='gelu'"),
    ('llama', {'attn_logit_softcapping': 50.0}, 'attn_logit_softcapping=50'),
    ('llama', {'final_logit_softcapping': 30.0},
     'final_logit_softcapping=30'),
    ('llama', {'attention_dropout': 0.1}, 'attention_dropout=0.1'),
    ('llama', {'attention_bias': True}, r"no tensor .*q_proj\.bias"),
    ('llama', {'mlp_bias': True}, r"no tensor .*gate_proj\.bias"),
    ('llama', {'tie_word_embeddings': True}, 'tie_word_embeddings=True'),
    ('llama_tied', {'tie_word_embeddings': False},
     'tie_word_embeddings=False'),
    ('llama', {'architectures': ['LlamaForSequenceClassification']},
     'architectures'),
    ('qwen2', {'model_type': 'llama'}, r'no place.*q_proj\.bias'),
    ('qwen2', {'model_type': 'mistral'}, r'no place.*q_proj\.bias'),
    ('qwen2', {'use_sliding_window': True, 'sliding_window': 4,
               'layer_types': ['full_attention', 'sliding_attention']},
     'layer_types'),
    ('qwen2', {'use_sliding_window': True, 'sliding_window': 4,
               'layer_types': None, 'max_window_layers': 1}, 'layer_types'),
    ('qwen2', {'model_type': 'no_such_model'}, "model_type='no_such_model'"),
    *[('qwen2', {'model_type': t}, f'model_type={t!r}') for t in _GPT_TYPES],
    # A dense checkpoint relabelled as a mixture of experts.
    *[('qwen2', {'model_type': t}, 'num_experts=None')
      for t in ('mixtral', 'qwen3_moe')],
    ('bert', {'hidden_act': 'relu'}, "hidden_act='relu'"),
    ('bert', {'hidden_act': 'gelu_new'}, "hidden_act='gelu_new'"),
    ('bert', {'position_embedding_type': 'relative_key'},
     "position_embedding_type='relative_key'"),
    ('bert', {'is_decoder': True}, 'is_decoder=True'),
    ('bert', {'model_type': 'distilbert'}, r'has shape \(99, 32\)'),
    ('distilbert', {'activation': 'gelu_new'}, "activation='gelu_new'"),
    ('distilbert', {'is_decoder': True}, 'is_decoder=True'),
    ('distilbert', {'architectures': ['DistilBertForMaskedLM']},
     'DistilBertForMaskedLM'),
    ('bert', {'model_type': 'modernbert'}, "model_type='modernbert'"),
    ('bert', {'architectures': ['BertForMaskedLM']}, 'BertForMaskedLM'),
    ('roberta', {'model_type': 'bert'}, 'no tensor'),
]

_CHECKPOINTS = {
    'llama': ('LlamaConfig', 'LlamaForCausalLM', DECODER),
    'llama_tied': ('LlamaConfig', 'LlamaForCausalLM',
                   DECODER | {'tie_word_embeddings': True}),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', DECODER),
    'bert': ('BertConfig', 'BertModel', ENCODER),
    'roberta': ('RobertaConfig', 'RobertaForSequenceClassification', ENCODER),
    'distilbert': ('DistilBertConfig', 'DistilBertForSequenceClassification',
                   ENCODER | {'hidden_dim': 37}),
}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  out = {}
  for name, (config_cls, model_cls, fields) in _CHECKPOINTS.items():
    out[name] = tmp_path_factory.mktemp(name)
    _save(out[name], getattr(transformers, config_cls),
          getattr(transformers, model_cls), **fields)
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


def test_bare_checkpoint_gets_a_classifier_on_request(checkpoints):
  model = lorajax.models.load(checkpoints['bert'], head='classification',
                              num_labels=4)
  ids = jnp.asarray(_ids((2, 6), 99))
  assert model.apply(model.params, ids).shape == (2, 4)
  assert model.architecture == 'bert (classification)'


def test_unexpected_tensor_is_refused(checkpoints, tmp_path):
  directory = tmp_path / 'checkpoint'
  shutil.copytree(checkpoints['llama'], directory)
  extra = {'model.layers.0.self_attn.q_proj.bias': np.zeros(32, np.float32)}
  safetensors.numpy.save_file(extra, str(directory / 'extra.safetensors'))
  index_file = directory / 'model.safetensors.index.json'
  index = json.loads(index_file.read_text())
  index['weight_map'].update({k: 'extra.safetensors' for k in extra})
  index_file.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r'no place.*q_proj\.bias'):
    lorajax.models.load(directory)


def test_missing_directory_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    lorajax.models.load(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    lorajax.models.load(pathlib.Path(tmp_path))


@pytest.mark.parametrize('name', ['mistral_sliding_window', 'qwen3'])
def test_greedy_generation_with_cache_matches_transformers(tmp_path, name):
  config_cls, model_cls, fields, _ = DECODER_CASES[name]
  peer = _save(tmp_path, getattr(transformers, config_cls),
               getattr(transformers, model_cls), **DECODER, **fields)
  prompt = _ids((1, 6), 97)
  peer.generation_config.eos_token_id = None  # 12 tokens, no early stop.
  with torch.no_grad():
    want = peer.generate(torch.tensor(prompt), max_new_tokens=12,
                         do_sample=False, pad_token_id=0)[0, 6:].numpy()
  model = lorajax.models.load(tmp_path)
  apply = lambda p, *a, **k: model.module.apply({'params': p}, *a, **k)
  got = lm.generate(apply, model.params, jnp.asarray(prompt),
                                   12)  # 18 tokens: past the window of 4.
  np.testing.assert_array_equal(np.asarray(got)[0], want)


def test_place_gets_each_tensor_once_as_it_is_read(checkpoints):
  """load(place=...): every tensor passes through it once, as a host array,
  and what it returns is the parameter (how a mesh places each tensor
  straight onto its sharding)."""
  seen = {}

  def place(path, value):
    assert isinstance(value, np.ndarray) and path not in seen
    seen[path] = jnp.asarray(value) * 1  # A new object, to find again.
    return seen[path]

  for name in ('llama', 'distilbert'):
    seen.clear()
    model = lorajax.models.load(checkpoints[name], place=place)
    flat = {'/'.join(k.key for k in path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(model.params)[0]}
    assert set(flat) == set(seen)
    assert all(flat[p] is seen[p] for p in flat)


def test_a_sealed_checkpoint_with_a_damaged_file_is_refused(checkpoints,
                                                            tmp_path):
  """A folder lorajax sealed (its merged exports carry lorajax_digest.json):
  a changed tensor file is named at load; a folder without the digest file
  (as transformers writes them) loads as before."""
  from lorajax import checksums  # pylint: disable=g-import-not-at-top
  directory = tmp_path / 'checkpoint'
  shutil.copytree(checkpoints['bert'], directory)
  checksums.seal_folder(directory)
  lorajax.models.load(directory)
  weights = next(directory.glob('*.safetensors'))
  data = bytearray(weights.read_bytes())
  data[-5] ^= 0x10
  weights.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=f'{weights.name}.*export it again'):
    lorajax.models.load(directory)
  (directory / checksums.DIGEST_FILE).unlink()
  lorajax.models.load(directory)  # Unsealed: nothing to check against.
