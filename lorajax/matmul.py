"""Low-precision products that reach the CPU's matrix units.

A ``bfloat16 × bfloat16 → bfloat16`` ``dot_general`` does not run as a
bfloat16 product on XLA's CPU backend: XLA converts both operands to float32,
multiplies in float32 and rounds the result. The YNNPACK library that XLA can
hand dots to (``lorajax.compiler_options(dtype='bfloat16')``) multiplies
bfloat16 operands with the CPU's bfloat16 instructions (AMX, AVX512-BF16),
but only a product asked for in float32 (``preferred_element_type``).

``dot_general`` here is that form: the same product, accumulated in float32
and rounded to bfloat16 once, in the forward pass and in both products of the
backward pass (a custom VJP: jax's own transpose of a float32-output product
would multiply a float32 cotangent by a bfloat16 operand, which runs as a
float32 product again). It is what XLA computes for the plain product up to
the order of the float32 sums, and what GPUs, TPUs and PyTorch's bfloat16
``matmul`` compute.

On a 2-core Xeon with AMX (2026-12-01, jax 0.10.2, interleaved in one
process): a 2048² bfloat16 product 186 GFLOP/s plain, 821 with this form and
YNNPACK dots; PyTorch's bfloat16 ``matmul`` 817.

``lorajax.lora`` uses it for every bfloat16 product of the function it
transforms, adapted kernel or not, when the default backend is the CPU
(``wanted``); elsewhere products are left as written.

Wide float32 products on the CPU. XLA's CPU runtime (Eigen's contraction)
runs a float32 product whose right operand has a wide free axis at about
half the speed of the same work in narrower blocks: an LM head
``[2048, 576] · [576, 49152]`` at 38 GFLOP/s, against 77 for the same
product as 32 products of 1,536 columns, concatenated; at 4,096 columns
53 against 83 (2-core AMD EPYC, jax 0.10.2, ``python -m
experiments.bench.wide_dot``, alternated in one run). The SmolLM2 head's
forward product, cross entropy and gradient of the hidden states took 4.0 s
plain and 2.8 s with the forward product in blocks. ``product`` multiplies such
a product (right operand with one free axis of at least ``WIDE_MIN``
columns, at least ``WIDE_ROWS`` rows on the left) in blocks of
``WIDE_BLOCK`` columns; each output is the same sum. Its backward pass is
the plain product's (both of its products are narrow). Splitting the left
operand's rows instead made the product slower.

Example:

  >>> import jax.numpy as jnp
  >>> x = jnp.ones((2, 3), jnp.bfloat16); w = jnp.ones((3, 4), jnp.bfloat16)
  >>> y = dot_general(x, w, (((1,), (0,)), ((), ())))
  >>> y.dtype, y.tolist()[0]
  (dtype(bfloat16), [3.0, 3.0, 3.0, 3.0])
  >>> h = jnp.ones((512, 8)); e = jnp.ones((WIDE_MIN, 8))   # tied head h·eᵀ
  >>> wide_blocks(h, e, (((1,), (1,)), ((), ())))
  3
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

DimensionNumbers = Any
_LOW = (jnp.dtype(jnp.bfloat16),)
WIDE_MIN = 4096     # free columns of the right operand from which to split
WIDE_ROWS = 512     # rows of the left operand below which nothing is split
WIDE_BLOCK = 1536   # columns of each block


def wanted(lhs: Any, rhs: Any, dimension_numbers: DimensionNumbers,
           preferred_element_type: Any = None) -> bool:
  """Whether ``dot_general`` should replace this product: both operands
  bfloat16, no batch axes, no output type asked for (or bfloat16), and the
  CPU as the default backend."""
  if dimension_numbers[1][0] or dimension_numbers[1][1]:
    return False
  dtypes = (jnp.result_type(lhs), jnp.result_type(rhs))
  if dtypes[0] not in _LOW or dtypes[1] != dtypes[0]:
    return False
  if (preferred_element_type is not None
      and jnp.dtype(preferred_element_type) != dtypes[0]):
    return False
  return jax.default_backend() == 'cpu'


def dot_general(lhs: jax.Array, rhs: jax.Array,
                dimension_numbers: DimensionNumbers, precision: Any = None,
                preferred_element_type: Any = None) -> jax.Array:
  """``lax.dot_general`` of two bfloat16 arrays, accumulated in float32.

  Args:
    lhs, rhs, dimension_numbers, precision: as for ``lax.dot_general``.
    preferred_element_type: ``None`` or the operands' dtype; the result has
      the operands' dtype either way.

  Returns:
    The product in the operands' dtype.

  Raises:
    ValueError: operands of different dtypes, another output type asked
      for, or batch axes (call ``lax.dot_general`` for those).
  """
  dtype = jnp.result_type(lhs)
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb:
    raise ValueError(
        f'matmul.dot_general takes products without batch axes; got batch '
        f'axes {tuple(lb)} × {tuple(rb)}')
  out = (dtype if preferred_element_type is None
         else jnp.dtype(preferred_element_type))
  if jnp.result_type(rhs) != dtype or out != dtype:
    raise ValueError(
        f'matmul.dot_general multiplies two arrays of one dtype into that '
        f'dtype; got {dtype} × {jnp.result_type(rhs)} -> {out}')
  dims = ((_ints(lc), _ints(rc)), ((), ()))
  return _product(lhs, rhs, dims, precision)


def _ints(axes: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(a) for a in axes)


def _perm_reshape(x: jax.Array, first: Sequence[int], second: Sequence[int]
                  ) -> jax.Array:
  """``x`` as a matrix: the axes ``first`` (in that order) flattened into
  rows, ``second`` into columns."""
  x = lax.transpose(x, tuple(first) + tuple(second))
  n = len(first)
  return x.reshape(math.prod(x.shape[:n]), math.prod(x.shape[n:]))


def _product(lhs, rhs, dims, precision):
  """An unbatched product as one matrix product with a single contracting
  axis, ``[M, K]·[K, N]`` or ``[M, K]·[N, K]ᵀ`` (the forms XLA's CPU dot
  emitters and YNNPACK take in bfloat16; a product contracting both
  operands' first axes, or one that XLA has to transpose, runs in float32)."""
  (lc, rc), _ = dims
  lfree = [a for a in range(lhs.ndim) if a not in lc]
  rfree = [a for a in range(rhs.ndim) if a not in rc]
  a = _perm_reshape(lhs, lfree, lc)
  # The kernel as stored, when its contracting axes already come last
  # (a tied embedding's [V, d] in h·Eᵀ): [N, K], no transpose.
  nt = bool(rfree) and tuple(rfree) + tuple(rc) == tuple(range(rhs.ndim))
  b = (_perm_reshape(rhs, rfree, rc) if nt
       else _perm_reshape(rhs, rc, rfree))
  out = _matrix_product(a, b, nt, precision)
  return out.reshape(tuple(lhs.shape[i] for i in lfree)
                     + tuple(rhs.shape[i] for i in rfree))


def _wide(a, b, contract, precision):
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matrix_product(a, b, nt, precision):
  """``a [M, K] · b [K, N]``, or ``a · bᵀ`` for ``b [N, K]`` when ``nt``."""
  return _wide(a, b, ((1,), (1 if nt else 0,)), precision)


def _matrix_product_fwd(a, b, nt, precision):
  return _matrix_product(a, b, nt, precision), (a, b)


def _matrix_product_bwd(nt, precision, res, g):
  a, b = res
  g = g.astype(a.dtype)
  if nt:   # y = a·bᵀ: da = g·b, db = gᵀ·a
    return (_wide(g, b, ((1,), (0,)), precision),
            _wide(g, a, ((0,), (0,)), precision))
  return (_wide(g, b, ((1,), (1,)), precision),     # [M, N]·[K, N]ᵀ
          _wide(a, g, ((0,), (0,)), precision))     # [M, K]ᵀ·[M, N]


_matrix_product.defvjp(_matrix_product_fwd, _matrix_product_bwd)


def product(lhs: jax.Array, rhs: jax.Array,
            dimension_numbers: DimensionNumbers, precision: Any = None,
            preferred_element_type: Any = None) -> jax.Array:
  """``lax.dot_general`` in the form that runs fastest on the CPU: a
  bfloat16 product accumulated in float32 (``wanted``), a wide float32
  product in blocks of columns (``wide_blocks``), else as written."""
  if wanted(lhs, rhs, dimension_numbers, preferred_element_type):
    return dot_general(lhs, rhs, dimension_numbers, precision)
  if wide_blocks(lhs, rhs, dimension_numbers, preferred_element_type):
    return blocked_dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


def wide_blocks(lhs: Any, rhs: Any, dimension_numbers: DimensionNumbers,
                preferred_element_type: Any = None) -> int:
  """How many blocks of ``WIDE_BLOCK`` columns ``product`` splits this
  product into; 0 leaves it whole. Split: float32 operands and output, no
  batch axes, ``rhs`` with a single free axis of at least ``WIDE_MIN``,
  ``lhs`` with at least ``WIDE_ROWS`` rows, the CPU as default backend."""
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb:
    return 0
  f32 = jnp.dtype(jnp.float32)
  if jnp.result_type(lhs) != f32 or jnp.result_type(rhs) != f32:
    return 0
  if (preferred_element_type is not None
      and jnp.dtype(preferred_element_type) != f32):
    return 0
  free = [a for a in range(np.ndim(rhs)) if a not in _ints(rc)]
  rows = math.prod(d for a, d in enumerate(np.shape(lhs))
                   if a not in _ints(lc))
  if len(free) != 1 or rows < WIDE_ROWS:
    return 0
  cols = np.shape(rhs)[free[0]]
  if cols < WIDE_MIN or jax.default_backend() != 'cpu':
    return 0
  return -(-cols // WIDE_BLOCK)


def blocked_dot_general(lhs: jax.Array, rhs: jax.Array,
                        dimension_numbers: DimensionNumbers,
                        precision: Any = None,
                        preferred_element_type: Any = None,
                        block: int = WIDE_BLOCK) -> jax.Array:
  """``lax.dot_general(lhs, rhs, ...)`` as products of ``block`` columns
  of ``rhs``'s one free axis, concatenated along the output's last axis.

  Raises:
    ValueError: batch axes, or ``rhs`` with more or fewer than one free
      axis.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  free = [a for a in range(rhs.ndim) if a not in _ints(rc)]
  if lb or rb or len(free) != 1:
    raise ValueError(
        f'blocked_dot_general splits a product without batch axes whose '
        f'right operand has one free axis; got batch axes {tuple(lb)} × '
        f'{tuple(rb)} and free axes {tuple(free)} of {rhs.shape}')
  dn = ((_ints(lc), _ints(rc)), ((), ()))
  return _blocked(lhs, rhs, dn, precision, preferred_element_type,
                  int(block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _blocked(lhs, rhs, dn, precision, preferred, block):
  axis = next(a for a in range(rhs.ndim) if a not in dn[0][1])
  cols = rhs.shape[axis]
  parts = [lax.dot_general(
      lhs, lax.slice_in_dim(rhs, i, min(i + block, cols), axis=axis), dn,
      precision=precision, preferred_element_type=preferred)
      for i in range(0, cols, block)]
  return lax.concatenate(parts, parts[0].ndim - 1)


def _blocked_fwd(lhs, rhs, dn, precision, preferred, block):
  return _blocked(lhs, rhs, dn, precision, preferred, block), (lhs, rhs)


def _blocked_bwd(dn, precision, preferred, block, res, g):
  # The plain product's own backward: its two products are narrow (the
  # hidden states' gradient g·E runs at full speed), and it needs no block
  # of g, where jax's transpose of the blocks would cut g into copies that
  # stay alive together (+0.6 GB at SmolLM2's 8 × 256 tokens).
  del block
  _, vjp = jax.vjp(functools.partial(
      lax.dot_general, dimension_numbers=dn, precision=precision,
      preferred_element_type=preferred), *res)
  return vjp(g)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
