"""``lora(fn, spec)``: evaluate ``fn``'s jaxpr with adapted kernels.

``fn(params, *args)`` is traced once per input signature with
``jax.make_jaxpr``. The jaxpr is then evaluated again, equation by equation,
with each targeted kernel replaced by a ``KernelRef`` that carries the stored
kernel, its adapter parameters and its provider. A ``KernelRef`` flows through
dtype casts and into ``jit``-ed helpers, ``scan`` (stacked kernels are sliced
together with their stacked adapters), ``remat``, ``cond`` and custom
derivative calls; at every ``dot_general`` that consumes it, the provider
computes the product (``x·W + s·(x·a)·b`` for LoRA). Any other use of a
targeted kernel raises an error that names the parameter path and the
primitive: the kernel is never silently materialized with the update.

On the CPU the evaluation also computes two patterns of the traced
function another way, with the same values: a softmax attention
(``lorajax.runtime.attention_pattern``) by lorajax's fused kernel, and an
elementwise activation (``lorajax.runtime.elementwise_remat``) with a
derivative that keeps only its input. :func:`fuse_attention` does this for
a function without adapters.

Only public JAX API is used: ``jax.make_jaxpr`` and ``jax.extend.core``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import jax.extend.core as jex
import numpy as np

from lorajax import kernels
from lorajax import matmul
from lorajax import spec as spec_lib
from lorajax.runtime import attention_pattern
from lorajax.runtime import cpu_attention
from lorajax.runtime import dead_rows
from lorajax.runtime import elementwise_remat
from lorajax.runtime import recompute

PyTree = Any
_INLINE = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call',
           'custom_vjp_call', 'custom_vjp_call_jaxpr')
_IDENTITY = ('copy', 'copy_p', 'sharding_constraint')
_REMAT = ('remat', 'remat2', 'checkpoint')


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
class _Ctx:
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

  def child(self, rng, context=None, *, loop: bool = False) -> '_Ctx':
    return _Ctx(rng=rng, found=self.found, context=context,
                param_ids=None if loop else self.param_ids)


def _pack(vals: list[Any]):
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


def _unpack(slots, plain, ref_leaves, *, sliced: bool) -> list[Any]:
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


def _refs_in(vals) -> list[KernelRef]:
  return [v for v in vals if isinstance(v, KernelRef)]


def _no_ref_outputs(outs, prim: str):
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


def _dot(eqn, invals, ctx: _Ctx):
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


def _gather(eqn, invals, ctx: _Ctx):
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


def _scan(eqn, invals, ctx: _Ctx):
  p = eqn.params
  nc, nk = p['num_consts'], p['num_carry']
  consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
  if _refs_in(init):
    raise RewriteError(f'targeted kernel {_refs_in(init)[0].path!r} is a '
                       f'scan carry; only scanned (xs) or constant kernels '
                       f'are supported')
  xs_plain, xs_ref_leaves, xs_slots = _pack(xs)
  keys = None
  if ctx.rng is not None:
    keys = jax.random.split(ctx.next_key(), p['length'])
  body_jaxpr = p['jaxpr']

  def body(carry, x):
    plain, ref_leaves, key = x
    sub = ctx.child(key, ctx.context, loop=True)
    xs_vals = _unpack(xs_slots, plain, ref_leaves, sliced=True)
    outs = _eval(body_jaxpr.jaxpr, body_jaxpr.consts,
                 list(consts) + list(carry) + xs_vals, sub)
    _no_ref_outputs(outs, 'scan')
    return list(outs[:nk]), list(outs[nk:])

  carry, ys = lax.scan(body, list(init), (xs_plain, xs_ref_leaves, keys),
                       length=p['length'], reverse=p['reverse'],
                       unroll=p['unroll'])
  return list(carry) + list(ys)


def _remat(eqn, invals, ctx: _Ctx):
  p = eqn.params
  plain, ref_leaves, slots = _pack(invals)
  # A block without adapted kernels draws no dropout key (the keys of the
  # adapters after it stay those it had as a plain jax.checkpoint).
  key = ctx.next_key() if ref_leaves else None
  outer = plain

  def f(plain, ref_leaves, key, context):
    vals = _unpack(slots, plain, ref_leaves, sliced=False)
    sub = ctx.child(key, context)
    if sub.param_ids is not None:   # fn's parameters, as traced in here
      sub.param_ids = frozenset(id(x) for x, y in zip(plain, outer)
                                if id(y) in ctx.param_ids)
    return _no_ref_outputs(_eval(p['jaxpr'], [], vals, sub), 'checkpoint')

  args = (plain, ref_leaves, key, ctx.context)
  if p.get('policy') is None and ctx.param_ids is not None:
    # Whole-block remat outside a loop: recompute only once the block's
    # cotangent exists (XLA's CPU scheduler otherwise runs recomputations
    # early, all alive at once). Tied: the activations among the plain
    # inputs (traced, floating, not a parameter of fn).
    tie = [isinstance(x, jax.core.Tracer) and id(x) not in ctx.param_ids
           for x in jax.tree.leaves(plain)]
    tie += [False] * (len(jax.tree.leaves(args)) - len(tie))
    return recompute.after_cotangent(f, tie)(*args)
  return jax.checkpoint(f, prevent_cse=p.get('prevent_cse', True),
                        policy=p.get('policy'))(*args)


def _cond(eqn, invals, ctx: _Ctx):
  index, ops = invals[0], invals[1:]
  plain, ref_leaves, slots = _pack(ops)
  key = ctx.next_key()

  def branch(closed):
    def g(plain, ref_leaves, key):
      vals = _unpack(slots, plain, ref_leaves, sliced=False)
      return _no_ref_outputs(_eval(closed.jaxpr, closed.consts, vals,
                                   ctx.child(key, ctx.context)), 'cond')
    return g

  return lax.switch(index, [branch(b) for b in eqn.params['branches']],
                    plain, ref_leaves, key)


def _inline(eqn, invals, ctx: _Ctx):
  p = eqn.params
  closed = p.get('jaxpr', p.get('call_jaxpr', p.get('fun_jaxpr')))
  if isinstance(closed, jex.ClosedJaxpr):
    return _eval(closed.jaxpr, closed.consts, invals, ctx)
  return _eval(closed, [], invals, ctx)


def _with_refs(eqn, invals, ctx: _Ctx):
  name = eqn.primitive.name
  refs = _refs_in(invals)
  if name == 'convert_element_type':
    return [dataclasses.replace(refs[0], dtype=eqn.params['new_dtype'])]
  if name in _IDENTITY and len(invals) == 1:
    return [refs[0]]
  if name == 'transpose':
    ref = refs[0]
    axes = ref.axes
    return [dataclasses.replace(
        ref, perm=tuple(axes[i] for i in eqn.params['permutation']))]
  if name == 'dot_general':
    return [_dot(eqn, invals, ctx)]
  if name == 'scan':
    return _scan(eqn, invals, ctx)
  if name == 'gather':
    return [_gather(eqn, invals, ctx)]
  if name in _REMAT:
    return _remat(eqn, invals, ctx)
  if name == 'cond':
    return _cond(eqn, invals, ctx)
  if name in _INLINE:
    return _inline(eqn, invals, ctx)
  raise RewriteError(
      f'targeted kernel {refs[0].path!r} (shape {refs[0].view_shape}) is used '
      f'by primitive {name!r}, which the LoRA rewrite does not support; only '
      f'dot_general (through casts, transposes, jit, scan, remat, cond and '
      f'custom derivative calls) can consume an adapted kernel. Exclude this '
      f'parameter from the adapter rule.')


def _eval(jaxpr, consts, args, ctx: _Ctx) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  fuse = _fusion_plan(jaxpr)
  for i, eqn in enumerate(jaxpr.eqns):
    if fuse is not None and i in fuse.deferred:
      continue   # part of a chain or region, computed at its end
    match = fuse.finals.get(i) if fuse is not None else None
    if match is not None:
      try:
        outs = match.compute(read)
      except attention_pattern.NoFuse:
        for j in match.tops:
          _step(jaxpr.eqns[j], read, env, ctx, inline=False)
      else:
        env.update(zip(eqn.outvars, outs))
      continue
    _step(eqn, read, env, ctx,
          inline=fuse is not None and i in fuse.calls)
  return [read(v) for v in jaxpr.outvars]


def _fusion_plan(jaxpr) -> attention_pattern.Plan | None:
  """Where ``jaxpr``'s top-level equations are computed another way: the
  softmax attention chains that the fused CPU kernel can compute
  (``lorajax.runtime.attention_pattern``; not on another backend, with
  ``LORAJAX_CPU_ATTENTION=xla`` or without a compiler), and the activations
  that keep only their input for the backward pass
  (``lorajax.runtime.elementwise_remat``). None if nothing."""
  found = attention_pattern.plan(jaxpr)
  if found and not cpu_attention.available():
    found = attention_pattern.Plan({}, set(), set())
  if elementwise_remat.enabled():
    taken = found.deferred | set(found.finals)
    for region in elementwise_remat.plan(jaxpr, taken):
      found.finals[region.eqns[-1]] = region
      found.deferred |= set(region.eqns[:-1])
  return found or None


def _enter(eqn, invals, ctx: _Ctx):
  name = eqn.primitive.name
  if name == 'scan':
    return _scan(eqn, invals, ctx)
  if name in _REMAT:
    return _remat(eqn, invals, ctx)
  if name == 'cond':
    return _cond(eqn, invals, ctx)
  return _inline(eqn, invals, ctx)


def _faster_on_cpu(eqn, invals) -> bool:
  """Whether ``matmul.product`` writes this ``dot_general`` another way (a
  product with an output sharding of its own is left as written)."""
  if eqn.params.get('out_sharding') is not None:
    return False
  dn, pref = (eqn.params['dimension_numbers'],
              eqn.params.get('preferred_element_type'))
  return bool(matmul.wanted(*invals, dn, pref)
              or matmul.wide_blocks(*invals, dn, pref))


def _step(eqn, read, env, ctx: _Ctx, *, inline: bool) -> None:
  invals = [read(v) for v in eqn.invars]
  manager = getattr(getattr(eqn, 'ctx', None), 'manager', None)
  with manager if manager is not None else contextlib.nullcontext():
    if any(isinstance(v, KernelRef) for v in invals):
      outs = _with_refs(eqn, invals, ctx)
    elif inline:   # holds an attention chain inside
      outs = _enter(eqn, invals, ctx)
    elif (eqn.primitive.name in _REMAT and ctx.param_ids is not None
          and eqn.params.get('policy') is None):
      outs = _remat(eqn, invals, ctx)   # a block without adapted kernels
    elif eqn.primitive.name == 'dot_general' and _faster_on_cpu(eqn, invals):
      # A bfloat16 product (in the float32-accumulated form that the CPU's
      # bfloat16 units run) or a wide float32 one (in blocks of columns):
      # lorajax.matmul.
      outs = [matmul.product(*invals, eqn.params['dimension_numbers'],
                             eqn.params.get('precision'),
                             eqn.params.get('preferred_element_type'))]
    else:
      outs = eqn.primitive.bind(
          *invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
  for v, x in zip(eqn.outvars, outs):
    env[v] = x


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _aval(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


class _Traced:
  """``fn`` traced once per input signature."""

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn
    self.cache: dict[Any, Any] = {}

  def __call__(self, ptree, param_avals, args, kwargs):
    leaves, atree = jax.tree_util.tree_flatten((args, kwargs))
    dyn = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
    statics = tuple((i, x) for i, x in enumerate(leaves) if i not in dyn)
    dyn_vals = [leaves[i] for i in dyn]
    dyn_avals = [_aval(x) for x in dyn_vals]
    try:
      key = (ptree, tuple(param_avals), atree, statics, tuple(dyn_avals))
      hash(key)
    except TypeError:
      key = None
    if key is not None and key in self.cache:
      closed, out_tree = self.cache[key]
      return closed, out_tree, dyn_vals
    fn = self.fn

    def flat_fn(pleaves, dleaves):
      full = list(leaves)
      for i, x in zip(dyn, dleaves):
        full[i] = x
      a, kw = jax.tree_util.tree_unflatten(atree, full)
      return fn(jax.tree_util.tree_unflatten(ptree, pleaves), *a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
        list(param_avals), dyn_avals)
    # Rows the function slices away (a [CLS] readout) are not computed.
    closed = dead_rows.prune(closed, len(param_avals)) or closed
    out_tree = jax.tree_util.tree_structure(out_shape)
    if key is not None:
      if len(self.cache) > 64:
        self.cache.clear()
      self.cache[key] = (closed, out_tree)
    return closed, out_tree, dyn_vals


def _run(traced: _Traced, spec: spec_lib.LoraSpec, params, adapters, args,
         kwargs, ctx: _Ctx):
  resolution = spec_lib.resolve(spec, params)
  flat, ptree = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=spec_lib.is_kernel_node)
  adapted = resolution.adapted
  if adapters is not None:
    check_adapter_paths(adapters, adapted)
  param_avals, invals = [], []
  for keypath, leaf in flat:
    path = spec_lib.path_str(keypath)
    provider = adapted.get(path)
    if provider is None:
      if isinstance(leaf, spec_lib.FrozenKernel):
        raise ValueError(f'{path!r} holds a {type(leaf).__name__} but no '
                         f'adapter rule targets it')
      param_avals.append(_aval(leaf))
      invals.append(leaf)
      continue
    aval = provider.kernel_aval(leaf)
    param_avals.append(aval)
    ad = ({} if adapters is None or not provider.has_params
          else spec_lib.get_by_path(adapters, path))
    invals.append(KernelRef(path, provider, leaf, ad, aval.dtype,
                            tuple(aval.shape)))
  closed, out_tree, dyn_vals = traced(ptree, param_avals, args, kwargs)
  ctx.param_ids = frozenset(id(v) for v in invals
                            if not isinstance(v, KernelRef))
  outs = _eval(closed.jaxpr, closed.consts, invals + dyn_vals, ctx)
  _no_ref_outputs(outs, 'the function')
  return jax.tree_util.tree_unflatten(out_tree, outs)


def check_adapter_paths(adapters: PyTree, adapted: dict[str, Any]) -> None:
  """Raises ValueError unless ``adapters`` holds exactly the adapted paths."""
  have = set()
  for path, _ in spec_lib.flatten_paths(adapters):
    have.add(path.rsplit('/', 1)[0])
  want = {p for p, provider in adapted.items() if provider.has_params}
  missing, extra = sorted(want - have), sorted(have - set(adapted))
  if missing or extra:
    raise ValueError(
        'adapters do not fit this spec and params: '
        + (f'missing adapters for {missing[:8]} ' if missing else '')
        + (f'unexpected adapters for {extra[:8]} ' if extra else '')
        + '(create them with lorajax.init(spec, params, key))')


def lora(fn: Callable[..., Any], spec: spec_lib.LoraSpec
         ) -> Callable[..., Any]:
  """Adds adapters to ``fn(params, *args, **kwargs)``.

  Args:
    fn: a function whose first argument is the parameter pytree, e.g. a Flax
      ``model.apply`` (then ``params`` is the variables dict).
    spec: the rules that pick the kernels to adapt.

  Returns:
    ``g(params, adapters, *args, lora_rng=None, **kwargs)``, equal to
    ``fn(merge(params, adapters, spec), *args, **kwargs)`` but computed with
    the low-rank path, so frozen kernels get no gradient. ``lora_rng``
    enables adapter dropout. ``lora_context`` is any pytree handed unchanged
    to every provider's ``dot`` (e.g. per-example adapter indices); it is
    never sliced by ``scan``.

  Example:

    >>> import jax, jax.numpy as jnp, lorajax
    >>> params = {'w': jnp.ones((3, 2))}
    >>> spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=1))])
    >>> adapters = lorajax.init(spec, params, jax.random.key(0))
    >>> adapters = jax.tree.map(jnp.ones_like, adapters)   # b starts at 0
    >>> g = lora(lambda p, x: x @ p['w'], spec)
    >>> g(params, adapters, jnp.ones((1, 3)))              # 3 + 3·1·1
    Array([[6., 6.]], dtype=float32)
  """
  traced = _Traced(fn)

  def adapted(params, adapters, *args, lora_rng=None, lora_context=None,
              **kwargs):
    return _run(traced, spec, params, adapters, args, kwargs,
                _Ctx(rng=lora_rng, context=lora_context))

  adapted.__name__ = f'lora_{getattr(fn, "__name__", "fn")}'
  adapted.__doc__ = fn.__doc__
  return adapted


def fuse_attention(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with its softmax attention computed by the fused CPU kernel.

  What :func:`lora` does for the function it adapts, for a function without
  adapters (a full fine-tuning step, an evaluation): ``fn``'s jaxpr is
  evaluated with every attention chain that
  ``lorajax.runtime.attention_pattern`` recognises (``einsum``, an optional
  scale and ``jnp.where`` mask, ``jax.nn.softmax``, ``einsum``) computed by
  ``lorajax.runtime.cpu_attention``, and every activation region of
  ``lorajax.runtime.elementwise_remat`` (GELU, SiLU, ...) keeping only its
  input for the backward pass. Other equations run as traced; on another
  backend nothing changes (``LORAJAX_CPU_ATTENTION=xla`` and
  ``LORAJAX_ELEMENTWISE_REMAT=off`` turn each off on the CPU). The values
  are ``fn``'s to float rounding.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> def attend(q, k, v):
    ...   s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    ...   return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v)
    >>> x = jnp.ones((1, 4, 2, 8))
    >>> fuse_attention(attend)(x, x, x).shape
    (1, 4, 2, 8)
  """
  traced = _Traced(lambda _, *a, **kw: fn(*a, **kw))
  empty = jax.tree_util.tree_structure(())

  def fused(*args, **kwargs):
    closed, out_tree, dyn_vals = traced(empty, [], args, kwargs)
    outs = _eval(closed.jaxpr, closed.consts, dyn_vals, _Ctx())
    return jax.tree_util.tree_unflatten(out_tree, outs)

  fused.__name__ = f'fused_{getattr(fn, "__name__", "fn")}'
  fused.__doc__ = fn.__doc__
  return fused


def discover_layouts(fn: Callable[..., Any], spec: spec_lib.LoraSpec,
                     params: PyTree, *args, **kwargs
                     ) -> dict[str, spec_lib.KernelLayout]:
  """How ``fn`` contracts every targeted kernel (traced abstractly).

  Raises:
    RewriteError: a targeted kernel is used other than by dot_general.
  """
  found: dict[str, spec_lib.KernelLayout] = {}
  traced = _Traced(fn)
  leaves, atree = jax.tree_util.tree_flatten((args, kwargs))
  dyn = [i for i, x in enumerate(leaves) if _is_dynamic(x)]

  def run(p, dleaves):
    full = list(leaves)
    for i, x in zip(dyn, dleaves):
      full[i] = x
    a, kw = jax.tree_util.tree_unflatten(atree, full)
    return _run(traced, spec, p, None, a, kw, _Ctx(found=found))

  jax.eval_shape(run, params, [leaves[i] for i in dyn])
  return found
