"""Differential tests of the rewrite against the merged formulation.

Hypothesis draws a provider (LoRA, or DoRA where there are no batch
axes), a kernel use (Flax ``[in, out]``, PyTorch ``[out, in]``,
multi-axis in or out, MoE-style batched, explicitly transposed, stacked
under ``scan``, kernel as the left operand), sizes that include square
kernels, a rank, a compute dtype and the container that holds the
parameters. For every draw:

- the adapted function equals ``fn(merge(params, adapters))``;
- the gradient of every adapter factor equals the merged formulation's;
- ``unmerge(merge(params))`` gives ``params`` back (float32 rounding);
- ``combine(*partition(params))`` gives ``params`` back exactly.

The test command runs a bounded number of examples (the ``ci`` profile);
``pytest tests/test_differential.py --hypothesis-profile=thorough`` runs
more.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from flax import struct
from hypothesis import given
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

import lorajax


@dataclasses.dataclass(frozen=True)
class Use:
  """One way a function consumes its kernel."""
  name: str
  shape: Callable[[int, int, int], tuple[int, ...]]   # (din, dout, e) -> W
  x_shape: Callable[[int, int, int], tuple[int, ...]]  # (din, dout, e) -> x
  apply: Callable[[jax.Array, jax.Array], jax.Array]   # (x, w) -> y
  describe: str


def _scan_apply(x, w):
  def body(h, wl):
    return jnp.tanh(h @ wl), None
  return lax.scan(body, x, w)[0]


USES = [
    Use('flax', lambda i, o, e: (i, o), lambda i, o, e: (3, i),
        lambda x, w: x @ w, '[in, out]'),
    Use('torch', lambda i, o, e: (o, i), lambda i, o, e: (3, i),
        lambda x, w: jnp.einsum('bi,oi->bo', x, w), '[out, in]'),
    Use('transposed', lambda i, o, e: (o, i), lambda i, o, e: (3, i),
        lambda x, w: x @ w.T, '[out, in]'),
    Use('multi_out', lambda i, o, e: (i, e, o), lambda i, o, e: (3, i),
        lambda x, w: jnp.einsum('bd,dhk->bhk', x, w), '[in, out, out]'),
    Use('multi_in', lambda i, o, e: (e, i, o), lambda i, o, e: (3, e, i),
        lambda x, w: jnp.einsum('bhd,hdk->bk', x, w), '[in, in, out]'),
    Use('experts', lambda i, o, e: (e, i, o), lambda i, o, e: (e, 3, i),
        lambda x, w: jnp.einsum('ecd,edf->ecf', x, w), '[E, in, out]'),
    Use('experts_torch', lambda i, o, e: (e, o, i), lambda i, o, e: (e, 3, i),
        lambda x, w: jnp.einsum('ecd,efd->ecf', x, w), '[E, out, in]'),
    Use('lhs', lambda i, o, e: (i, o), lambda i, o, e: (i, 3),
        lambda x, w: lax.dot_general(w, x, (((0,), (0,)), ((), ()))),
        '[in, out] as lhs'),
    Use('transposed_multi', lambda i, o, e: (i, e, o), lambda i, o, e: (3, i),
        lambda x, w: jnp.einsum('bd,dkh->bkh', x, jnp.transpose(w, (0, 2, 1))),
        '[in, out, out] transposed'),
]
SCAN = Use('scan', lambda i, o, e: (e, i, i), lambda i, o, e: (3, i),
           _scan_apply, '[L, in, out] scanned')


class Pair(NamedTuple):
  w: Any
  bias: Any


@struct.dataclass
class Block:
  w: Any
  bias: Any


def _container(kind: str, w: jax.Array, bias: jax.Array) -> Any:
  if kind == 'dict':
    return {'layer': {'w': w, 'bias': bias}}
  if kind == 'list':
    return {'layers': [{'bias': bias}, {'w': w}]}
  if kind == 'tuple':
    return ({'w': w}, bias)
  if kind == 'dataclass':
    return {'block': Block(w, bias)}
  return Pair(w, bias)


def _get_w(kind: str, params: Any) -> jax.Array:
  return {'dict': lambda p: p['layer']['w'], 'list': lambda p: p['layers'][1]['w'],
          'tuple': lambda p: p[0]['w'], 'namedtuple': lambda p: p.w,
          'dataclass': lambda p: p['block'].w}[kind](params)


def _w_regex(kind: str) -> str:
  return {'dict': 'layer/w', 'list': 'layers/1/w', 'tuple': '0/w',
          'namedtuple': 'w', 'dataclass': 'block/w'}[kind]


@st.composite
def cases(draw):
  use = draw(st.sampled_from(USES + [SCAN]))
  din = draw(st.integers(2, 5))
  square = draw(st.booleans())
  dout = din if square else draw(st.integers(2, 5))
  e = draw(st.integers(2, 3))
  container = draw(st.sampled_from(['dict', 'list', 'tuple', 'namedtuple',
                                         'dataclass']))
  dtype = draw(st.sampled_from(['float32', 'bfloat16']))
  seed = draw(st.integers(0, 2**16))
  dora = (not use.name.startswith('experts')) and draw(st.booleans())
  return use, din, dout, e, container, dtype, seed, dora


def _setup(case):
  use, din, dout, e, container, dtype, seed, dora = case
  k = jax.random.split(jax.random.key(seed), 5)
  w = jax.random.normal(k[0], use.shape(din, dout, e)) / 2
  bias = jax.random.normal(k[1], (3,))
  params = _container(container, w, bias)
  x = jax.random.normal(k[2], use.x_shape(din, dout, e))
  cdt = jnp.dtype(dtype)

  def fn(p, x):
    y = use.apply(x.astype(cdt), _get_w(container, p).astype(cdt))
    return y.astype(jnp.float32)

  limit = min(din, dout)
  rank = int(jax.random.randint(k[3], (), 1, limit + 1))
  provider = (lorajax.Dora(rank=rank, alpha=2.0 * rank) if dora
              else lorajax.Lora(rank=rank, alpha=2.0 * rank))
  spec = lorajax.LoraSpec([(_w_regex(container), provider),
                           (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, k[4], fn=fn, args=(x,))
  # b starts at zero: give every factor random values.
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(k[4], len(leaves))
  adapters = jax.tree.unflatten(tree, [
      jax.random.normal(kk, l.shape) / 2 for kk, l in zip(keys, leaves)])
  return fn, params, adapters, spec, x, cdt


def _tol(cdt):
  return dict(rtol=1e-5, atol=1e-5) if cdt == jnp.float32 else dict(
      rtol=5e-2, atol=5e-2)


@given(cases())
def test_adapted_equals_merged(case):
  fn, params, adapters, spec, x, cdt = _setup(case)
  adapted = lorajax.lora(fn, spec)(params, adapters, x)
  merged = fn(lorajax.merge(params, adapters, spec), x)
  np.testing.assert_allclose(adapted, merged, **_tol(cdt))


@given(cases())
def test_gradients_equal_merged(case):
  if case[-1]:  # DoRA treats its norm as a constant in the backward pass
    return      # (the paper, section 4.3), the merged kernel does not.
  fn, params, adapters, spec, x, cdt = _setup(case)
  g = lorajax.lora(fn, spec)
  probe = jax.random.normal(jax.random.key(7), fn(params, x).shape)

  def loss_adapted(ad):
    return jnp.sum(g(params, ad, x) * probe)

  def loss_merged(ad):
    return jnp.sum(fn(lorajax.merge(params, ad, spec), x) * probe)

  ga = jax.grad(loss_adapted)(adapters)
  gm = jax.grad(loss_merged)(adapters)
  assert jax.tree.structure(ga) == jax.tree.structure(adapters)
  scale = max(1.0, max(float(jnp.abs(l).max()) for l in jax.tree.leaves(gm)))
  tol = 1e-4 if cdt == jnp.float32 else 8e-2
  jax.tree.map(lambda a, m: np.testing.assert_allclose(
      a, m, rtol=tol, atol=tol * scale), ga, gm)


@given(cases())
def test_unmerge_inverts_merge(case):
  if case[-1]:  # DoRA's merge divides by a norm it cannot recover.
    return
  _, params, adapters, spec, _, _ = _setup(case)
  back = lorajax.unmerge(lorajax.merge(params, adapters, spec), adapters, spec)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
               back, params)


@given(cases())
def test_partition_round_trip_is_exact(case):
  params = _setup(case)[1]
  spec = lorajax.LoraSpec([(r'(.*bias|1)', 'train'), (r'.*', 'freeze')])
  train, frozen = lorajax.partition(params, spec)
  back = lorajax.combine(train, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, params)
