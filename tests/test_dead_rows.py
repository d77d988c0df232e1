"""Rows a function slices away are not computed (``lorajax.runtime.dead_rows``).

Each case compares the pruned jaxpr with the function as traced: values,
gradients, and XLA's FLOP count of the compiled step (the witness that the
rows are really gone). Functions that read every row, or whose slice sits
behind an operation mixing rows, must keep their work and their values.
"""

import flax.linen as nn
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.runtime import dead_rows

B, T, H = 2, 12, 16


def _params(seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return {'w1': jax.random.normal(ks[0], (H, 4 * H)) * 0.3,
          'w2': jax.random.normal(ks[1], (4 * H, H)) * 0.3,
          'wq': jax.random.normal(ks[2], (H, H)) * 0.3,
          'wk': jax.random.normal(ks[3], (H, H)) * 0.3}


def _x(seed=1):
  return jax.random.normal(jax.random.key(seed), (B, T, H))


def _norm(x):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True)
                                  + 1e-6)


def _layer(p, x):
  """Attention (queries row-wise, keys and values all rows) and an MLP."""
  s = jnp.einsum('btd,bsd->bts', x @ p['wq'], x @ p['wk']) / 4.0
  x = _norm(x + jax.nn.softmax(s, axis=-1) @ x)
  return _norm(x + jax.nn.gelu(x @ p['w1'], approximate=False) @ p['w2'])


def _cls(p, x):
  return _layer(p, _layer(p, x))[:, 0]


def _last(p, x):
  return jnp.tanh(_layer(p, x)[:, -1] @ p['wq'])


def _window(p, x):
  return _layer(p, x)[:, 3:7].sum()


def _heads_first(p, x):
  y = _layer(p, x).reshape(B, T, 4, 4).transpose(0, 2, 1, 3)   # [B, h, T, d]
  return y[:, :, 0]


def _full_and_cls(p, x):     # every row is an output: nothing to prune
  y = _layer(p, x)
  return y, y[:, 0]


def _mean_pool(p, x):        # no slice at all
  return _layer(p, x).mean(1)


def _shifted(p, x):          # a language model's labels: most rows kept
  return _layer(p, x)[:, :-1]


def _cumsum_then_cls(p, x):  # rows mixed after the layer: it stays whole
  return jnp.cumsum(_layer(p, x), axis=1)[:, 0]


def _softmax_over_rows(p, x):  # a reduction along the kept axis
  y = _layer(p, x)
  return (jax.nn.softmax(y, axis=1) * y)[:, 0]


def _flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()['flops']


def _products(closed):
  return [e.outvars[0].aval.shape for e in closed.jaxpr.eqns
          if e.primitive.name == 'dot_general']


def _jaxpr_fn(closed):
  return lambda *a: jax.core.eval_jaxpr(closed.jaxpr, closed.consts,
                                        *jax.tree.leaves(a))


