"""Activations in a user's function keep only their input for the backward
pass (``lorajax.runtime.elementwise_remat``), with the same values and
gradients, and fewer temporaries."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.runtime import elementwise_remat

W1 = [jax.random.normal(jax.random.key(i), (64, 256)) * 0.1 for i in range(4)]
W2 = [jax.random.normal(jax.random.key(9 + i), (256, 64)) * 0.1
      for i in range(4)]
X = jax.random.normal(jax.random.key(2), (512, 64))


def _mlp(act, layers=4):
  """Residual feed-forward layers (frozen weights): each activation's
  residuals live until the backward pass reaches its layer."""
  def fn(x):
    for w1, w2 in zip(W1[:layers], W2[:layers]):
      x = x + act(x @ w1) @ w2
    return jnp.sum(x)
  return fn


ACTS = {
    'gelu_exact': lambda h: nn.gelu(h, approximate=False),
    'gelu_tanh': jax.nn.gelu,
    'silu_gate': lambda h: jax.nn.silu(h) * jnp.cos(h),
    'softplus_like': lambda h: jnp.log1p(jnp.exp(-jnp.abs(h))) + jnp.maximum(
        h, 0.0),
}


def _regions(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return elementwise_remat.plan(jaxpr, set())


@pytest.mark.parametrize('name', sorted(ACTS))
def test_same_values_and_gradients_fewer_temporaries(name, monkeypatch):
  fn = _mlp(ACTS[name])
  assert len(_regions(fn, X)) == 4
  grad = jax.jit(jax.value_and_grad(lorajax.fuse_attention(fn)))
  got = grad(X)
  want = jax.jit(jax.value_and_grad(fn))(X)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
  fused = jax.jit(jax.grad(lorajax.fuse_attention(fn))).lower(X)
  monkeypatch.setenv(elementwise_remat.SWITCH, 'off')
  plain = jax.jit(jax.grad(lorajax.fuse_attention(fn))).lower(X)
  assert 'optimization_barrier' in fused.as_text()
  assert 'optimization_barrier' not in plain.as_text()
  assert (fused.compile().memory_analysis().temp_size_in_bytes
          < plain.compile().memory_analysis().temp_size_in_bytes)


def test_an_intermediate_read_elsewhere_or_a_traced_factor_stays_out():
  def shared(h):
    t = jnp.tanh(h)
    return jnp.sum(t * h) + jnp.sum(t @ W2[0])

  def traced(h, c):
    return jnp.sum(jnp.tanh(h * c) * 2.0)

  h = X @ W1[0]
  assert _regions(shared, h) == []
  # The product with the traced factor is the region's input, not in it.
  assert [r.eqns for r in _regions(traced, h, jnp.float32(0.5))] == [[1, 2]]
  # The factor's gradient is still there.
  g = jax.grad(lorajax.fuse_attention(traced), argnums=1)(h, 0.5)
  np.testing.assert_allclose(g, jax.grad(traced, argnums=1)(h, 0.5),
                             rtol=1e-5)


def test_an_activation_of_a_targeted_kernel_is_still_refused():
  """A region whose input is an adapted kernel falls back to the plain
  equations, so the rewrite's error names the parameter."""
  params = {'w': W1[0]}
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2))])
  adapters = lorajax.init(spec, params, jax.random.key(0))
  g = lorajax.lora(lambda p, x: x @ (jnp.tanh(p['w']) * 2.0), spec)
  with pytest.raises(lorajax.RewriteError, match="'w'.*'tanh'"):
    g(params, adapters, X)
