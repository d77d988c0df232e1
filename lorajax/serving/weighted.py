"""A weighted sum of several LoRA adapters of one base, as one adapter.

Every method works on the adapters' factors with their scales folded in
(``delta_i = a_i·b_i``) and returns plain ``Lora`` adapters of scale 1:

- ``'cat'``: concatenate along the rank. ``a = [a_1 … a_n]``,
  ``b = [w_1·b_1; …; w_n·b_n]``, so ``delta = Σ w_i·delta_i`` exactly, at
  rank ``Σ r_i``.
- ``'linear'``: mix the factors at the shared rank r:
  ``a = Σ (|w_i| / Σ|w_j|)·a_i``, ``b = Σ w_i·b_i``. This equals
  ``Σ w_i·delta_i`` plus cross terms ``a_i·b_j``: it is exact when the
  adapters share ``a`` (e.g. adapters trained from one initialisation with
  ``a`` frozen) and is the cheap, rank-preserving choice.
- ``'svd'``: the exact ``Σ w_i·delta_i`` re-factorised to a target rank by a
  truncated SVD (the best rank-k approximation in Frobenius norm). It works
  from the factors (QR of the concatenated ``a`` and ``bᵀ``, SVD of the small
  core), never the dense ``[in, out]`` update.

- ``'ties_svd'``, ``'dare_ties_svd'``, ``'dare_linear_svd'``,
  ``'magnitude_prune_svd'``: the per-adapter updates pruned and merged as
  task vectors (``serving.task_arithmetic``; ``density`` of entries kept,
  ``seed`` for DARE), then factored to ``rank`` by a truncated SVD of the
  dense update. As PEFT's combination types of the same names.

A kernel that some adapters do not target takes contributions from those
that do.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'w': jnp.zeros((3, 2))}
  >>> spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=1))])
  >>> ad = jax.tree.map(jnp.ones_like, lorajax.init(spec, params,
  ...                                                jax.random.key(0)))
  >>> both, bspec = weighted_adapter([(ad, spec), (ad, spec)], params,
  ...                                weights=[0.7, 0.3], method='svd', rank=1)
  >>> lorajax.merge(params, both, bspec)['w'].round(4)   # 1.0·(1·1ᵀ)
  Array([[1., 1.],
         [1., 1.],
         [1., 1.]], dtype=float32)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import spec as spec_lib
from lorajax import spec_paths
from lorajax.methods import low_rank as lora_lib
from lorajax.methods import multi
from lorajax.serving import task_arithmetic

PyTree = Any
TASK_METHODS = tuple(f'{m}_svd' for m in task_arithmetic.METHODS)
METHODS = ('cat', 'linear', 'svd') + TASK_METHODS


def _as_matrices(f: multi.Factors):
  """``a`` -> ``[S, C, r]``, ``b`` -> ``[S, r, F]`` (S = stacked layers)."""
  s = f.layout.stack
  stack = f.a.shape[:s]
  n = int(np.prod(stack)) if stack else 1
  r = f.a.shape[-1]
  return (f.a.reshape(n, -1, r), f.b.reshape(n, r, -1), stack,
          f.a.shape[s:-1], f.b.shape[s + 1:])


def _svd_truncate(a: jnp.ndarray, b: jnp.ndarray, rank: int):
  """Best rank-``rank`` factors of ``a @ b`` for batched ``a`` [S, C, R]."""
  qa, ra = jnp.linalg.qr(a)                          # [S, C, k], [S, k, R]
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b, 1, 2))      # [S, F, k'], [S, k', R]
  core = ra @ jnp.swapaxes(rb, 1, 2)                 # [S, k, k']
  u, sv, vt = jnp.linalg.svd(core, full_matrices=False)
  keep = min(rank, sv.shape[-1])
  root = jnp.sqrt(sv[:, :keep])
  new_a = (qa @ u[:, :, :keep]) * root[:, None, :]
  new_b = root[:, :, None] * (vt[:, :keep, :] @ jnp.swapaxes(qb, 1, 2))
  if keep < rank:  # a rank-deficient update: pad with zero directions.
    new_a = jnp.pad(new_a, ((0, 0), (0, 0), (0, rank - keep)))
    new_b = jnp.pad(new_b, ((0, 0), (0, rank - keep), (0, 0)))
  return new_a, new_b


def _dense_truncate(delta: jnp.ndarray, rank: int):
  """Best rank-``rank`` factors of a dense ``[S, C, F]`` update."""
  u, sv, vt = jnp.linalg.svd(delta, full_matrices=False)
  keep = min(rank, sv.shape[-1])
  root = jnp.sqrt(sv[:, :keep])
  a, b = u[:, :, :keep] * root[:, None, :], root[:, :, None] * vt[:, :keep, :]
  if keep < rank:
    a = jnp.pad(a, ((0, 0), (0, 0), (0, rank - keep)))
    b = jnp.pad(b, ((0, 0), (0, rank - keep), (0, 0)))
  return a, b


def weighted_factors(entries: Sequence[dict[str, multi.Factors]],
                    weights: Sequence[float], *, method: str = 'cat',
                    rank: int | None = None, density: float = 1.0,
                    seed: int = 0) -> dict[str, multi.Factors]:
  """Combines per-adapter factors (see the module docstring).

  Raises:
    ValueError: an unknown method, an SVD method without ``rank``,
      ``'linear'`` over adapters of different ranks at one kernel, a
      density outside (0, 1].
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r}; expected one of {METHODS}')
  if method.endswith('svd') and (rank is None or rank < 1):
    raise ValueError(f'method={method!r} needs a target rank >= 1, got '
                     f'{rank!r}')
  key = jax.random.key(seed)
  if len(weights) != len(entries):
    raise ValueError(f'{len(weights)} weights for {len(entries)} adapters')
  out = {}
  for path in sorted({p for e in entries for p in e}):
    parts = [(e[path], float(w)) for e, w in zip(entries, weights)
             if path in e]
    layout = parts[0][0].layout
    mats = [(_as_matrices(f), w) for f, w in parts]
    (_, _, stack, cshape, fshape), _ = mats[0]
    s = len(stack)
    if method == 'linear':
      ranks = {m[0].shape[-1] for m, _ in mats}
      if len(ranks) > 1:
        raise ValueError(f"{path}: method='linear' needs one rank, the "
                         f"adapters have {sorted(ranks)}; use 'cat' or 'svd'")
      total = sum(abs(w) for _, w in mats) or 1.0
      a = sum((abs(w) / total) * m[0] for m, w in mats)
      b = sum(w * m[1] for m, w in mats)
    elif method in TASK_METHODS:
      key, sub = jax.random.split(key)
      delta = task_arithmetic.merge_task_vectors(
          [m[0] @ m[1] for m, _ in mats], [w for _, w in mats],
          method[:-len('_svd')], density=density, key=sub)
      a, b = _dense_truncate(delta, rank)
    else:
      a = jnp.concatenate([m[0] for m, _ in mats], axis=-1)
      b = jnp.concatenate([w * m[1] for m, w in mats], axis=1)
      if method == 'svd':
        a, b = _svd_truncate(a, b, rank)
    r = a.shape[-1]
    out[path] = multi.Factors(a.reshape(stack + cshape + (r,)),
                              b.reshape(stack + (r,) + fshape), layout)
    assert out[path].a.ndim == s + len(cshape) + 1
  return out


