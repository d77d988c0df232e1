"""Create adapters for a parameter tree, and fold them in or out of it.

``init`` returns only the new, small pytree: for every targeted kernel path,
a dict of the provider's parameters (``{'a': ..., 'b': ...}`` for LoRA), nested
like the parameter tree. ``merge`` returns plain parameters for the untouched
``model.apply``; ``unmerge`` takes them back.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from lorajax import kernels
from lorajax import rewrite
from lorajax import spec as spec_lib
from lorajax.methods import quant

PyTree = Any


def init(spec: spec_lib.LoraSpec, params: PyTree, key: jax.Array, *,
         fn: Callable[..., Any] | None = None, args: tuple[Any, ...] = (),
         kwargs: dict[str, Any] | None = None) -> PyTree:
  """Creates the adapter pytree for every kernel ``spec`` targets.

  Pass the function that uses the kernels and example arguments: the layout
  of every kernel (which axes are stacked, contracted, batch or output axes,
  and any transpose on the way) is read from how ``fn`` multiplies it, and
  kept with its adapter (``AdapterParams.layout``). Without ``fn``,
  two-dimensional kernels are taken as Flax ``[in, out]``; the adapted
  function checks that assumption at every call and refuses a kernel the
  function uses otherwise (e.g. ``x·Wᵀ``).

  Args:
    spec: the rules.
    params: the parameter tree ``fn`` takes first.
    key: PRNG key; every kernel gets its own key derived from it.
    fn: optional ``fn(params, *args, **kwargs)`` that consumes the kernels.
    args, kwargs: example inputs for ``fn`` (only shapes matter).

  Returns:
    Adapters nested like ``params`` (as dicts keyed by path component):
    ``{'params': {'dense': {'kernel': AdapterParams({'a': [in, r], 'b':
    [r, out]})}}}``; ``b`` is zero so the adapted function equals the base
    at initialization.

  Example:

    >>> import jax, jax.numpy as jnp, lorajax
    >>> params = {'w': jnp.ones((5, 4))}                 # stored [out, in]
    >>> fn = lambda p, x: x @ p['w'].T                   # torch-style
    >>> spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2))])
    >>> ad = init(spec, params, jax.random.key(0), fn=fn, args=(jnp.ones((1, 4)),))
    >>> ad['w']
    AdapterParams({'a': (4, 2), 'b': (2, 5)}, layout=[out, in])

  Raises:
    ValueError: bad rules (see ``spec.resolve``), a rank larger than the
      kernel allows, a multi-axis kernel without ``fn``, or a targeted kernel
      that ``fn`` never multiplies.
  """
  resolution = spec_lib.resolve(spec, params)
  adapted = resolution.adapted
  layouts = None
  if fn is not None:
    layouts = rewrite.discover_layouts(fn, spec, params, *args,
                                       **(kwargs or {}))
  leaves = dict(spec_lib.flatten_paths(params))
  keys = jax.random.split(key, max(len(adapted), 1))
  adapters: dict[str, Any] = {}
  for i, (path, provider) in enumerate(adapted.items()):
    shape = tuple(provider.kernel_aval(leaves[path]).shape)
    layout = _layout_for(path, shape, layouts,
                         f'rule {resolution.rule_of[path]}')
    provider.validate(path, shape, layout)
    made = provider.init_params(keys[i], leaves[path], layout)
    spec_lib.set_by_path(adapters, path, spec_lib.AdapterParams(
        made, layout=layout) if provider.has_params else made)
    logging.log_first_n(logging.DEBUG, 'adapter %s: %s', 64, path, layout)
  return adapters


def _layout_for(path: str, shape: tuple[int, ...],
                layouts: dict[str, spec_lib.KernelLayout] | None,
                source: str) -> spec_lib.KernelLayout:
  """The layout of ``path`` from ``layouts`` (read from the function or a
  file); without them, a 2-D kernel is taken as Flax ``[in, out]``."""
  if layouts is not None:
    if path not in layouts:
      raise ValueError(
          f'{path!r} (shape {shape}) is targeted by {source} but the '
          f'function never multiplies it in a dot_general (layouts known for '
          f'{sorted(layouts)[:6]}); narrow the rule')
    return layouts[path]
  if len(shape) == 2:
    return spec_lib.KernelLayout.dense()
  raise ValueError(
      f'{path!r} has shape {shape}: which axes are inputs is not known for a '
      f'kernel of more than two axes; pass fn=model.apply and '
      f'args=(example_input,) so it is read from how the model uses it')


def _map_adapted(params, adapters, spec, method: str):
  resolution = spec_lib.resolve(spec, params)
  adapted = resolution.adapted
  rewrite.check_adapter_paths(adapters, adapted)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=spec_lib.is_kernel_node)
  out = []
  for keypath, leaf in flat:
    path = spec_lib.path_str(keypath)
    provider = adapted.get(path)
    if provider is None:
      out.append(leaf)
      continue
    if provider.has_params:
      ad = spec_lib.get_by_path(adapters, path)
      layout = kernels.layout_of(ad, path)
    else:
      ad, layout = {}, None
    if method == 'unmerge' and isinstance(leaf, spec_lib.FrozenKernel):
      raise ValueError(f'{path!r}: cannot unmerge from a quantized kernel')
    out.append(getattr(provider, method)(leaf, ad, layout))
  return jax.tree_util.tree_unflatten(treedef, out)


def merge(params: PyTree, adapters: PyTree, spec: spec_lib.LoraSpec
          ) -> PyTree:
  """Folds adapters into their kernels: plain params for ``model.apply``.

  The update is computed in float32 and cast back to each kernel's dtype.
  Quantized kernels are dequantized; the merged kernel is dense.
  """
  return _map_adapted(params, adapters, spec, 'merge')


def unmerge(merged: PyTree, adapters: PyTree, spec: spec_lib.LoraSpec
            ) -> PyTree:
  """Subtracts the adapters again (inverse of ``merge`` up to rounding)."""
  return _map_adapted(merged, adapters, spec, 'unmerge')



def merge_quantized(params: PyTree, adapters: PyTree,
                    spec: spec_lib.LoraSpec, *, requantize: bool = False
                    ) -> tuple[PyTree, bool]:
  """Merges adapters into a (partly) quantized base.

  Every quantized kernel is dequantized and merged in float32. With
  ``requantize`` the merged kernels are quantized again with their previous
  format (which adds a new rounding error on top of the adapter's update);
  otherwise they are returned dense in the original dtype.

  Returns:
    ``(merged params, whether quantized kernels were re-quantized)``; the
    outcome is also logged.
  """
  before = {p: leaf for p, leaf in spec_lib.flatten_paths(params)
            if isinstance(leaf, quant.QuantizedKernel)}
  merged = merge(params, adapters, spec)
  adapted = set(spec_lib.resolve(spec, params).adapted)
  touched = sorted(set(before) & adapted)
  if requantize and touched:
    def convert(keypath, leaf):
      path = spec_lib.path_str(keypath)
      return before[path].quantize_like(leaf) if path in touched else leaf
    merged = jax.tree_util.tree_map_with_path(convert, merged,
                                              is_leaf=spec_lib.is_kernel_node)
  requantized = bool(requantize and touched)
  logging.info('merged %d quantized kernel(s) in float32; %s', len(touched),
               're-quantized to their previous format' if requantized else
               'returned dense (not re-quantized)')
  return merged, requantized


def layouts(adapters: PyTree) -> dict[str, spec_lib.KernelLayout]:
  """``path -> KernelLayout`` of every adapter that carries one."""
  out = {}
  for keypath, node in jax.tree_util.tree_flatten_with_path(
      adapters, is_leaf=lambda x: isinstance(x, spec_lib.AdapterParams))[0]:
    if isinstance(node, spec_lib.AdapterParams):
      out[spec_lib.path_str(keypath)] = node.layout
  return out


def with_layouts(adapters: PyTree, spec: spec_lib.LoraSpec, params: PyTree,
                 layouts_by_path: dict[str, spec_lib.KernelLayout] | None = None,
                 *, fn: Callable[..., Any] | None = None,
                 args: tuple[Any, ...] = (),
                 kwargs: dict[str, Any] | None = None) -> PyTree:
  """Adapters (e.g. read from a file or built by hand) with their layouts.

  The layouts come from ``layouts_by_path`` (as written in an adapter file)
  or are read from ``fn`` as ``init`` does; without either, only
  two-dimensional kernels are accepted, as Flax ``[in, out]`` (which the
  adapted function then checks at every call).

  Raises:
    ValueError: an adapter whose factors do not have the shapes its layout
      needs, or a kernel whose layout cannot be known.
  """
  resolution = spec_lib.resolve(spec, params)
  rewrite.check_adapter_paths(adapters, resolution.adapted)
  if layouts_by_path is None and fn is not None:
    layouts_by_path = rewrite.discover_layouts(fn, spec, params, *args,
                                               **(kwargs or {}))
  leaves = dict(spec_lib.flatten_paths(params))
  out: dict[str, Any] = {}
  for path, provider in resolution.adapted.items():
    if not provider.has_params:
      continue
    ad = spec_lib.get_by_path(adapters, path)
    shape = tuple(provider.kernel_aval(leaves[path]).shape)
    layout = _layout_for(path, shape, layouts_by_path, 'the spec')
    want = provider.param_shapes(shape, layout)
    for name, s in want.items():
      got = tuple(np.shape(ad[name])) if name in ad else None
      if got != tuple(s):
        raise ValueError(f'adapter {path!r}: {name!r} has shape {got}; a '
                         f'kernel {shape} used as {layout.describe()} needs '
                         f'{tuple(s)}')
    spec_lib.set_by_path(out, path, spec_lib.AdapterParams(dict(ad),
                                                           layout=layout))
  return out
