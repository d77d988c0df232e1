"""runtime.rng.unroll_threefry: the same random bits, without the CPU loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax.runtime import rng


def _draws(key):
  k1, k2 = jax.random.split(key)
  x = jnp.ones((4, 33, 7))
  dropped = nn.Dropout(0.1).apply({}, x, deterministic=False,
                                  rngs={'dropout': k2})
  return (jax.random.bits(key, (5, 17)),
          jax.random.uniform(k1, (3, 65)),
          jax.random.bernoulli(k2, 0.1, (2, 12, 9, 9)),
          dropped)


def test_unrolled_threefry_gives_the_same_bits_without_a_loop():
  key = jax.random.key(1234)
  try:
    assert rng.unroll_threefry(False)
    looped = jax.jit(_draws)
    before = [np.asarray(x) for x in looped(key)]
    jax.clear_caches()   # jax keeps the inner hash's lowering per shape
    assert rng.unroll_threefry()
    assert rng.is_unrolled()
    unrolled = jax.jit(_draws)
    after = [np.asarray(x) for x in unrolled(key)]
    text = unrolled.lower(key).compile().as_text()
  finally:
    rng.unroll_threefry()
  for b, a in zip(before, after):
    np.testing.assert_array_equal(a, b)
  assert not any(' while(' in line for line in text.splitlines())


def test_a_jax_without_the_private_pieces_is_left_alone(monkeypatch):
  from jax._src.random import threefry2x32 as tf
  monkeypatch.delattr(tf, '_threefry2x32_lowering_rule')
  assert rng.unroll_threefry() is False
