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

from lorajax import rewrite
from lorajax import spec as spec_lib

PyTree = Any


def init(spec: spec_lib.LoraSpec, params: PyTree, key: jax.Array, *,
         fn: Callable[..., Any] | None = None, args: tuple[Any, ...] = (),
         kwargs: dict[str, Any] | None = None) -> PyTree:
  """Creates the adapter pytree for every kernel ``spec`` targets.

  Two-dimensional kernels are taken as Flax ``[in, out]``. For kernels of
  more dimensions (DenseGeneral, Einsum, layers stacked by ``nn.scan``), pass
  the function that uses them and example arguments: the layout (which axes
  are stacked and which are contracted) is read from how ``fn`` contracts
  each kernel.

  Args:
    spec: the rules.
    params: the parameter tree ``fn`` takes first.
    key: PRNG key; every kernel gets its own key derived from it.
    fn: optional ``fn(params, *args, **kwargs)`` that consumes the kernels.
    args, kwargs: example inputs for ``fn`` (only shapes matter).

  Returns:
    Adapters nested like ``params``: ``{'params': {'dense': {'kernel':
    {'a': [in, r], 'b': [r, out]}}}}``; ``b`` is zero so the adapted function
    equals the base at initialization.

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
    if layouts is not None:
      if path not in layouts:
        raise ValueError(
            f'{path!r} (shape {shape}) is targeted by rule '
            f'{resolution.rule_of[path]} but the function never multiplies '
            f'it in a dot_general; narrow the rule')
      layout = layouts[path]
    elif len(shape) == 2:
      layout = spec_lib.KernelLayout.dense()
    else:
      raise ValueError(
          f'{path!r} has shape {shape}: which axes are inputs is not known '
          f'for a kernel of more than two axes; call lorajax.init(spec, '
          f'params, key, fn=model.apply, args=(example_input,)) so it is '
          f'read from how the model uses the kernel')
    provider.validate(path, shape, layout)
    spec_lib.set_by_path(adapters, path,
                         provider.init_params(keys[i], leaves[path], layout))
    logging.log_first_n(logging.DEBUG, 'adapter %s: %s', 64, path, layout)
  return adapters


def _map_adapted(params, adapters, spec, method: str):
  resolution = spec_lib.resolve(spec, params)
  adapted = resolution.adapted
  rewrite._check_adapter_paths(adapters, adapted)  # pylint: disable=protected-access
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=spec_lib.is_kernel_node)
  out = []
  for keypath, leaf in flat:
    path = spec_lib.path_str(keypath)
    provider = adapted.get(path)
    if provider is None:
      out.append(leaf)
      continue
    ad = (spec_lib.get_by_path(adapters, path) if provider.has_params
          else {})
    shape = tuple(provider.kernel_aval(leaf).shape)
    layout = provider.infer_layout(shape, ad)
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
