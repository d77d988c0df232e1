"""PiSSA: LoRA started from the kernel's principal singular directions.

``Lora(init='pissa')`` makes ``init`` set ``s·a·b`` to the best rank-r
approximation ``U_r·S_r·V_rᵀ`` of each targeted kernel ``W``. The frozen
base must then hold the residual ``W - s·a·b`` (``residual_base``), so the
adapted function equals the pretrained one at step 0 while the trainable
factors start where the kernel has most of its energy (Meng et al., 2024,
"PiSSA: Principal Singular Values and Singular Vectors Adaptation").

A trained PiSSA adapter only makes sense on that residual. Because the
starting factors are a function of the pretrained kernel alone, ``to_lora``
turns it into an ordinary LoRA of rank 2r on the *original* kernel
(``ΔW = s·(a·b - a₀·b₀) = s·[a, a₀]·[b; -b₀]``), which merges, ships and
exports (PEFT format) like any other.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'dense': {'kernel': jnp.diag(jnp.array([3., 2., 1.]))}}
  >>> spec = lorajax.LoraSpec([(r'.*/kernel', lorajax.Lora(1, init='pissa'))])
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> base = residual_base(spec, params, adapters)    # the top part removed
  >>> base['dense']['kernel'].diagonal()
  Array([0., 2., 1.], dtype=float32)
  >>> # ... train the adapters on the frozen residual base, then:
  >>> lora_spec, lora_adapters = to_lora(spec, params, adapters)
  >>> lora_adapters['dense']['kernel']['a'].shape    # rank 2r, original base
  (3, 2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorajax import kernels
from lorajax import spec as spec_lib
from lorajax.methods import low_rank

PyTree = Any


def is_pissa(provider: Any) -> bool:
  """True for a provider whose factors start as a function of the kernel
  (PiSSA or OLoRA), so that the frozen base must be the residual."""
  return (isinstance(provider, low_rank.Lora)
          and getattr(provider, 'init', None) in low_rank.RESIDUAL_INITS)


def uses_pissa(spec: spec_lib.LoraSpec) -> bool:
  """True if any rule of ``spec`` has a PiSSA provider."""
  return any(is_pissa(action) for _, action in spec.rules)


def _pissa_leaves(spec, params, adapters):
  """``(path, provider, kernel, factors, layout)`` of every PiSSA kernel."""
  adapted = spec_lib.resolve(spec, params).adapted
  leaves = dict(spec_lib.flatten_paths(params))
  for path, provider in adapted.items():
    if not is_pissa(provider):
      continue
    factors = spec_lib.get_by_path(adapters, path)
    kernel = leaves[path]
    layout = kernels.layout_of(factors, path)
    yield path, provider, kernel, factors, layout


def residual_base(spec: spec_lib.LoraSpec, params: PyTree, adapters: PyTree
                  ) -> PyTree:
  """``params`` with each PiSSA kernel replaced by ``W - s·a₀·b₀``.

  Args:
    spec: the rules (PiSSA and any other providers).
    params: the pretrained base.
    adapters: the freshly initialized adapters (``lorajax.init``).

  Returns:
    The base to freeze; other leaves are the same objects as in ``params``.
  """
  new = {path: provider.unmerge(kernel, factors, layout)
         for path, provider, kernel, factors, layout
         in _pissa_leaves(spec, params, adapters)}
  return _replace(params, new)


def _replace(params: PyTree, new: dict[str, Any]) -> PyTree:
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=spec_lib.is_kernel_node)
  out = [new.get(spec_lib.path_str(p), leaf) for p, leaf in flat]
  return jax.tree_util.tree_unflatten(treedef, out)


def lora_provider(provider: low_rank.Lora) -> low_rank.Lora:
  """The rank-2r ``Lora`` with the same scale ``s`` that ``to_lora`` uses."""
  rank = 2 * provider.rank
  return low_rank.Lora(rank=rank, alpha=provider.scale * rank,
                       use_rslora=False, dropout=provider.dropout,
                       batch_axes=provider.batch_axes)


def to_lora(spec: spec_lib.LoraSpec, params: PyTree, adapters: PyTree, *,
            start: PyTree | None = None
            ) -> tuple[spec_lib.LoraSpec, PyTree]:
  """A trained PiSSA adapter as a plain LoRA on the original base.

  Args:
    spec: the training spec.
    params: the *original* pretrained base (not the residual): the starting
      factors ``a₀, b₀`` are recomputed from it.
    adapters: the trained adapters.
    start: the starting adapters (``lorajax.init``'s output), if at hand:
      used instead of recomputing the SVD.

  Returns:
    ``(spec, adapters)``: PiSSA rules become ``lora_provider`` (rank 2r,
    ``alpha = s·2r``) with ``a = [a, a₀]``, ``b = [b; -b₀]``; every other
    rule and adapter is unchanged. ``merge(params, *result)`` equals
    ``merge(residual_base(...), adapters, spec)`` up to float32 rounding.
  """
  new_adapters = jax.tree.map(lambda x: x, adapters)  # A fresh tree.
  for path, provider, kernel, factors, layout in _pissa_leaves(
      spec, params, adapters):
    if start is None:
      first = provider.start_factors(kernel, layout)
    else:
      first = spec_lib.get_by_path(start, path)
    a = jnp.concatenate([factors['a'].astype(jnp.float32),
                         jnp.asarray(first['a'], jnp.float32)], -1)
    b = jnp.concatenate([factors['b'].astype(jnp.float32),
                         -jnp.asarray(first['b'], jnp.float32)], layout.lead)
    spec_lib.set_by_path(new_adapters, path,
                         spec_lib.AdapterParams({'a': a, 'b': b}, layout=layout))
  rules = [(pattern, lora_provider(action) if is_pissa(action) else action)
           for pattern, action in spec.rules]
  return spec_lib.LoraSpec(rules), new_adapters


def check_portable(spec: spec_lib.LoraSpec, what: str) -> None:
  """Raises if ``spec`` has PiSSA rules: their adapter needs the residual
  base, so files meant for the original base take ``to_lora`` first."""
  if uses_pissa(spec):
    raise ValueError(
        f"{what}: the spec has Lora(init='pissa') rules, whose adapters only "
        'fit the residual base; convert first with '
        'lorajax.pissa.to_lora(spec, original_params, adapters)')


__all__ = ['is_pissa', 'uses_pissa', 'residual_base', 'to_lora',
           'lora_provider', 'check_portable']
