"""Per-example adapters in one batch: ``MultiLora`` holds N stacked adapters.

For inference with many adapters over one base, every example of a batch
names the adapter it runs with. ``MultiLora`` owns the N adapters' factors
(scales folded into ``b``; smaller ranks zero-padded) and reads an index
array ``[B]`` from the rewrite's ``lora_context``:
example ``i`` gets ``x_i·W + (x_i·a[k_i])·b[k_i]``, and an index outside
``[0, N)`` (``-1`` by convention) gets the base ``x_i·W``. The indices are data,
so one compiled function serves any mix.

Two ways to store and compute the low-rank path:

- ``'gather'``: ``a`` ``[N, in, r]``, ``b`` ``[N, r, out]``; gather ``a[k]``,
  ``b[k]`` per example, then batched products: ``2·(in + out)·r`` FLOPs per
  token.
- ``'dense'``: the N adapters concatenated along the rank, ``a``
  ``[in, N·r]``, ``b`` ``[N·r, out]``; one product, a per-example mask over
  the rank, one product back: N times the FLOPs of ``'gather'`` in two plain
  matrix products, faster on CPU for small N·r.

``stack_adapters(..., mode='auto')`` (the default) picks ``'dense'`` for a
kernel while its low-rank FLOPs ``2·(in + out)·N·r`` stay below the kernel's
own ``in·out``, else ``'gather'``.

The batch axis is the input's leading axis (as in Flax ``Dense`` on
``[B, ..., in]``).

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'w': jnp.zeros((2, 2))}
  >>> spec1 = lorajax.LoraSpec([('w', lorajax.Lora(rank=1))])
  >>> ad = lorajax.init(spec1, params, jax.random.key(0))
  >>> ad1 = jax.tree.map(jnp.ones_like, ad)              # x·(1·1ᵀ)
  >>> ad2 = {'w': ad1['w'].replace(b=-ad1['w']['b'])}  # x·(1·(-1)ᵀ)
  >>> spec, stacked = stack_adapters([(ad1, spec1), (ad2, spec1)], params)
  >>> fn = lorajax.lora(lambda p, x: x @ p['w'], spec)
  >>> fn(params, stacked, jnp.ones((3, 2)), lora_context=jnp.array([0, 1, -1]))
  Array([[ 2.,  2.],
         [-2., -2.],
         [ 0.,  0.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from lorajax import spec as spec_lib
from lorajax import spec_paths
from lorajax import kernels
from lorajax.methods import low_rank

PyTree = Any
CONTEXT_KEY = 'adapter_index'
MODES = ('gather', 'dense')
STACK_MODES = ('auto',) + MODES


def _indices(context: Any) -> jax.Array:
  if isinstance(context, Mapping):
    context = context.get(CONTEXT_KEY)
  if context is None:
    raise ValueError(
        'MultiLora needs the per-example adapter indices: call the adapted '
        f'function with lora_context=indices ([batch] int, -1 = base) or '
        f'lora_context={{{CONTEXT_KEY!r}: indices}}')
  return jnp.asarray(context)


@dataclasses.dataclass(frozen=True)
class MultiLora(spec_lib.Adapter):
  """N LoRA adapters of one kernel; each example picks one (or the base).

  Attributes:
    num_adapters: N.
    rank: r, the (padded) rank shared by the N adapters.
    mode: ``'gather'`` or ``'dense'``: the layout of the factors and how
      they are applied (see the module docstring).
  """
  num_adapters: int
  rank: int
  mode: str = 'gather'

  def __post_init__(self):
    if self.num_adapters < 1 or self.rank < 1:
      raise ValueError(f'MultiLora needs num_adapters >= 1 and rank >= 1, got '
                       f'{self.num_adapters}, {self.rank}')
    if self.mode not in MODES:
      raise ValueError(f'MultiLora mode={self.mode!r}; expected one of {MODES}')

  def param_shapes(self, kernel_shape, layout):
    stack, cshape, fshape = layout.split_shape(kernel_shape)
    n, r = self.num_adapters, self.rank
    if self.mode == 'dense':
      return {'a': (*stack, *cshape, n * r), 'b': (*stack, n * r, *fshape)}
    return {'a': (*stack, n, *cshape, r), 'b': (*stack, n, r, *fshape)}

  def init_params(self, key, kernel, layout):
    shapes = self.param_shapes(self.kernel_aval(kernel).shape, layout)
    return {k: jnp.zeros(v, jnp.float32) for k, v in shapes.items()}

  def merge(self, kernel, params, layout):
    raise ValueError('MultiLora holds several adapters: merge one of them '
                     '(lorajax.methods.multi.select(stacked, i)) instead')

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del rng
    y = kernels.kernel_dot(x, kernel, dims)
    if dims.kernel_is_lhs or 0 in dims.x_contract:
      raise ValueError(
          'MultiLora needs the input batch on axis 0 of the non-kernel '
          f'operand; this dot_general contracts x axes {dims.x_contract} '
          f'with the kernel on the {"left" if dims.kernel_is_lhs else "right"}')
    idx = _indices(context).astype(jnp.int32)
    if idx.shape != (x.shape[0],):
      raise ValueError(f'adapter indices have shape {idx.shape}; the batch '
                       f'here is {x.shape[0]} (one index per example)')
    a, b = params['a'].astype(x.dtype), params['b'].astype(x.dtype)
    n, r = self.num_adapters, self.rank
    order = sorted(dims.w_contract)
    a_axes = tuple(order.index(c) for c in dims.w_contract)
    if self.mode == 'gather':
      valid = (idx >= 0) & (idx < n)
      safe = jnp.where(valid, idx, 0)
      a_sel = jnp.take(a, safe, axis=0)     # [B, *c, r]
      b_sel = jnp.take(b, safe, axis=0)     # [B, r, *f]
      xa = lax.dot_general(
          x, a_sel, ((dims.x_contract, tuple(1 + i for i in a_axes)),
                     ((0,), (0,))),
          preferred_element_type=dims.preferred_element_type)
      xa = xa * valid.astype(xa.dtype).reshape((-1,) + (1,) * (xa.ndim - 1))
      delta = lax.dot_general(
          xa, b_sel.astype(xa.dtype), (((xa.ndim - 1,), (1,)), ((0,), (0,))),
          preferred_element_type=dims.preferred_element_type)
    else:  # a [*c, N*r], b [N*r, *f]: slot k owns rank columns k*r..k*r+r-1.
      xa = lax.dot_general(x, a, ((dims.x_contract, a_axes), ((), ())),
                           preferred_element_type=dims.preferred_element_type)
      slot = jnp.arange(n * r, dtype=jnp.int32) // r
      mask = (idx[:, None] == slot[None, :]).astype(xa.dtype)   # [B, N*r]
      xa = xa * mask.reshape((x.shape[0],) + (1,) * (xa.ndim - 2) + (n * r,))
      delta = lax.dot_general(
          xa, b.astype(xa.dtype), (((xa.ndim - 1,), (0,)), ((), ())),
          preferred_element_type=dims.preferred_element_type)
    return y + delta.astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class Factors:
  """One kernel's LoRA update as plain factors: ``delta = a·b`` (scale in b).

  Attributes:
    a: ``[*stack, *contract, r]``.
    b: ``[*stack, r, *free]``, already multiplied by the adapter's scale.
    layout: the kernel's layout.
  """
  a: jax.Array
  b: jax.Array
  layout: spec_lib.KernelLayout


def lora_factors(adapters: PyTree, spec: spec_lib.LoraSpec, params: PyTree
                 ) -> dict[str, Factors]:
  """Every adapted kernel's factors with the scale folded into ``b``.

  Raises:
    ValueError: an adapter rule whose provider is not ``Lora``.
  """
  resolution = spec_lib.resolve(spec, params)
  out = {}
  for path, provider in resolution.adapted.items():
    if not isinstance(provider, low_rank.Lora):
      raise ValueError(f'{path}: {type(provider).__name__} adapters cannot be '
                       f'stacked or combined; only Lora')
    ad = spec_lib.get_by_path(adapters, path)
    layout = kernels.layout_of(ad, path)
    if layout.batch:
      raise ValueError(f'{path}: adapters of kernels with batch axes '
                       f'{layout.describe()} cannot be stacked yet')
    a = jnp.asarray(ad['a'], jnp.float32)
    b = jnp.asarray(ad['b'], jnp.float32) * provider.scale
    out[path] = Factors(a, b, layout)
  return out


def _pad_rank(f: Factors, rank: int) -> tuple[jax.Array, jax.Array]:
  r = f.a.shape[-1]
  s = f.layout.stack
  a = jnp.pad(f.a, [(0, 0)] * (f.a.ndim - 1) + [(0, rank - r)])
  b = jnp.pad(f.b, [(0, 0)] * s + [(0, rank - r)]
              + [(0, 0)] * (f.b.ndim - s - 1))
  return a, b


def stack_factors(entries: Sequence[dict[str, Factors]], params: PyTree, *,
                  mode: str = 'auto', dtype: Any = jnp.float32
                  ) -> tuple[spec_lib.LoraSpec, PyTree]:
  """Stacks per-adapter factors into one ``MultiLora`` spec and tree.

  Args:
    entries: one ``lora_factors`` result per adapter, in index order.
    params: the base the adapters belong to.
    mode: ``'gather'``, ``'dense'`` or ``'auto'`` (per kernel, see the
      module docstring).
    dtype: dtype of the stacked factors.

  Returns:
    ``(spec, stacked)``: kernels any adapter targets get ``MultiLora(N, R)``
    with R the largest rank there; an adapter that lacks a kernel has zeros
    in its slot (it runs the base there).
  """
  if not entries:
    raise ValueError('stack_factors needs at least one adapter')
  if mode not in STACK_MODES:
    raise ValueError(f'mode={mode!r}; expected one of {STACK_MODES}')
  paths = sorted({p for e in entries for p in e})
  stacked, actions = {}, {}
  for path in paths:
    present = [e[path] for e in entries if path in e]
    rank = max(f.a.shape[-1] for f in present)
    ref = present[0]
    s = ref.layout.stack
    za, zb = (jnp.zeros(ref.a.shape[:-1] + (rank,), jnp.float32),
              jnp.zeros(ref.b.shape[:s] + (rank,) + ref.b.shape[s + 1:],
                        jnp.float32))
    pairs = [_pad_rank(e[path], rank) if path in e else (za, zb)
             for e in entries]
    for f in present:
      if f.layout != ref.layout or f.a.shape[:-1] != ref.a.shape[:-1]:
        raise ValueError(f'{path}: adapters disagree on the kernel layout '
                         f'({f.layout} vs {ref.layout})')
    kernel_mode = mode
    if mode == 'auto':
      d_in = int(np.prod(ref.a.shape[s:-1]))
      d_out = int(np.prod(ref.b.shape[s + 1:]))
      dense_flops = 2 * (d_in + d_out) * len(entries) * rank
      kernel_mode = 'dense' if dense_flops <= d_in * d_out else 'gather'
    if kernel_mode == 'dense':
      a = jnp.concatenate([p[0] for p in pairs], axis=-1)
      b = jnp.concatenate([p[1] for p in pairs], axis=s)
    else:
      a = jnp.stack([p[0] for p in pairs], axis=s)
      b = jnp.stack([p[1] for p in pairs], axis=s)
    spec_lib.set_by_path(stacked, path, spec_lib.AdapterParams(
        {'a': a.astype(dtype), 'b': b.astype(dtype)}, layout=ref.layout))
    actions[path] = MultiLora(len(entries), rank, kernel_mode)
  universe = [p for p, _ in spec_lib.flatten_paths(params)]
  return spec_paths.spec_from_actions(actions, universe), stacked


def stack_adapters(entries: Sequence[tuple[PyTree, spec_lib.LoraSpec]],
                   params: PyTree, *, mode: str = 'auto'
                   ) -> tuple[spec_lib.LoraSpec, PyTree]:
  """``stack_factors`` of ``lora_factors(adapters, spec, params)`` per entry.

  Only adapters are stacked: leaves a spec trains outright (a classifier
  head) cannot differ per example and are an error.
  """
  factors = []
  for i, (adapters, spec) in enumerate(entries):
    trained = spec_lib.resolve(spec, params).trained
    if trained:
      raise ValueError(f'adapter {i} also trains {trained[:3]} outright; '
                       f'per-example batches can only mix adapters')
    factors.append(lora_factors(adapters, spec, params))
  return stack_factors(factors, params, mode=mode)


def select(stacked: PyTree, spec: spec_lib.LoraSpec, params: PyTree, index: int
           ) -> tuple[spec_lib.LoraSpec, PyTree]:
  """Adapter ``index`` of a stacked tree as plain ``Lora`` (scale 1)."""
  resolution = spec_lib.resolve(spec, params)
  leaves = dict(spec_lib.flatten_paths(params))
  out, actions = {}, {}
  for path, provider in resolution.adapted.items():
    ad = spec_lib.get_by_path(stacked, path)
    layout = kernels.layout_of(ad, path)
    s, r = layout.stack, provider.rank
    if provider.mode == 'dense':
      part = {'a': ad['a'][..., index * r:(index + 1) * r],
              'b': lax.slice_in_dim(ad['b'], index * r, (index + 1) * r,
                                    axis=s)}
    else:
      part = {k: jnp.take(v, index, axis=s) for k, v in ad.items()}
    spec_lib.set_by_path(out, path,
                         spec_lib.AdapterParams(part, layout=layout))
    actions[path] = low_rank.Lora(rank=provider.rank)
  universe = list(leaves)
  return spec_paths.spec_from_actions(actions, universe), out
