"""The LoRA provider: ``x·W + s·(x·a)·b`` with ``a`` [in, r] and ``b`` [r, out].

Orientation follows Flax (kernels are [in, out]). For a multi-axis kernel the
``in`` axes are the ones the function contracts with its input and the
``out`` axes are the rest: a DenseGeneral query kernel ``[d, heads, hd]`` gets
``a`` [d, r] and ``b`` [r, heads, hd]; an output kernel ``[heads, hd, d]``
gets ``a`` [heads, hd, r] and ``b`` [r, d]. Kernels stacked by ``nn.scan``
get stacked adapters: ``a`` [L, in, r], ``b`` [L, r, out].
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from lorajax import spec as spec_lib


def _prod(shape: Sequence[int]) -> int:
  return int(np.prod(shape)) if len(shape) else 1


def kernel_value(kernel: Any) -> jax.Array:
  """The dense kernel for a stored leaf (an array or a FrozenKernel)."""
  if isinstance(kernel, spec_lib.FrozenKernel):
    return kernel.dequantize()
  return kernel


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout on the adapter input; identity without an rng."""
  if rng is None or rate <= 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _lr_fwd(x, a, b, scale, precision, preferred):
  """``s·(x·a)·b`` for ``x`` [M, K], ``a`` [K, r], ``b`` [r, N]."""
  xa = lax.dot_general(x, a, (((1,), (0,)), ((), ())), precision=precision,
                       preferred_element_type=preferred)
  xa = xa * jnp.asarray(scale, xa.dtype)
  y = lax.dot_general(xa, b.astype(xa.dtype), (((1,), (0,)), ((), ())),
                      precision=precision, preferred_element_type=preferred)
  return y, (x, a, b, xa)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _low_rank_2d(x, a, b, scale, precision, preferred):
  return _lr_fwd(x, a, b, scale, precision, preferred)[0]


def _lr_bwd(scale, precision, preferred, res, g):
  """The gradients, with every big operand contracted in its stored layout.

  Differentiated as written, ``db`` would be ``dot(g, xa)ᵀ``, which XLA
  computes by transposing the big ``g`` [M, N] (on CPU, fused with the
  producers of ``g``: 0.5 s for a [4096, 1536] GELU gradient). Here only the
  small [M, r] factors are transposed.
  """
  del preferred
  x, a, b, xa = res
  dn = lambda c0, c1: (((c0,), (c1,)), ((), ()))  # pylint: disable=unnecessary-lambda-assignment
  g = g.astype(xa.dtype)
  gxa = lax.dot_general(g, b.astype(g.dtype), dn(1, 1), precision=precision)
  gxa = gxa * jnp.asarray(scale, gxa.dtype)                       # [M, r]
  db = lax.dot_general(xa, g, dn(0, 0), precision=precision)      # [r, N]
  da = lax.dot_general(gxa.astype(x.dtype), x, dn(0, 0),
                       precision=precision).T                     # [K, r]
  dx = lax.dot_general(gxa.astype(x.dtype), a, dn(1, 1),
                       precision=precision)                       # [M, K]
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank_2d.defvjp(_lr_fwd, _lr_bwd)


def low_rank_dot(x: jax.Array, a: jax.Array, b: jax.Array,
                 dims: spec_lib.DotDims, scale: float,
                 out_dtype: Any) -> jax.Array:
  """``s·(x·a)·b`` laid out like ``dot_general(x, W)`` would lay it out.

  ``x`` is viewed as a matrix [M, K] (its contracting axes last, in ``a``'s
  order; a reshape, free for a Dense layer) and the two small products run
  on matrices, with a backward pass that never transposes a big operand.
  The product has a custom VJP: reverse mode (and forward-over-reverse, e.g.
  ``jax.hessian``) works; plain ``jax.jvp`` through it raises ``TypeError``.

  Args:
    x: the other operand of the original ``dot_general``.
    a: [*contract_shape, r], axes in the kernel's contracting-axis order.
    b: [r, *free_shape].
    dims: the original call's contraction.
    scale: s.
    out_dtype: dtype of the original result.
  Returns:
    The delta, shaped like the original result.
  """
  order = sorted(dims.w_contract)
  # x's contracting axes, in the order of a's axes.
  x_contract = [0] * len(order)
  for xc, wc in zip(dims.x_contract, dims.w_contract):
    x_contract[order.index(wc)] = xc
  x_free = [i for i in range(x.ndim) if i not in x_contract]
  perm = tuple(x_free + x_contract)
  free_shape = tuple(x.shape[i] for i in x_free)
  x2 = x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)
  x2 = x2.reshape(_prod(free_shape), -1)
  a2 = a.astype(x.dtype).reshape(-1, a.shape[-1])
  b2 = b.reshape(b.shape[0], -1)
  delta = _low_rank_2d(x2, a2, b2, float(scale), dims.precision,
                       dims.preferred_element_type)
  delta = delta.reshape(free_shape + tuple(b.shape[1:]))
  if dims.kernel_is_lhs:
    n_free = b.ndim - 1
    n_x = delta.ndim - n_free
    delta = jnp.transpose(delta, tuple(range(n_x, delta.ndim))
                          + tuple(range(n_x)))
  return delta.astype(out_dtype)


