"""Whole-block remat under the LoRA rewrite waits for the block's cotangent
(lorajax.runtime.recompute): same values and gradients, and XLA no longer
runs every block's recomputation early, all alive at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.runtime import recompute

N, B, D, H = 8, 256, 64, 1024   # layers; rows; width; hidden width


def _params():
  keys = jax.random.split(jax.random.key(0), 2 * N)
  return {f'l{i}': {'up': jax.random.normal(keys[2 * i], (D, H)) / 8,
                    'down': jax.random.normal(keys[2 * i + 1], (H, D)) / 32}
          for i in range(N)}


def _layer(lp, x):
  return x + jnp.tanh(x @ lp['up']) @ lp['down']


def _stack(remat):
  def model(p, x):
    for i in range(N):
      x = (jax.checkpoint(_layer) if remat else _layer)(p[f'l{i}'], x)
    return jnp.sum(x ** 2)
  return model


def _spec(dropout=0.0):   # l6, l7: blocks without adapted kernels
  return lorajax.LoraSpec([(r'l[0-5]/up', lorajax.Lora(rank=4,
                                                       dropout=dropout)),
                           (r'.*', 'freeze')])


SPEC = _spec()


def _grads(model, spec, x, rng=None):
  params = _params()
  adapters = lorajax.init(spec, params, jax.random.key(1))
  adapters = jax.tree.map(lambda a: a + 0.01, adapters)   # b != 0
  f = lorajax.lora(model, spec)
  loss = lambda a, x: f(params, a, x, lora_rng=rng)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(adapters, x)


def _assert_same(got, want, rtol):
  (v1, g1), (v0, g0) = got, want
  np.testing.assert_allclose(v1, v0, rtol=rtol)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6)


def test_values_and_gradients_are_those_without_remat():
  x = jax.random.normal(jax.random.key(2), (B, D))
  _assert_same(_grads(_stack(True), SPEC, x), _grads(_stack(False), SPEC, x),
               rtol=2e-5)


def test_values_and_gradients_are_jax_checkpoints_with_adapter_dropout(
    monkeypatch):
  """Same dropout masks (keys), same numbers as the rewrite gave with
  jax.checkpoint."""
  x = jax.random.normal(jax.random.key(2), (B, D))
  spec, rng = _spec(dropout=0.1), jax.random.key(3)
  tied = _grads(_stack(True), spec, x, rng)
  monkeypatch.setattr(recompute, 'after_cotangent',
                      lambda f, tie: jax.checkpoint(f))
  _assert_same(tied, _grads(_stack(True), spec, x, rng), rtol=2e-5)


def test_every_block_outside_a_loop_is_recomputed_after_its_cotangent():
  params = _params()
  adapters = lorajax.init(SPEC, params, jax.random.key(1))
  f = lorajax.lora(_stack(True), SPEC)
  jaxpr = jax.make_jaxpr(lambda a, x: f(params, a, x))(adapters,
                                                       jnp.ones((B, D)))
  tied = [e for e in jaxpr.eqns if e.primitive.name == 'custom_vjp_call'
          and 'recompute_after_cotangent' in str(e.params['bwd'])]
  assert len(tied) == N   # adapted blocks and the two without adapters
  assert not [e for e in jaxpr.eqns if e.primitive.name == 'remat2']


def test_a_block_in_a_scan_stays_a_jax_checkpoint():
  params = {'w': jnp.ones((3, D, D)) / D}
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2))])
  def model(p, x):
    body = jax.checkpoint(lambda x, w: (jnp.tanh(x @ w), None))
    return jax.lax.scan(body, x, p['w'])[0].sum()
  adapters = lorajax.init(spec, params, jax.random.key(0), fn=model,
                          args=(jnp.ones((2, D)),))
  f = lorajax.lora(model, spec)
  text = str(jax.make_jaxpr(lambda a, x: f(params, a, x))(adapters,
                                                         jnp.ones((2, D))))
  assert 'remat' in text and 'recompute_after_cotangent' not in text


def test_the_step_holds_one_blocks_recomputation_not_every_blocks():
  """XLA's temporaries of the gradient: with jax.checkpoint's own schedule
  they held about every layer's [B, H] activations (17.6 of them, measured
  before this change); tied, a few."""
  params = _params()
  adapters = lorajax.init(SPEC, params, jax.random.key(1))
  f = lorajax.lora(_stack(True), SPEC)
  grad = jax.jit(jax.grad(lambda a, x: f(params, a, x)))
  compiled = grad.lower(adapters, jnp.ones((B, D))).compile(
      compiler_options=lorajax.compiler_options())
  hidden = B * H * 4
  assert compiled.memory_analysis().temp_size_in_bytes < 6 * hidden


def test_tie_must_have_one_flag_per_argument_leaf():
  g = recompute.after_cotangent(lambda x, y: x * y, (True,))
  with pytest.raises(ValueError, match='tie has 1 flags for 2 argument'):
    jax.grad(g)(1.0, 2.0)
