"""Packing with segment ids: attention within a segment, positions that
restart, and the same loss as one example a row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorajax.data import packing
from lorajax.models import llama


def random_examples(n, seed=0, vocab=256):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(3, 14))
    ids = rng.integers(3, vocab, length)
    mask = np.arange(length) >= rng.integers(1, length)   # a trained tail
    out.append((ids, mask))
  return out


@pytest.fixture(scope='module')
def tiny():
  config = llama.LlamaConfig.tiny()
  model = llama.Llama(config)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  return model, params


def nll_sum(model, params, rows, **kw):
  logits = model.apply(params, jnp.asarray(rows['inputs']), **kw)
  logp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(logp, jnp.asarray(rows['targets'])[..., None],
                             -1)[..., 0]
  mask = jnp.asarray(rows['mask'], jnp.float32)
  return float(jnp.sum(nll * mask)), float(jnp.sum(mask))


def test_pack_fits_every_token_once_and_fills_rows():
  examples = random_examples(40)
  packed = packing.pack_examples(examples, seq_len=32)
  padded = packing.pad_examples(examples, seq_len=32)
  assert padded['inputs'].shape[0] == 40
  assert packed['inputs'].shape[0] < 20
  # The same trained targets, only arranged differently.
  assert packed['mask'].sum() == padded['mask'].sum() == sum(
      m[1:].sum() for _, m in examples)
  assert sorted(packed['targets'][packed['segment_ids'] > 0].tolist()) == (
      sorted(padded['targets'][padded['segment_ids'] > 0].tolist()))
  assert packing.efficiency(packed) > 2 * packing.efficiency(padded)


def test_positions_restart_per_segment():
  packed = packing.pack_examples(random_examples(10), seq_len=24)
  computed = llama.segment_positions(jnp.asarray(packed['segment_ids']))
  real = packed['segment_ids'] > 0
  np.testing.assert_array_equal(np.asarray(computed)[real],
                                packed['positions'][real])


def test_long_example_is_cut_to_one_row():
  rows = packing.pack_examples([(np.arange(50), np.ones(50, bool))],
                               seq_len=8)
  assert rows['inputs'].tolist() == [list(range(8))]
  assert rows['targets'].tolist() == [list(range(1, 9))]


def test_bad_example_raises():
  with pytest.raises(ValueError, match='example 0'):
    packing.pack_examples([([1, 2, 3], [1, 1])], seq_len=8)


def test_packed_loss_equals_unpacked_loss(tiny):
  model, params = tiny
  examples = random_examples(24, seed=1)
  packed = packing.pack_examples(examples, seq_len=40)
  padded = packing.pad_examples(examples, seq_len=40)
  total_p, count_p = nll_sum(model, params, packed,
                             segment_ids=jnp.asarray(packed['segment_ids']))
  total_u, count_u = nll_sum(model, params, padded,
                             attention_mask=jnp.asarray(
                                 padded['segment_ids'] > 0))
  assert count_p == count_u
  np.testing.assert_allclose(total_p / count_p, total_u / count_u,
                             rtol=1e-5, atol=1e-5)
  # Passing the data's positions gives the same as computing them.
  total_q, _ = nll_sum(model, params, packed,
                       segment_ids=jnp.asarray(packed['segment_ids']),
                       positions=jnp.asarray(packed['positions']))
  np.testing.assert_allclose(total_q, total_p, rtol=1e-6)


def test_attention_never_crosses_a_segment(tiny):
  model, params = tiny
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 12]])
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])
  other = tokens.at[0, :3].set(jnp.asarray([100, 101, 102]))
  a = model.apply(params, tokens, segment_ids=seg)
  b = model.apply(params, other, segment_ids=seg)
  np.testing.assert_array_equal(np.asarray(a[0, 3:7]), np.asarray(b[0, 3:7]))
  alone = model.apply(params, tokens[:, 3:7])
  np.testing.assert_allclose(np.asarray(a[0, 3:7]), np.asarray(alone[0]),
                             atol=1e-5)


def test_default_path_is_unchanged_by_one_segment(tiny):
  model, params = tiny
  tokens = jnp.asarray([[5, 6, 7, 8, 9]])
  np.testing.assert_array_equal(
      np.asarray(model.apply(params, tokens)),
      np.asarray(model.apply(params, tokens,
                             segment_ids=jnp.ones_like(tokens))))


def test_segment_ids_with_a_cache_is_refused(tiny):
  model, params = tiny
  tokens = jnp.asarray([[5, 6]])
  with pytest.raises(ValueError, match='without a cache'):
    model.apply(params, tokens, segment_ids=jnp.ones_like(tokens),
                cache_len=4)