def base_dot(x: jax.Array, w: jax.Array, dims: spec_lib.DotDims) -> jax.Array:
  """The original ``dot_general`` of ``x`` and the (per-call) kernel ``w``."""
  if dims.kernel_is_lhs:
    dn = ((tuple(dims.w_contract), tuple(dims.x_contract)), ((), ()))
    return lax.dot_general(w, x, dn, precision=dims.precision,
                           preferred_element_type=dims.preferred_element_type)
  dn = ((tuple(dims.x_contract), tuple(dims.w_contract)), ((), ()))
  return lax.dot_general(x, w, dn, precision=dims.precision,
                         preferred_element_type=dims.preferred_element_type)


def kernel_dot(x: jax.Array, kernel: Any, dims: spec_lib.DotDims
               ) -> jax.Array:
  """``base_dot`` for a stored kernel: an array, or a FrozenKernel's own dot
  (which may avoid keeping a dense copy, e.g. a quantized kernel)."""
  if isinstance(kernel, spec_lib.FrozenKernel):
    return kernel.dot(x, dims)
  return base_dot(x, kernel.astype(dims.kernel_dtype), dims)


INITS = ('kaiming', 'gaussian', 'pissa')


def kernel_matrix(w: jax.Array, layout: spec_lib.KernelLayout) -> jax.Array:
  """A (stacked) kernel as float32 matrices ``[*stack, in, out]``: the
  contracted axes flattened into ``in``, the free ones into ``out``."""
  s = layout.stack
  perm = (tuple(range(s)) + tuple(s + i for i in layout.contract)
          + tuple(s + i for i in layout.free))
  stack, cshape, fshape = layout.split_shape(w.shape)
  return jnp.transpose(w.astype(jnp.float32), perm).reshape(
      *stack, _prod(cshape), _prod(fshape))


def principal_factors(kernel: Any, layout: spec_lib.KernelLayout, rank: int,
                      scale: float) -> dict[str, jax.Array]:
  """PiSSA's factors: ``s·a·b`` is the best rank-``rank`` approximation of
  the kernel (its top singular triplets, ``√S`` split between ``a`` and
  ``b``), in float32, shaped as ``Lora.param_shapes``.

  Raises:
    ValueError: for a quantized kernel (the residual would have to be
      re-quantized, and PiSSA's point is to keep it exact).
  """
  if isinstance(kernel, spec_lib.FrozenKernel):
    raise ValueError("Lora(init='pissa') needs a float kernel, not a "
                     f'quantized {type(kernel).__name__}')
  stack, cshape, fshape = layout.split_shape(kernel.shape)
  u, sv, vt = jnp.linalg.svd(kernel_matrix(kernel, layout),
                             full_matrices=False)
  root = jnp.sqrt(sv[..., :rank] / scale)                      # [*s, r]
  a = u[..., :, :rank] * root[..., None, :]
  b = vt[..., :rank, :] * root[..., :, None]
  return {'a': a.reshape(*stack, *cshape, rank),
          'b': b.reshape(*stack, rank, *fshape)}


def delta_weight(a: jax.Array, b: jax.Array, layout: spec_lib.KernelLayout,
                 scale: float) -> jax.Array:
  """``s·a·b`` as a float32 tensor laid out like the (stacked) kernel."""
  s = layout.stack
  nc, nf = len(layout.contract), len(layout.free)
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  # [*stack, *c, r] x [*stack, r, *f] -> [*stack, *c, *f]
  d = lax.dot_general(a32, b32, (((a.ndim - 1,), (s,)),
                                 (tuple(range(s)), tuple(range(s)))))
  # Put contract and free axes back where the kernel has them.
  ndim = s + nc + nf
  src = {ax: s + i for i, ax in enumerate(layout.contract)}
  src.update({ax: s + nc + i for i, ax in enumerate(layout.free)})
  perm = tuple(range(s)) + tuple(src[i] for i in range(nc + nf))
  assert len(perm) == ndim
  return jnp.transpose(d, perm) * scale


