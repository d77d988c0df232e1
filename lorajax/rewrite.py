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

Only public JAX API is used: ``jax.make_jaxpr`` and ``jax.extend.core``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
from jax import lax
import jax.extend.core as jex
import numpy as np

from lorajax import spec as spec_lib

PyTree = Any
_INLINE = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call',
           'custom_vjp_call', 'custom_vjp_call_jaxpr')
_IDENTITY = ('copy', 'copy_p', 'sharding_constraint')


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
    shape: shape the function sees (after scan slicing).
    stack: how many leading axes scan has sliced off.
  """
  path: str
  provider: spec_lib.Adapter | None
  kernel: Any
  params: dict[str, Any]
  dtype: Any
  shape: tuple[int, ...]
  stack: int = 0

  def leaves(self):
    return jax.tree_util.tree_flatten((self.kernel, self.params))

  def rebuild(self, treedef, leaves, *, sliced: bool) -> 'KernelRef':
    kernel, params = jax.tree_util.tree_unflatten(treedef, leaves)
    if not sliced:
      return dataclasses.replace(self, kernel=kernel, params=params)
    return dataclasses.replace(self, kernel=kernel, params=params,
                               shape=self.shape[1:], stack=self.stack + 1)


@dataclasses.dataclass
class _Ctx:
  """Per-evaluation state: the dropout rng and, when discovering, layouts."""
  rng: jax.Array | None = None
  counter: int = 0
  found: dict[str, spec_lib.KernelLayout] | None = None
  context: Any = None

  def next_key(self) -> jax.Array | None:
    if self.rng is None:
      return None
    self.counter += 1
    return jax.random.fold_in(self.rng, self.counter)

  def child(self, rng, context=None) -> '_Ctx':
    return _Ctx(rng=rng, found=self.found, context=context)


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


def _dot(eqn, invals, ctx: _Ctx):
  lhs, rhs = invals
  if isinstance(lhs, KernelRef) and isinstance(rhs, KernelRef):
    raise RewriteError(f'targeted kernels {lhs.path!r} and {rhs.path!r} are '
                       f'multiplied with each other in dot_general')
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  kernel_is_lhs = isinstance(lhs, KernelRef)
  ref, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
  w_contract, x_contract = (lc, rc) if kernel_is_lhs else (rc, lc)
  if lb or rb:
    raise RewriteError(
        f'targeted kernel {ref.path!r} is used by a dot_general with batch '
        f'dimensions {tuple(lb)}/{tuple(rb)}; only contractions are adapted')
  contract = tuple(sorted(int(c) for c in w_contract))
  free = tuple(i for i in range(len(ref.shape)) if i not in contract)
  layout = spec_lib.KernelLayout(ref.stack, contract, free)
  out_dtype = eqn.outvars[0].aval.dtype
  dims = spec_lib.DotDims(
      x_contract=tuple(int(c) for c in x_contract),
      w_contract=tuple(int(c) for c in w_contract),
      kernel_is_lhs=kernel_is_lhs, kernel_dtype=ref.dtype,
      precision=eqn.params.get('precision'),
      preferred_element_type=eqn.params.get('preferred_element_type'))
  if ctx.found is not None:  # discovering layouts: record, compute the base.
    seen = ctx.found.setdefault(ref.path, layout)
    if seen != layout:
      raise RewriteError(
          f'targeted kernel {ref.path!r} is contracted in two different ways '
          f'({seen} and {layout}); one adapter cannot serve both')
    from lorajax.methods import lora as lora_lib  # pylint: disable=g-import-not-at-top
    w = lora_lib.kernel_value(ref.kernel).astype(ref.dtype)
    return lora_lib.base_dot(x, w, dims).astype(out_dtype)
  expected = ref.provider.param_shapes(ref.shape,
                                      dataclasses.replace(layout, stack=0))
  for name, shape in expected.items():
    got = tuple(np.shape(ref.params.get(name, ())))
    if name not in ref.params or got != tuple(shape):
      raise RewriteError(
          f'adapter {ref.path!r}: parameter {name!r} has shape {got} but the '
          f'function contracts the kernel {ref.shape} over axes {contract}, '
          f'which needs {tuple(shape)}')
  y = ref.provider.dot(x, ref.kernel, ref.params, dims, rng=ctx.next_key(),
                       context=ctx.context)
  return y.astype(out_dtype)


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
    sub = ctx.child(key, ctx.context)
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
  key = ctx.next_key()

  def f(plain, ref_leaves, key, context):
    vals = _unpack(slots, plain, ref_leaves, sliced=False)
    return _no_ref_outputs(_eval(p['jaxpr'], [], vals,
                                 ctx.child(key, context)), 'checkpoint')

  return jax.checkpoint(f, prevent_cse=p.get('prevent_cse', True),
                        policy=p.get('policy'))(plain, ref_leaves, key,
                                                ctx.context)


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
  if name == 'dot_general':
    return [_dot(eqn, invals, ctx)]
  if name == 'scan':
    return _scan(eqn, invals, ctx)
  if name in ('remat', 'remat2', 'checkpoint'):
    return _remat(eqn, invals, ctx)
  if name == 'cond':
    return _cond(eqn, invals, ctx)
  if name in _INLINE:
    return _inline(eqn, invals, ctx)
  raise RewriteError(
      f'targeted kernel {refs[0].path!r} (shape {refs[0].shape}) is used by '
      f'primitive {name!r}, which the LoRA rewrite does not support; only '
      f'dot_general (through casts, jit, scan, remat, cond and custom '
      f'derivative calls) can consume an adapted kernel. Exclude this '
      f'parameter from the adapter rule.')


def _eval(jaxpr, consts, args, ctx: _Ctx) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    manager = getattr(getattr(eqn, 'ctx', None), 'manager', None)
    with manager if manager is not None else contextlib.nullcontext():
      if any(isinstance(v, KernelRef) for v in invals):
        outs = _with_refs(eqn, invals, ctx)
      else:
        outs = eqn.primitive.bind(
            *invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
          outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


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
    _check_adapter_paths(adapters, adapted)
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
    invals.append(KernelRef(path, None if ctx.found is not None else provider,
                            leaf, ad, aval.dtype, tuple(aval.shape)))
  closed, out_tree, dyn_vals = traced(ptree, param_avals, args, kwargs)
  outs = _eval(closed.jaxpr, closed.consts, invals + dyn_vals, ctx)
  _no_ref_outputs(outs, 'the function')
  return jax.tree_util.tree_unflatten(out_tree, outs)


def _check_adapter_paths(adapters, adapted: dict[str, Any]) -> None:
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

    >>> g = lora(model.apply, spec)              # doctest: +SKIP
    >>> y = g(params, adapters, x)               # doctest: +SKIP
  """
  traced = _Traced(fn)

  def adapted(params, adapters, *args, lora_rng=None, lora_context=None,
              **kwargs):
    return _run(traced, spec, params, adapters, args, kwargs,
                _Ctx(rng=lora_rng, context=lora_context))

  adapted.__name__ = f'lora_{getattr(fn, "__name__", "fn")}'
  adapted.__doc__ = fn.__doc__
  return adapted


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
