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

The evaluation is ``lorajax.interpret``; the value that stands for a
targeted kernel, and its products, ``lorajax.kernel_ref``. Only public JAX
API is used: ``jax.make_jaxpr`` and ``jax.extend.core``.
"""


from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from lorajax import interpret
from lorajax import kernel_ref
from lorajax import spec as spec_lib
from lorajax.runtime import dead_rows

PyTree = Any
# Raised where a targeted kernel is used in a way the rewrite cannot adapt.
RewriteError = kernel_ref.RewriteError


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
         kwargs, ctx: kernel_ref.Ctx):
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
    invals.append(kernel_ref.KernelRef(path, provider, leaf, ad, aval.dtype,
                            tuple(aval.shape)))
  closed, out_tree, dyn_vals = traced(ptree, param_avals, args, kwargs)
  ctx.param_ids = frozenset(id(v) for v in invals
                            if not isinstance(v, kernel_ref.KernelRef))
  outs = interpret.evaluate(closed.jaxpr, closed.consts, invals + dyn_vals, ctx)
  kernel_ref.no_ref_outputs(outs, 'the function')
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
                kernel_ref.Ctx(rng=lora_rng, context=lora_context))

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
    outs = interpret.evaluate(closed.jaxpr, closed.consts, dyn_vals,
                              kernel_ref.Ctx())
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
    return _run(traced, spec, p, None, a, kw, kernel_ref.Ctx(found=found))

  jax.eval_shape(run, params, [leaves[i] for i in dyn])
  return found