def layout_from_factors(kernel_shape: Sequence[int], a_shape: Sequence[int],
                        b_shape: Sequence[int]) -> spec_lib.KernelLayout:
  """The layout of a kernel from the shapes of ``a`` [*s, *c, r], ``b`` [*s, r, *f].

  The contracting axes are found by position: the unique way to interleave the
  ``c`` and ``f`` shapes (each in order) into the kernel's shape, preferring
  the Flax layout (contracting axes first) when several fit.

  Raises:
    ValueError: if the factors do not fit the kernel.
  """
  kernel_shape, a_shape, b_shape = (tuple(kernel_shape), tuple(a_shape),
                                    tuple(b_shape))
  s = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
  nc = len(a_shape) - 1 - s
  ok = (s >= 0 and nc >= 1 and a_shape[:s] == b_shape[:s] == kernel_shape[:s]
        and a_shape[-1] == b_shape[s])
  if ok:
    cshape, fshape = a_shape[s:-1], b_shape[s + 1:]
    call = kernel_shape[s:]
    for contract in itertools.combinations(range(len(call)), nc):
      free = tuple(i for i in range(len(call)) if i not in contract)
      if (tuple(call[i] for i in contract) == cshape
          and tuple(call[i] for i in free) == fshape):
        return spec_lib.KernelLayout(s, tuple(contract), free)
  raise ValueError(f'adapter factors a {a_shape} and b {b_shape} do not fit a '
                   f'kernel of shape {kernel_shape}')


@dataclasses.dataclass(frozen=True)
class Lora(spec_lib.Adapter):
  """Low-rank adaptation: ``y = x·W + s·(x·a)·b``.

  Attributes:
    rank: r, the inner dimension of the update.
    alpha: scaling numerator; defaults to ``rank`` (s = 1).
    use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    dropout: dropout rate on the adapter input (applied when the adapted
      function is given an rng).
    init: ``'kaiming'`` (uniform, PEFT's default) or ``'gaussian'``
      (normal with std 1/r) for ``a``, with ``b`` at zero; or ``'pissa'``
      (Meng et al., 2024): ``a``, ``b`` start at the kernel's top-r singular
      directions, ``s·a·b = U_r·S_r·V_rᵀ``, and the frozen base must become
      the residual ``W - s·a·b`` (``lorajax.pissa.residual_base``) so that
      the adapted function still equals the base at initialization.
  """
  rank: int = 8
  alpha: float | None = None
  use_rslora: bool = False
  dropout: float = 0.0
  init: str = 'kaiming'

  def __post_init__(self):
    if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f'Lora rank must be a positive integer, got '
                       f'{self.rank!r}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'Lora dropout must be in [0, 1), got {self.dropout}')
    if self.init not in INITS:
      raise ValueError(f'Lora init must be one of {INITS}, got '
                       f'{self.init!r}')

  @property
  def scale(self) -> float:
    alpha = self.rank if self.alpha is None else self.alpha
    if self.use_rslora:
      return float(alpha) / math.sqrt(self.rank)
    return float(alpha) / self.rank

  def validate(self, path, kernel_shape, layout):
    _, cshape, fshape = layout.split_shape(kernel_shape)
    limit = min(_prod(cshape), _prod(fshape))
    if self.rank > limit:
      raise ValueError(
          f'{path}: rank {self.rank} is larger than min(in, out) = {limit} '
          f'for a kernel of shape {tuple(kernel_shape)}')

  def param_shapes(self, kernel_shape, layout):
    stack, cshape, fshape = layout.split_shape(kernel_shape)
    return {'a': (*stack, *cshape, self.rank), 'b': (*stack, self.rank, *fshape)}

  def infer_layout(self, kernel_shape, params):
    return layout_from_factors(kernel_shape, np.shape(params['a']),
                               np.shape(params['b']))

  def init_params(self, key, kernel, layout):
    if self.init == 'pissa':
      return principal_factors(kernel, layout, self.rank, self.scale)
    shape = self.kernel_aval(kernel).shape
    stack, cshape, fshape = layout.split_shape(shape)
    fan_in = _prod(cshape)
    a_shape = (*stack, *cshape, self.rank)
    if self.init == 'kaiming':
      # Kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in).
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    else:
      a = jax.random.normal(key, a_shape, jnp.float32) / self.rank
    b = jnp.zeros((*stack, self.rank, *fshape), jnp.float32)
    return {'a': a, 'b': b}

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del context
    y = kernel_dot(x, kernel, dims)
    xin = dropout(x, self.dropout, rng)
    return y + low_rank_dot(xin, params['a'], params['b'], dims, self.scale,
                            y.dtype)

  def merge(self, kernel, params, layout):
    w = kernel_value(kernel)
    delta = delta_weight(params['a'], params['b'], layout, self.scale)
    return (w.astype(jnp.float32) + delta).astype(w.dtype)

  def unmerge(self, kernel, params, layout):
    delta = delta_weight(params['a'], params['b'], layout, self.scale)
    return (kernel.astype(jnp.float32) - delta).astype(kernel.dtype)
