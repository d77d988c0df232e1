"""Tests of the BERT encoder, its Hugging Face loading and its tokenizer."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from lorajax import assets
from lorajax.models import bert
from lorajax.models import bert_loading
from lorajax.models import bert_tokenizer
from lorajax.runtime import cpu_attention

SENTENCES = ['A man is playing a guitar.', 'Someone plays a guitar.',
             'The stock market fell today.', 'A man is eating food.',
             'A man is eating a piece of bread.']


@pytest.fixture(scope='module')
def minilm():
  """(config, params, raw HF tensors) of all-MiniLM-L6-v2, loaded once."""
  try:
    path = assets.asset_path('minilm', 'model/model.safetensors')
  except assets.AssetError as e:
    pytest.skip(f'MiniLM weights unavailable: {e}')
  config, params = bert_loading.load_minilm(num_labels=2)
  return config, params, safetensors_numpy.load_file(str(path))


@pytest.fixture(scope='module')
def tok():
  return bert_tokenizer.bert_tokenizer()


def _forward(config, params, batch):
  return bert.Bert(config).apply(
      {'params': params}, batch['input_ids'], batch['attention_mask'],
      batch['token_type_ids'])


# An independent float64 BERT forward on the Hugging Face tensors.

def _np_layer_norm(x, w, b, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def _np_bert_hidden(t, ids, mask, *, layers, heads, eps):
  """Last hidden states [B, T, H] in float64 from HF-named tensors `t`."""
  t = {k: v.astype(np.float64) for k, v in t.items()}

  def linear(x, name):
    return x @ t[f'{name}.weight'].T + t[f'{name}.bias']

  def norm(x, name):
    return _np_layer_norm(x, t[f'{name}.weight'], t[f'{name}.bias'], eps)

  batch, length = ids.shape
  x = (t['embeddings.word_embeddings.weight'][ids]
       + t['embeddings.position_embeddings.weight'][np.arange(length)]
       + t['embeddings.token_type_embeddings.weight'][np.zeros_like(ids)])
  x = norm(x, 'embeddings.LayerNorm')
  width = x.shape[-1] // heads
  neg = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
  for i in range(layers):
    p = f'encoder.layer.{i}'

    def split(y):
      return y.reshape(batch, length, heads, width).transpose(0, 2, 1, 3)

    q = split(linear(x, f'{p}.attention.self.query'))
    k = split(linear(x, f'{p}.attention.self.key'))
    v = split(linear(x, f'{p}.attention.self.value'))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width) + neg
    s = np.exp(s - s.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    ctx = (s @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    x = norm(linear(ctx, f'{p}.attention.output.dense') + x,
             f'{p}.attention.output.LayerNorm')
    h = linear(x, f'{p}.intermediate.dense')
    h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
    x = norm(linear(h, f'{p}.output.dense') + x, f'{p}.output.LayerNorm')
  return x


def test_minilm_matches_float64_numpy_forward(minilm, tok):
  config, params, tensors = minilm
  batch = bert_tokenizer.encode_batch(tok, SENTENCES[:2], max_len=12)
  assert batch['attention_mask'].min() == 0  # the shorter one is padded
  got = np.asarray(_forward(config, params, batch).hidden)
  want = _np_bert_hidden(tensors, batch['input_ids'], batch['attention_mask'],
                         layers=6, heads=12, eps=1e-12)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_padding_does_not_change_real_tokens(minilm, tok):
  config, params, _ = minilm
  short = bert_tokenizer.encode_batch(tok, SENTENCES[:1], max_len=16,
                                      pad_to_longest=True)
  padded = bert_tokenizer.encode_batch(tok, SENTENCES[:1], max_len=16)
  n = short['input_ids'].shape[1]
  assert n < 16
  np.testing.assert_allclose(
      _forward(config, params, padded).hidden[:, :n],
      _forward(config, params, short).hidden, atol=1e-5)


def test_sentence_embeddings_rank_similar_pairs_first(minilm, tok):
  config, params, _ = minilm
  batch = bert_tokenizer.encode_batch(tok, SENTENCES, max_len=16)
  emb = bert.sentence_embedding(_forward(config, params, batch).hidden,
                                batch['attention_mask'])
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
  cos = np.asarray(emb @ emb.T)
  # Measured: guitar pair 0.85, guitar vs stock market about -0.05.
  assert cos[0, 1] > max(cos[0, 2], cos[1, 2]) + 0.5
  assert cos[3, 4] > max(cos[3, 2], cos[4, 2]) + 0.5
  # sentence-transformers' semantic-search example reports 0.7553 for this
  # pair with all-MiniLM-L6-v2.
  assert cos[3, 4] == pytest.approx(0.7553, abs=2e-3)


def test_bf16_compute_stays_close_to_fp32(minilm, tok):
  config, params, _ = minilm
  batch = bert_tokenizer.encode_batch(tok, SENTENCES, max_len=16)
  fp32 = _forward(config, params, batch)
  bf16 = _forward(config.replace(dtype=jnp.bfloat16), params, batch)
  assert bf16.hidden.dtype == jnp.bfloat16
  assert bf16.logits.dtype == jnp.float32
  e32 = bert.sentence_embedding(fp32.hidden, batch['attention_mask'])
  e16 = bert.sentence_embedding(bf16.hidden, batch['attention_mask'])
  assert np.min(np.sum(np.asarray(e32 * e16), axis=-1)) > 0.99
  np.testing.assert_allclose(bf16.hidden.astype(jnp.float32), fp32.hidden,
                             atol=0.1)


def _count(config):
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(bert.Bert(config).init, jax.random.key(0), ids)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_bert_base_parameter_count():
  # embeddings (30522 + 512 + 2) * 768 + LN 2 * 768        = 23,837,184
  # per layer: 4 * (768^2 + 768) + 2 * (768 * 3072) + 3072 + 768
  #            + 2 LNs 2 * 2 * 768                           =  7,087,872
  # pooler 768^2 + 768                                       =    590,592
  # classifier 768 * 2 + 2                                   =      1,538
  assert _count(bert.BertConfig.bert_base(num_labels=2)) == (
      23_837_184 + 12 * 7_087_872 + 590_592 + 1_538) == 109_483_778


def test_minilm_parameter_count(minilm):
  config, params, tensors = minilm
  in_file = sum(v.size for k, v in tensors.items()
                if k != 'embeddings.position_ids')
  assert in_file == 22_713_216
  classifier = 384 * 2 + 2
  assert _count(config) == _count(bert.BertConfig.minilm_l6()) == (
      in_file + classifier)
  assert sum(x.size for x in jax.tree.leaves(params)) == in_file + classifier


def test_param_paths_are_lora_friendly(minilm):
  _, params, _ = minilm
  layer = params['encoder']['layer_0']
  assert layer['attention']['query']['kernel'].shape == (384, 384)
  assert layer['attention']['output_ln']['scale'].shape == (384,)
  assert layer['intermediate']['kernel'].shape == (384, 1536)
  assert layer['output']['kernel'].shape == (1536, 384)
  assert params['embeddings']['word_embeddings']['embedding'].shape == (
      30522, 384)
  assert params['pooler']['kernel'].shape == (384, 384)
  assert params['classifier']['kernel'].shape == (384, 2)


# A tiny Hugging Face-layout checkpoint written to disk.

TINY = bert.BertConfig(vocab_size=50, hidden_size=8, num_layers=2,
                       num_heads=2, intermediate_size=16, max_position=10,
                       num_labels=3)


def _tiny_checkpoint(directory, *, prefix='bert.', with_classifier=True,
                     corrupt=None):
  """Writes a random TINY checkpoint; `corrupt` names a key to misshape."""
  rng = np.random.default_rng(0)
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  abstract = jax.eval_shape(bert.Bert(TINY).init, jax.random.key(0), ids)
  expected = {'/'.join(k.key for k in path): leaf.shape for path, leaf in
              jax.tree_util.tree_flatten_with_path(abstract['params'])[0]}
  tensors = {}
  for path, key in bert_loading.hf_key_map(TINY).items():
    shape = expected[path][::-1] if path.endswith('/kernel') else expected[path]
    if key == corrupt:
      shape = tuple(d + 1 for d in shape)
    if key.startswith('classifier'):
      if not with_classifier:
        continue
      name = key
    else:
      name = prefix + key
    tensors[name] = rng.normal(size=shape).astype(np.float32)
  safetensors_numpy.save_file(tensors, str(directory / 'model.safetensors'))
  hf = dict(vocab_size=50, hidden_size=8, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=10, hidden_act='gelu')
  (directory / 'config.json').write_text(json.dumps(hf))
  return tensors


def test_loads_prefixed_checkpoint_with_classifier(tmp_path):
  tensors = _tiny_checkpoint(tmp_path)
  config, params = bert_loading.load_hf_bert(tmp_path)
  assert config.num_labels == 3  # taken from the classifier's shape
  np.testing.assert_array_equal(
      params['encoder']['layer_1']['attention']['value']['kernel'],
      tensors['bert.encoder.layer.1.attention.self.value.weight'].T)
  np.testing.assert_array_equal(params['classifier']['bias'],
                                tensors['classifier.bias'])
  ids = jnp.array([[1, 2, 3, 0]])
  out = bert.Bert(config).apply({'params': params}, ids, ids > 0)
  assert out.logits.shape == (1, 3) and out.hidden.shape == (1, 4, 8)


def test_missing_classifier_is_freshly_initialized(tmp_path):
  _tiny_checkpoint(tmp_path, prefix='', with_classifier=False)
  config, params = bert_loading.load_hf_bert(
      tmp_path, num_labels=5, key=jax.random.key(1))
  assert config.num_labels == 5
  assert params['classifier']['kernel'].shape == (8, 5)
  assert float(jnp.std(params['classifier']['kernel'])) < 0.1
  np.testing.assert_array_equal(params['classifier']['bias'], 0.0)


def test_wrong_shape_raises_naming_the_key(tmp_path):
  key = 'encoder.layer.1.intermediate.dense.weight'
  _tiny_checkpoint(tmp_path, corrupt=key)
  message = f"'bert.{key}' has shape (17, 9), expected (16, 8)"
  with pytest.raises(ValueError, match=re.escape(message)):
    bert_loading.load_hf_bert(tmp_path)


def test_classifier_width_mismatch_raises(tmp_path):
  _tiny_checkpoint(tmp_path)
  with pytest.raises(ValueError, match='classifier.weight'):
    bert_loading.load_hf_bert(tmp_path, num_labels=2)


def test_missing_tensor_raises_naming_the_key(tmp_path):
  _tiny_checkpoint(tmp_path)
  tensors = safetensors_numpy.load_file(str(tmp_path / 'model.safetensors'))
  del tensors['bert.encoder.layer.0.attention.self.key.bias']
  safetensors_numpy.save_file(tensors, str(tmp_path / 'model.safetensors'))
  with pytest.raises(ValueError, match='encoder.layer.0.attention.self.key'):
    bert_loading.load_hf_bert(tmp_path)


def test_dropout_only_when_not_deterministic():
  model = bert.Bert(TINY)
  ids = jnp.array([[1, 2, 3, 4]])
  variables = model.init(jax.random.key(0), ids)
  a = model.apply(variables, ids).hidden
  np.testing.assert_array_equal(a, model.apply(variables, ids).hidden)
  b = model.apply(variables, ids, deterministic=False,
                  rngs={'dropout': jax.random.key(1)}).hidden
  assert not np.allclose(a, b)


def test_too_long_input_raises():
  model = bert.Bert(TINY)
  with pytest.raises(ValueError, match='max_position=10'):
    model.init(jax.random.key(0), jnp.ones((1, 11), jnp.int32))


def test_encode_batch_truncates_pads_and_restores_settings(tok):
  batch = bert_tokenizer.encode_batch(
      tok, ['a ' * 50, ('first part', 'second part')], max_len=8)
  assert all(v.dtype == np.int32 and v.shape == (2, 8) for v in batch.values())
  cls, sep = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
  assert batch['input_ids'][0, 0] == cls and batch['input_ids'][0, -1] == sep
  assert batch['attention_mask'][0].all()
  assert list(batch['token_type_ids'][1, :7]) == [0, 0, 0, 0, 1, 1, 1]
  assert list(batch['attention_mask'][1]) == [1] * 7 + [0]
  assert tok.padding is None and tok.truncation is None


def _tiny_classifier(**overrides):
  config = bert.BertConfig(vocab_size=60, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position=64,
                           num_labels=3, **overrides)
  ids = jax.random.randint(jax.random.key(1), (3, 32), 0, 60)
  mask = jnp.ones((3, 32), jnp.int32).at[1, 20:].set(0)
  params = bert.Bert(config).init(jax.random.key(0), ids, mask)['params']
  return config, params, ids, mask


@pytest.mark.parametrize('head', ['bert', 'roberta'])
def test_classifier_reads_the_same_cls_row_as_the_whole_last_layer(head):
  """The logits come from a run of the last layer with [CLS] as the only
  query; they equal the head applied to the whole run's [CLS] row, with a
  prompt too (the real [CLS] follows it)."""
  config, params, ids, mask = _tiny_classifier(head=head)
  model = bert.Bert(config)
  prompt = jax.random.normal(jax.random.key(2), (4, 32))
  for extra in ({}, {'prompt': prompt}):
    out = model.apply({'params': params}, ids, mask, **extra)
    cls = out.hidden[:, 0]
    if head == 'bert':
      p = params
      pooled = jnp.tanh(cls @ p['pooler']['kernel'] + p['pooler']['bias'])
      logits = pooled @ p['classifier']['kernel'] + p['classifier']['bias']
    else:
      p = params['classifier']
      pooled = jnp.tanh(cls @ p['dense']['kernel'] + p['dense']['bias'])
      logits = pooled @ p['out_proj']['kernel'] + p['out_proj']['bias']
    np.testing.assert_allclose(out.pooled, pooled, atol=2e-6)
    np.testing.assert_allclose(out.logits, logits, atol=2e-6)
    whole = bert.Bert(config.replace(cls_readout=False)).apply(
        {'params': params}, ids, mask, **extra)
    np.testing.assert_allclose(whole.logits, out.logits, atol=2e-6)
    np.testing.assert_array_equal(whole.hidden, out.hidden)


def test_compiled_logits_skip_the_last_layer_for_all_but_cls():
  """Asked for the logits alone, the compiled forward does the last
  layer's work for one query, not for every token (XLA's FLOP count)."""

  def flops(config, field):
    params = bert.Bert(config).init(jax.random.key(0), ids, mask)['params']
    f = jax.jit(lambda p: getattr(
        bert.Bert(config).apply({'params': p}, ids, mask), field))
    # XLA's count with the fused CPU attention's products added: a custom
    # call XLA keeps is counted, one it drops as dead code is not.
    return cpu_attention.step_flops(f.lower(params).compile())

  config, _, ids, mask = _tiny_classifier()
  whole = flops(config, 'hidden')
  one_layer_less = flops(config.replace(num_layers=1), 'hidden')
  last_layer = whole - one_layer_less
  # Keys and values of every token remain (2 of the layer's 12 H^2-sized
  # products a token, with their bias adds); at this width that is 0.34 of
  # the layer's count. Without the one-query run it is all of it.
  assert flops(config, 'logits') < one_layer_less + 0.4 * last_layer
  assert (flops(config.replace(cls_readout=False), 'logits')
          > one_layer_less + 0.9 * last_layer)
