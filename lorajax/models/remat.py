"""Rematerialization of a model's blocks, one field for every family.

``remat`` is a field of ``BertConfig``, ``LlamaConfig`` and ``MoeConfig``
(and ``config.remat`` of a training run). It says what the backward pass
keeps of each transformer block's forward pass:

- ``'none'``: everything the backward pass reads (plain autodiff);
- ``'layer'``: only the block's inputs; the whole block runs again in the
  backward pass (``jax.checkpoint`` with no policy, "gradient
  checkpointing" as PyTorch calls it);
- ``'dots'``: the outputs of matrix products without batch dimensions
  (every projection ``x·W``, and the low-rank ``x·a``, ``(x·a)·b`` of an
  adapter); attention scores, softmax, norms and activations run again
  (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).

Losses and gradients are the same under every policy (to float rounding);
what changes is the memory the compiled step holds and the FLOPs it does
(``experiments/bench/lm_memory.py`` measures both).

Example:

  >>> check('dots')
  'dots'
  >>> check(True)          # LlamaConfig's older bool form
  'layer'
  >>> check('full', field='config.remat')
  Traceback (most recent call last):
  ...
  ValueError: config.remat='full': expected one of ('none', 'layer', 'dots')
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

# What ``remat`` may be.
POLICIES = ('none', 'layer', 'dots')
# The jax.checkpoint policy of each value (None: save nothing but inputs).
_JAX_POLICIES: dict[str, Callable[..., bool] | None] = {
    'layer': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check(value: Any, *, field: str = 'remat') -> str:
  """``value`` as one of ``POLICIES`` (``True``/``False`` read as
  ``'layer'``/``'none'``).

  Raises:
    ValueError: any other value, naming ``field``.
  """
  if value is True or value is False:
    return 'layer' if value else 'none'
  if not isinstance(value, str) or value not in POLICIES:
    raise ValueError(f'{field}={value!r}: expected one of {POLICIES}')
  return value


def jax_policy(remat: str) -> Callable[..., bool] | None:
  """The ``jax.checkpoint`` policy of ``remat`` (``'layer'`` or
  ``'dots'``)."""
  return _JAX_POLICIES[check(remat)]


def wrap(block: type[nn.Module], remat: str, *, prevent_cse: bool = True,
         static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """``block`` rematerialized by ``remat`` (itself when ``'none'``).

  Args:
    block: a linen module class (one transformer block).
    remat: one of ``POLICIES``.
    prevent_cse: ``jax.checkpoint``'s; False under ``nn.scan``, where XLA
      cannot merge the recomputation with the forward pass anyway.
    static_argnums: the block's non-array arguments (``self`` is 0).

  Returns:
    A module class called like ``block``.
  """
  remat = check(remat)
  if remat == 'none':
    return block
  return nn.remat(block, prevent_cse=prevent_cse, policy=jax_policy(remat),
                  static_argnums=static_argnums)
