"""Merging task vectors: magnitude pruning, DARE and TIES.

Each adapter contributes its update ``delta_i`` of one kernel (a dense
``[S, in, out]`` tensor, ``S`` stacked layers) with a weight ``w_i``:

- ``magnitude_prune``: keep the ``density`` fraction of entries of each
  ``delta_i`` with the largest magnitude, then ``Σ w_i·delta_i``.
- ``dare_linear``: keep each entry with probability ``density`` and divide
  the kept ones by ``density`` (Yu et al., 2024, "Language Models are Super
  Mario"), then ``Σ w_i·delta_i``.
- ``ties``: magnitude-prune, elect a sign per entry (the sign of the sum of
  the pruned updates, + for 0), and average the weighted entries whose sign
  agrees with it (Yadav et al., 2023, "TIES-Merging").
- ``dare_ties``: DARE's random pruning, then TIES' election and average.

Pruning keeps exactly ``int(density · n)`` entries of each layer's ``n``.
These are the definitions of PEFT's ``merge_utils`` (checked against it in
the tests). The results are dense;
``serving.weighted`` factors them back to a rank with a truncated SVD
(PEFT's ``*_svd`` combination types).

Example:

  >>> import jax, jax.numpy as jnp
  >>> d1 = jnp.array([[[1., -2.], [3., 0.5]]])
  >>> d2 = jnp.array([[[-1., -1.], [1., 4.]]])
  >>> merge_task_vectors([d1, d2], [1., 1.], 'ties', density=1.0)
  Array([[[ 1.  , -1.5 ],
          [ 2.  ,  2.25]]], dtype=float32)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

METHODS = ('magnitude_prune', 'dare_linear', 'ties', 'dare_ties')


def magnitude_mask(delta: jax.Array, density: float) -> jax.Array:
  """True at the ``int(density · n)`` largest ``|delta|`` of each layer."""
  flat = jnp.abs(delta).reshape(delta.shape[0], -1)
  k = int(density * flat.shape[1])
  order = jnp.argsort(-flat, axis=1, stable=True)
  ranks = jnp.argsort(order, axis=1, stable=True)
  return (ranks < k).reshape(delta.shape)


def dare(delta: jax.Array, density: float, key: jax.Array) -> jax.Array:
  """Random drop with keep probability ``density``, kept entries rescaled."""
  keep = jax.random.bernoulli(key, density, delta.shape)
  return jnp.where(keep, delta / density, 0.0)


def _ties_merge(pruned: jax.Array, weighted: jax.Array) -> jax.Array:
  """Sign election over axis 0 of the pruned updates and the mean of the
  weighted entries that agree with it."""
  sign = jnp.where(jnp.sum(pruned, axis=0) >= 0, 1.0, -1.0)
  agree = jnp.sign(pruned) == sign
  total = jnp.sum(jnp.where(agree, weighted, 0.0), axis=0)
  return total / jnp.maximum(jnp.sum(agree, axis=0), 1)


def merge_task_vectors(deltas: Sequence[jax.Array], weights: Sequence[float],
                       method: str, *, density: float,
                       key: jax.Array | None = None) -> jax.Array:
  """One merged update from per-adapter updates of one kernel.

  Args:
    deltas: ``[S, in, out]`` float32 updates, one per adapter.
    weights: one weight per adapter.
    method: one of ``METHODS``.
    density: the fraction of entries kept, in (0, 1].
    key: PRNG key for the DARE methods.

  Raises:
    ValueError: an unknown method, a density outside (0, 1], or a DARE
      method without a key.
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r}; expected one of {METHODS}')
  if not 0.0 < density <= 1.0:
    raise ValueError(f'density must be in (0, 1], got {density!r}')
  if method.startswith('dare'):
    if key is None:
      raise ValueError(f'method={method!r} drops entries at random: pass a '
                       f'PRNG key (seed)')
    keys = jax.random.split(key, len(deltas))
    pruned = [dare(d, density, k) for d, k in zip(deltas, keys)]
  else:
    pruned = [jnp.where(magnitude_mask(d, density), d, 0.0) for d in deltas]
  weighted = jnp.stack([w * d for d, w in zip(pruned, weights)])
  if method in ('ties', 'dare_ties'):
    return _ties_merge(jnp.stack(pruned), weighted)
  return jnp.sum(weighted, axis=0)