def factors_to_adapters(factors: dict[str, multi.Factors], params: PyTree
                        ) -> tuple[PyTree, spec_lib.LoraSpec]:
  """Plain ``Lora`` adapters (scale 1) and the spec that applies them."""
  adapters, actions = {}, {}
  for path, f in sorted(factors.items()):
    spec_lib.set_by_path(adapters, path, spec_lib.AdapterParams(
        {'a': f.a, 'b': f.b}, layout=f.layout))
    actions[path] = lora_lib.Lora(rank=int(f.a.shape[-1]))
  universe = [p for p, _ in spec_lib.flatten_paths(params)]
  return adapters, spec_paths.spec_from_actions(actions, universe)


def weighted_adapter(entries: Sequence[tuple[PyTree, spec_lib.LoraSpec]],
            params: PyTree, *, weights: Sequence[float] | None = None,
            method: str = 'cat', rank: int | None = None,
            density: float = 1.0, seed: int = 0
            ) -> tuple[PyTree, spec_lib.LoraSpec]:
  """Combines ``(adapters, spec)`` pairs of one base into one adapter.

  Args:
    entries: the adapters and their specs (``Lora`` rules only).
    params: the base.
    weights: one weight per adapter; default all 1.
    method: one of ``METHODS`` (see the module docstring).
    rank: the target rank of the SVD methods.
    density: fraction of entries the pruning methods keep.
    seed: PRNG seed of the DARE methods.

  Returns:
    ``(adapters, spec)`` with ``Lora`` of scale 1.

  Raises:
    ValueError: see ``weighted_factors``; an adapter that also trains
      leaves outright (heads cannot be combined this way).
  """
  factors = []
  for i, (adapters, spec) in enumerate(entries):
    trained = spec_lib.resolve(spec, params).trained
    if trained:
      raise ValueError(f'adapter {i} also trains {trained[:3]} outright; only '
                       f'low-rank adapters can be combined')
    factors.append(multi.lora_factors(adapters, spec, params))
  weights = [1.0] * len(entries) if weights is None else list(weights)
  return factors_to_adapters(
      weighted_factors(factors, weights, method=method, rank=rank,
                       density=density, seed=seed), params)