@pytest.mark.parametrize('fn', [_cls, _last, _window, _heads_first])
def test_pruned_function_has_the_values_gradients_and_less_work(fn):
  p, x = _params(), _x()
  closed = jax.make_jaxpr(fn)(p, x)
  pruned = dead_rows.prune(closed)
  assert pruned is not None
  want, got = _jaxpr_fn(closed), _jaxpr_fn(pruned)
  np.testing.assert_allclose(jax.jit(got)(p, x)[0], jax.jit(want)(p, x)[0],
                             rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(jax.random.key(5), jax.eval_shape(fn, p, x).shape)

  def loss(f):
    return lambda p, x: jnp.sum(f(p, x)[0] * cot)

  gw = jax.jit(jax.grad(loss(want), argnums=(0, 1)))(p, x)
  gg = jax.jit(jax.grad(loss(got), argnums=(0, 1)))(p, x)
  for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The last layer's MLP is 2/3 of a layer's products; it runs for a
  # third of the rows or fewer in every case.
  assert _flops(got, p, x) < 0.85 * _flops(want, p, x)


@pytest.mark.parametrize('fn', [_full_and_cls, _mean_pool, _shifted])
def test_functions_that_read_most_rows_are_not_traced_again(fn):
  assert dead_rows.prune(jax.make_jaxpr(fn)(_params(), _x())) is None


@pytest.mark.parametrize('fn', [_cumsum_then_cls, _softmax_over_rows])
def test_rows_mixed_after_the_layer_keep_the_layer_whole(fn):
  p, x = _params(), _x()
  closed = jax.make_jaxpr(fn)(p, x)
  pruned = dead_rows.prune(closed) or closed
  got, want = _jaxpr_fn(pruned), _jaxpr_fn(closed)
  np.testing.assert_allclose(jax.jit(got)(p, x)[0], jax.jit(want)(p, x)[0],
                             rtol=1e-5, atol=1e-5)
  # Work after the mixing step may shrink (the product with ``y`` in
  # _softmax_over_rows); every product of the layer keeps all its rows.
  assert _products(pruned) == _products(closed)


def test_switch_turns_it_off(monkeypatch):
  monkeypatch.setenv(dead_rows.SWITCH, 'off')
  assert dead_rows.prune(jax.make_jaxpr(_cls)(_params(), _x())) is None


def test_lora_step_of_a_flax_classifier_does_less_work():
  """``lorajax.lora`` on a Flax model read at ``[CLS]``: the same loss and
  adapter gradients as with pruning off, fewer XLA FLOPs."""

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(2):
        h = nn.Dense(4 * H, name=f'up_{i}')(x)
        x = nn.LayerNorm(name=f'norm_{i}')(x + nn.Dense(H, name=f'down_{i}')(
            nn.gelu(h)))
      return nn.Dense(2, name='head')(x[:, 0])

  model = Classifier()
  x = _x()
  params = model.init(jax.random.key(0), x)['params']
  spec = lorajax.LoraSpec([(r'.*(up|down)_\d/kernel', lorajax.Lora(rank=4)),
                           (r'.*', 'freeze')])
  adapters = jax.tree.map(lambda a: a + 0.1,
                          lorajax.init(spec, params, jax.random.key(2)))

  def step():
    g = lorajax.lora(lambda p, x: model.apply({'params': p}, x), spec)
    return jax.value_and_grad(lambda a: jnp.sum(g(params, a, x) ** 2))

  got, pruned = jax.jit(step())(adapters), _flops(step(), adapters)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(dead_rows.SWITCH, 'off')
    want, whole = jax.jit(step())(adapters), _flops(step(), adapters)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Layer 1 (half the products) runs for 1 row of 12.
  assert pruned < 0.6 * whole


def test_a_kernel_whose_output_features_are_cut_stays_whole():
  """``(x @ w)[..., :4]`` with ``w`` adapted: the slice is along the
  kernel's output features, which the LoRA rewrite must see whole; the
  result is the merged kernel's."""
  params = {'w': jax.random.normal(jax.random.key(0), (H, 12))}
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2))])
  adapters = jax.tree.map(lambda a: a + 0.1,
                          lorajax.init(spec, params, jax.random.key(1)))

  def f(p, x):
    return jnp.tanh(x @ p['w'])[..., :4]

  got = jax.jit(lorajax.lora(f, spec))(params, adapters, _x())
  want = f(lorajax.merge(params, adapters, spec), _x())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# Random programs: row-wise steps and row-mixing steps in any order, then a
# slice of a random range of the sequence axis.
_STEPS = {
    'dense': lambda p, x: x @ p['wq'],
    'gelu': lambda p, x: jax.nn.gelu(x),
    'norm': lambda p, x: _norm(x),
    'residual': lambda p, x: x + jnp.tanh(x @ p['wk']),
    'attend': lambda p, x: jax.nn.softmax(
        jnp.einsum('btd,bsd->bts', x @ p['wq'], x), axis=-1) @ x,
    'cumsum': lambda p, x: jnp.cumsum(x, axis=1),
    'flip': lambda p, x: x[:, ::-1],
    'roll': lambda p, x: jnp.roll(x, 1, axis=1),
    'mean_rows': lambda p, x: x + x.mean(1, keepdims=True),
    'swap': lambda p, x: jnp.swapaxes(x, 0, 1).swapaxes(0, 1) * 2.0,
}


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(sorted(_STEPS)), min_size=1,
                           max_size=6),
                  st.integers(0, T - 1), st.integers(1, T))
def test_random_programs_keep_their_values(steps, start, size):
  stop = min(T, start + size)

  def fn(p, x):
    for s in steps:
      x = _STEPS[s](p, x)
    return x[:, start:stop]

  p, x = _params(), _x()
  closed = jax.make_jaxpr(fn)(p, x)
  pruned = dead_rows.prune(closed) or closed
  np.testing.assert_allclose(_jaxpr_fn(pruned)(p, x)[0],
                             _jaxpr_fn(closed)(p, x)[0], rtol=1e-4, atol=1e-4)
