"""lorajax.matmul: bfloat16 products accumulated in float32, forward and
backward, and where lorajax uses them."""

import flax.linen as nn
import jax
from jax import lax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import matmul

BF = jnp.bfloat16
# (lhs shape, rhs shape, dimension numbers): a dense layer, a tied LM head
# (x·Eᵀ), a weight gradient's form (xᵀ·g), two contracting axes out of
# order, a vector.
CASES = [
    ((4, 5, 6), (6, 7), (((2,), (0,)), ((), ()))),
    ((4, 6), (7, 6), (((1,), (1,)), ((), ()))),
    ((6, 4), (6, 7), (((0,), (0,)), ((), ()))),
    ((2, 3, 6, 5), (5, 2, 6, 7), (((2, 3), (2, 0)), ((), ()))),
    ((6,), (6, 7), (((0,), (0,)), ((), ()))),
]


def _operands(ls, rs):
  return (jax.random.normal(jax.random.key(1), ls, BF),
          jax.random.normal(jax.random.key(2), rs, BF))


def _close_to_rounded(got, exact):
  """``got`` (bfloat16) is ``exact`` (float32) rounded, up to one bfloat16
  step of the largest value (float32 sums in another order)."""
  assert got.dtype == BF
  exact = np.asarray(exact, np.float32)
  err = np.abs(np.asarray(got, np.float32) - exact)
  assert err.max() <= 2.0 ** -7 * np.abs(exact).max(), err.max()


@pytest.mark.parametrize('ls,rs,dn', CASES)
def test_product_and_both_gradients_are_the_float32_ones_rounded(ls, rs, dn):
  lhs, rhs = _operands(ls, rs)

  def exact(a, b):
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dn)

  y, vjp = jax.vjp(lambda a, b: matmul.dot_general(a, b, dn), lhs, rhs)
  y32, vjp32 = jax.vjp(exact, lhs.astype(jnp.float32), rhs.astype(jnp.float32))
  assert y.shape == y32.shape
  _close_to_rounded(y, y32)
  g = jax.random.normal(jax.random.key(3), y.shape, BF)
  for got, want, operand in zip(vjp(g), vjp32(g.astype(jnp.float32)),
                                (lhs, rhs)):
    assert got.shape == operand.shape
    _close_to_rounded(got, want)


@pytest.mark.parametrize('ls,rs,dn', CASES[:2])
def test_every_product_of_the_gradient_multiplies_bfloat16_into_float32(
    ls, rs, dn):
  # The form the CPU's bfloat16 units run: no float32 operand anywhere,
  # which jax's own transpose of a float32-output product would give; and
  # a stored [N, K] operand (a tied LM head's embedding) is not transposed
  # (XLA ran that transposed product in float32).
  lhs, rhs = _operands(ls, rs)
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda a, b: matmul.dot_general(a, b, dn).astype(jnp.float32).sum(),
      (0, 1)))(lhs, rhs)
  dots = dots_in(jaxpr.jaxpr)
  assert len(dots) == 3
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [BF, BF]
    assert eqn.params['preferred_element_type'] == jnp.float32
  transposed = [e.invars[0].aval.shape for e in jaxpr.jaxpr.eqns
                if e.primitive.name == 'transpose']
  assert rhs.shape not in transposed


def test_gradients_compile_and_run_with_the_bfloat16_options():
  # jax's own form (a float32 output, differentiated by jax) aborts on
  # XLA's CPU dot runtime with these options ("Unsupported element type for
  # DotThunk::Execute: BF16 x BF16 = F32"); matmul's matrix form runs.
  lhs, rhs = _operands((4, 5, 6), (6, 7))
  dn = CASES[0][2]
  options = lorajax.compiler_options('cpu', dtype='bfloat16')
  grads = jax.jit(jax.grad(
      lambda a, b: matmul.dot_general(a, b, dn).astype(jnp.float32).sum(),
      (0, 1)), compiler_options=options)(lhs, rhs)
  want = jax.grad(lambda a, b: lax.dot_general(a, b, dn).sum(), (0, 1))(
      lhs.astype(jnp.float32), rhs.astype(jnp.float32))
  for got, w in zip(grads, want):
    _close_to_rounded(got, w)


