"""A targeted kernel as it flows through a jaxpr, and what consumes it.

``lorajax.rewrite`` evaluates a traced function with each targeted kernel
replaced by a :class:`KernelRef`: the stored kernel, its adapter parameters
and its provider, with the dtype and axis order the function sees. This
module holds that value and the two primitives that may consume it:
:func:`dot`, where the provider computes the product (``x·W + s·(x·a)·b``
for LoRA), and :func:`gather`, a row lookup of a tied embedding. Every other
consumer is refused by ``lorajax.interpret`` with a :class:`RewriteError`
naming the parameter path and the primitive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import kernels
from lorajax import spec as spec_lib


class RewriteError(ValueError):
  """A targeted kernel is used in a way the rewrite cannot adapt."""


@dataclasses.dataclass
class KernelRef:
  """A targeted kernel as it flows through the jaxpr.

  Attributes:
    path: parameter path, for messages.
    provider: the adapter provider, or None while discovering layouts.
    kernel: the stored kernel (array or FrozenKernel), sliced like the view.
    params: the adapter's parameters, sliced like the view.
    dtype: dtype the function sees (after casts).
    shape: shape of the per-call kernel as stored (after scan slicing).
    stack: how many leading axes scan has sliced off.
    perm: the view the function sees, after transposes: view axis ``i`` is
      stored axis ``perm[i]``; None for the kernel as stored.
  """
  path: str
  provider: spec_lib.Adapter
  kernel: Any
  params: dict[str, Any]
  dtype: Any
  shape: tuple[int, ...]
  stack: int = 0
  perm: tuple[int, ...] | None = None

  @property
  def axes(self) -> tuple[int, ...]:
    return self.perm if self.perm is not None else tuple(range(len(self.shape)))

  @property
  def view_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.axes)

  def leaves(self):
    return jax.tree_util.tree_flatten((self.kernel, self.params))

  def rebuild(self, treedef, leaves, *, sliced: bool) -> 'KernelRef':
    kernel, params = jax.tree_util.tree_unflatten(treedef, leaves)
    if not sliced:
      return dataclasses.replace(self, kernel=kernel, params=params)
    perm = self.perm
    if perm is not None:
      if perm[0] != 0:
        raise RewriteError(
            f'targeted kernel {self.path!r} is transposed before scan slices '
            f'it (view axes {perm}); scan must slice the stored leading axis')
      perm = tuple(p - 1 for p in perm[1:])
    return dataclasses.replace(self, kernel=kernel, params=params,
                               shape=self.shape[1:], stack=self.stack + 1,
                               perm=perm)


@dataclasses.dataclass
class Ctx:
  """Per-evaluation state: the dropout rng and, when discovering, layouts."""
  rng: jax.Array | None = None
  counter: int = 0
  found: dict[str, spec_lib.KernelLayout] | None = None
  context: Any = None
  # id()s of the parameter leaves fn was called with; None inside a loop
  # body, where remat is left to jax.checkpoint (see _remat).
  param_ids: frozenset[int] | None = None

  def next_key(self) -> jax.Array | None:
    if self.rng is None:
      return None
    self.counter += 1
    return jax.random.fold_in(self.rng, self.counter)

  def child(self, rng, context=None, *, loop: bool = False) -> 'Ctx':
    return Ctx(rng=rng, found=self.found, context=context,
                param_ids=None if loop else self.param_ids)


def pack(vals: list[Any]):
  """Splits values into plain ones and the array leaves of KernelRefs."""
  plain, ref_leaves, slots = [], [], []
  for v in vals:
    if isinstance(v, KernelRef):
      leaves, treedef = v.leaves()
      slots.append((v, treedef, len(leaves)))
      ref_leaves.append(leaves)
    else:
      slots.append(None)
      plain.append(v)
  return plain, ref_leaves, slots


def unpack(slots, plain, ref_leaves, *, sliced: bool) -> list[Any]:
  out, pi, ri = [], 0, 0
  for slot in slots:
    if slot is None:
      out.append(plain[pi])
      pi += 1
    else:
      ref, treedef, _ = slot
      out.append(ref.rebuild(treedef, list(ref_leaves[ri]), sliced=sliced))
      ri += 1
  return out


def refs_in(vals) -> list[KernelRef]:
  return [v for v in vals if isinstance(v, KernelRef)]


def no_ref_outputs(outs, prim: str):
  for v in outs:
    if isinstance(v, KernelRef):
      raise RewriteError(
          f'targeted kernel {v.path!r} is returned out of a {prim!r} region; '
          f'an adapted kernel may only be consumed by dot_general')
  return outs


def _call_layout(ref: KernelRef, w_contract: tuple[int, ...],
                 w_batch: tuple[int, ...]) -> tuple[spec_lib.KernelLayout,
                                                    tuple[int, ...]]:
  """The layout of one product (stored axes) and the kernel axes that the
  provider treats as batch axes although the product leaves them free."""
  ndim = len(ref.shape)
  contract = tuple(sorted(w_contract))
  declared = getattr(ref.provider, 'batch_axes', None)
  lead_free: tuple[int, ...] = ()
  if declared is not None:
    bad = [i for i in declared if not 0 <= i < ndim or i in contract]
    if bad:
      raise RewriteError(
          f'{ref.path!r}: batch_axes {declared} of the provider name kernel '
          f'axes {bad} that are not free axes of the per-call kernel of shape '
          f'{ref.shape} (contracted: {contract})')
    undeclared = [i for i in w_batch if i not in declared]
    if undeclared:
      raise RewriteError(
          f'{ref.path!r}: the function uses kernel axes {undeclared} as '
          f'dot_general batch axes, but the provider declares batch_axes='
          f'{declared}; each index of a batch axis needs its own adapter')
    lead_free = tuple(sorted(i for i in declared if i not in w_batch))
  batch = tuple(sorted(set(w_batch) | set(lead_free)))
  free = tuple(i for i in range(ndim) if i not in contract and i not in batch)
  if (declared is None and len(free) > 1
      and any(f < contract[0] for f in free)):
    raise RewriteError(
        f'targeted kernel {ref.path!r} of shape {ref.shape} is contracted over '
        f'axes {contract} with free axes {free} on both sides: an axis in '
        f'front may be ensemble members or experts (one adapter each) or '
        f'output units (one shared adapter). Say which in the rule: '
        f'Lora(..., batch_axes=({free[0]},)) for an adapter per index, '
        f'batch_axes=() for one shared adapter')
  if batch and not ref.provider.supports_batch:
    raise RewriteError(
        f'targeted kernel {ref.path!r} of shape {ref.shape} has batch axes '
        f'{batch} (one adapter per index), which '
        f'{type(ref.provider).__name__} does not implement; use Lora')
  return spec_lib.KernelLayout(ref.stack, contract, free, batch), lead_free


def _view_result(y: jax.Array, ref: KernelRef, dims: spec_lib.DotDims,
                 view_free: list[int]) -> jax.Array:
  """Reorders the kernel's free axes of a product computed on the stored
  kernel into the order the transposed view would give."""
  target = [ref.axes[v] for v in view_free]
  have = sorted(target)
  if target == have:
    return y
  nb = len(dims.w_batch)
  block = [nb + have.index(t) for t in target]
  if dims.kernel_is_lhs:
    order = list(range(nb)) + block + list(range(nb + len(have), y.ndim))
  else:
    start = y.ndim - len(have)
    order = list(range(start)) + [start - nb + b for b in block]
  return jnp.transpose(y, order)


def dot(eqn, invals, ctx: Ctx):
  lhs, rhs = invals
  if isinstance(lhs, KernelRef) and isinstance(rhs, KernelRef):
    raise RewriteError(f'targeted kernels {lhs.path!r} and {rhs.path!r} are '
                       f'multiplied with each other in dot_general')
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  kernel_is_lhs = isinstance(lhs, KernelRef)
  ref, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
  v_contract, x_contract = (lc, rc) if kernel_is_lhs else (rc, lc)
  v_batch, x_batch = (lb, rb) if kernel_is_lhs else (rb, lb)
  axes = ref.axes
  w_contract = tuple(axes[int(c)] for c in v_contract)
  w_batch = tuple(axes[int(c)] for c in v_batch)
  layout, lead_free = _call_layout(ref, w_contract, w_batch)
  out_dtype = eqn.outvars[0].aval.dtype
  dims = spec_lib.DotDims(
      x_contract=tuple(int(c) for c in x_contract), w_contract=w_contract,
      kernel_is_lhs=kernel_is_lhs, kernel_dtype=ref.dtype,
      precision=eqn.params.get('precision'),
      preferred_element_type=eqn.params.get('preferred_element_type'),
      x_batch=tuple(int(c) for c in x_batch), w_batch=w_batch,
      w_lead_free=lead_free)
  view_free = [v for v in range(len(axes))
               if v not in v_contract and v not in v_batch]
  if ctx.found is not None:  # discovering layouts: record, compute the base.
    seen = ctx.found.setdefault(ref.path, layout)
    if seen != layout:
      raise RewriteError(
          f'targeted kernel {ref.path!r} is used in two different ways '
          f'({seen.describe()} and {layout.describe()}: {seen} and {layout}); '
          f'one adapter cannot serve both')
    w = kernels.kernel_value(ref.kernel).astype(ref.dtype)
    y = kernels.base_dot(x, w, dims)
    return _view_result(y, ref, dims, view_free).astype(out_dtype)
  made_for = getattr(ref.params, 'layout', None)
  if made_for is not None and made_for != layout:
    raise RewriteError(
        f'adapter {ref.path!r} was made for the kernel used as '
        f'{made_for.describe()} ({made_for}), but this function uses it as '
        f'{layout.describe()} ({layout}); make the adapters with '
        f'lorajax.init(spec, params, key, fn=apply_fn, args=(example,)) so '
        f'the layout is read from this function')
  expected = ref.provider.param_shapes(ref.shape,
                                      dataclasses.replace(layout, stack=0))
  for name, shape in expected.items():
    got = tuple(np.shape(ref.params.get(name, ())))
    if name not in ref.params or got != tuple(shape):
      raise RewriteError(
          f'adapter {ref.path!r}: parameter {name!r} has shape {got} but the '
          f'function uses the kernel {ref.shape} as {layout.describe()} '
          f'({layout}), which needs {tuple(shape)}')
  y = ref.provider.dot(x, ref.kernel, ref.params, dims, rng=ctx.next_key(),
                       context=ctx.context)
  return _view_result(y, ref, dims, view_free).astype(out_dtype)


def gather(eqn, invals, ctx: Ctx):
  """A row lookup ``W[ids]`` of a targeted 2-D kernel (an input embedding
  tied to the output projection): ``W[ids] + ΔW[ids]``, with the rows of the
  update gathered from a low-rank factor, so lookup and product see the
  same adapted kernel and ``merge`` stays exact."""
  ref, idx = invals
  p = eqn.params
  dn = p['dimension_numbers']
  out_ndim = eqn.outvars[0].aval.ndim
  axis = dn.start_index_map[0] if len(dn.start_index_map) == 1 else None
  ok = (isinstance(ref, KernelRef) and not isinstance(idx, KernelRef)
        and len(ref.shape) == 2 and ref.perm in (None, (0, 1))
        and axis is not None and tuple(dn.collapsed_slice_dims) == (axis,)
        and not dn.operand_batching_dims
        and tuple(dn.offset_dims) == (out_ndim - 1,)
        and p['slice_sizes'][1 - axis] == ref.shape[1 - axis]
        and not isinstance(ref.kernel, spec_lib.FrozenKernel))
  if not ok:
    raise RewriteError(
        f'targeted kernel {getattr(ref, "path", "?")!r} is used by a gather '
        f'other than a row lookup W[ids] of a 2-D kernel; only such lookups '
        f'(an embedding tied to the output projection) are adapted')
  w = kernels.kernel_value(ref.kernel).astype(ref.dtype)
  base = eqn.primitive.bind(w, idx, **p)
  if ctx.found is not None:
    return base
  layout = getattr(ref.params, 'layout', None)
  gather_delta = getattr(ref.provider, 'gather_delta', None)
  if layout is None or gather_delta is None:
    raise RewriteError(
        f'targeted kernel {ref.path!r} is looked up by row (gather); that '
        f'needs a {type(ref.provider).__name__} with gather_delta (Lora) and '
        f'an adapter that carries its layout (made by lorajax.init with fn=)')

  def take(table):  # [n, r], rows along the kernel's looked-up axis
    table = table if axis == 0 else table.T
    sizes = (1, table.shape[1]) if axis == 0 else (table.shape[0], 1)
    return eqn.primitive.bind(table.astype(ref.dtype), idx,
                              **{**p, 'slice_sizes': sizes})

  delta = gather_delta(ref.params, layout, axis, take)
  return base + delta.astype(base.dtype)