def test_wanted_only_for_unbatched_bfloat16_products_without_a_wider_output():
  dn = (((1,), (0,)), ((), ()))
  b16, f32 = jnp.ones((2, 3), BF), jnp.ones((3, 2), jnp.float32)
  assert matmul.wanted(b16, jnp.ones((3, 2), BF), dn)
  assert matmul.wanted(b16, jnp.ones((3, 2), BF), dn, BF)
  assert not matmul.wanted(b16, jnp.ones((3, 2), BF), dn, jnp.float32)
  assert not matmul.wanted(jnp.ones((2, 3)), f32, dn)
  assert not matmul.wanted(b16, f32, dn)
  batched = (((2,), (1,)), ((0,), (0,)))
  assert not matmul.wanted(jnp.ones((2, 2, 3), BF), jnp.ones((2, 3, 2), BF),
                           batched)


@pytest.mark.parametrize('lhs,rhs,dn,match', [
    (jnp.ones((2, 2, 3), BF), jnp.ones((2, 3, 2), BF),
     (((2,), (1,)), ((0,), (0,))), 'batch axes'),
    (jnp.ones((2, 3), BF), jnp.ones((3, 2), jnp.float32),
     (((1,), (0,)), ((), ())), 'bfloat16 × float32'),
])
def test_refuses_what_it_does_not_compute(lhs, rhs, dn, match):
  with pytest.raises(ValueError, match=match):
    matmul.dot_general(lhs, rhs, dn)
  with pytest.raises(ValueError, match='-> float32'):
    matmul.dot_general(jnp.ones((2, 3), BF), jnp.ones((3, 2), BF),
                       (((1,), (0,)), ((), ())), preferred_element_type=
                       jnp.float32)


class _Mlp(nn.Module):
  dtype: object

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16, dtype=self.dtype, name='up')(x)
    return nn.Dense(4, dtype=self.dtype, name='down')(nn.relu(h))


def dots_in(jaxpr) -> list:
  """Every ``dot_general`` equation of ``jaxpr``, inner jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append(eqn)
    for sub in jex.jaxprs_in_params(eqn.params):
      found += dots_in(sub)
  return found


def _dot_types(fn, *args):
  return [(e.invars[0].aval.dtype, e.params['preferred_element_type'])
          for e in dots_in(jax.make_jaxpr(fn)(*args).jaxpr)]


@pytest.mark.parametrize('dtype', [BF, jnp.float32])
def test_lora_uses_it_for_bfloat16_products_adapted_or_not(dtype):
  model = _Mlp(dtype)
  x = jnp.ones((2, 3, 8), dtype)
  params = model.init(jax.random.key(0), x)['params']
  spec = lorajax.LoraSpec([(r'up/kernel', lorajax.Lora(rank=2, alpha=4)),
                           (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, jax.random.key(1))
  adapted = lorajax.lora(lambda p, x: model.apply({'params': p}, x), spec)
  dots = _dot_types(adapted, params, adapters, x)
  # up: base product, x·a, (x·a)·b; down: base product.
  wide = [d for d in dots if d[1] == jnp.float32 and d[0] == BF]
  if dtype == BF:
    assert len(wide) == 2     # both base products, adapted and frozen.
  else:
    assert not wide
  y = adapted(params, adapters, x)
  y32 = lorajax.lora(
      lambda p, x: _Mlp(jnp.float32).apply({'params': p}, x), spec)(
          params, adapters, x.astype(jnp.float32))
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), y32,
                             atol=3e-2 if dtype == BF else 1e-6)


def test_compiler_options_for_a_bfloat16_step_and_bad_dtypes():
  assert (lorajax.compiler_options('cpu', dtype='bfloat16')
          ['xla_cpu_experimental_ynn_fusion_type']
          == 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT')
  assert lorajax.compiler_options('cpu', dtype='bfloat16')[
      'xla_allow_excess_precision'] is False
  assert (lorajax.compiler_options('cpu', dtype='float32')
          == lorajax.compiler_options('cpu'))
  assert lorajax.compiler_options('gpu', dtype='bfloat16') == {}
  with pytest.raises(ValueError, match="'bfloat17' is not a dtype"):
    lorajax.compiler_options('cpu', dtype='bfloat17')
  with pytest.raises(ValueError, match='int8 is not a floating-point'):
    lorajax.compiler_options('cpu', dtype='int8')
