"""What sets Gemma, Gemma2 and Phi-3 apart from Llama, as small functions.

``lorajax.models.llama.Llama`` computes every decoder family; the pieces
here are the ones only some families use, kept out of the module so that
the Llama path reads as before:

- ``ACTIVATIONS``: the gate activation of the gated MLP, by the name a
  ``LlamaConfig.activation`` gives (SwiGLU's ``'silu'``, Gemma's
  ``'gelu_tanh'``, the exact ``'gelu'``).
- ``softcap``: ``cap · tanh(x / cap)``, Gemma2's bound on attention scores
  and on the final logits.
- ``split_fused``: Phi-3's fused projections (``qkv_proj``,
  ``gate_up_proj``) cut into their parts along the output axis.
- ``window_mask``: the keys a query of a sliding-window layer may see.

Example:

  >>> float(softcap(jnp.float32(1e6), 30.0))
  30.0
  >>> [x.shape for x in split_fused(jnp.zeros((2, 10)), (4, 3, 3))]
  [(2, 4), (2, 3), (2, 3)]
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

# LlamaConfig.activation -> the function applied to the gate projection.
# 'gelu_tanh' is transformers' 'gelu_pytorch_tanh' / 'gelu_new'.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': jax.nn.silu,
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
}


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """Bounds ``x`` smoothly to ``(-cap, cap)``: ``cap * tanh(x / cap)``.

  Args:
    x: any array (attention scores, logits).
    cap: the bound, > 0.

  Returns:
    An array of ``x``'s shape and dtype.
  """
  return cap * jnp.tanh(x / cap)


def split_fused(x: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
  """Cuts the last axis of a fused projection's output into ``sizes``.

  Args:
    x: ``[..., sum(sizes)]``, e.g. the output of Phi-3's ``qkv_proj``
      (queries, then keys, then values) or ``gate_up_proj`` (gate, then up).
    sizes: the widths of the parts, in order.

  Returns:
    The parts, ``[..., sizes[i]]`` each.
  """
  if x.shape[-1] != sum(sizes):
    raise ValueError(f'a fused projection of width {x.shape[-1]} cannot be '
                     f'split into {tuple(sizes)}')
  bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
  return jnp.split(x, bounds, axis=-1)


def window_mask(causal: jax.Array, key_slots: jax.Array,
                query_slots: jax.Array, window: int) -> jax.Array:
  """Restricts a causal ``[T, S]`` mask to the last ``window`` slots.

  A query in slot ``q`` keeps the keys of slots ``q - window < k <= q`` (as
  transformers' sliding-window masks: itself and ``window - 1`` before).

  Args:
    causal: ``[T, S]`` bool, ``key_slot <= query_slot``.
    key_slots: ``[S]`` int, the slot of each key.
    query_slots: ``[T]`` int, the slot of each query.
    window: the number of slots a query sees, >= 1.

  Returns:
    ``[T, S]`` bool.
  """
  return causal & (key_slots[None, :] > query_slots[:, None] - window)


def cache_slots(attention_mask: jax.Array, cache: Any,
                positions: jax.Array | None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array,
                           jax.Array]:
  """Where a decoder call's tokens sit, with or without a KV cache.

  Args:
    attention_mask: ``[B, T]`` bool, the call's real tokens.
    cache: a ``llama.KVCache`` being extended (its ``valid`` ``[B, S]`` and
      write ``index``), or None.
    positions: ``[B, T]`` RoPE positions, or None for the count of real
      tokens before each one (cached ones included).

  Returns:
    ``(positions [B, T], key_valid [B, S], index, key_slots [S],
    query_slots [T])``; without a cache ``S = T`` and ``index = 0``.
  """
  b, t = attention_mask.shape
  if cache is None:
    prior = jnp.zeros((b, 1), jnp.int32)
    key_valid, index = attention_mask, jnp.zeros((), jnp.int32)
    key_slots = jnp.arange(t)
  else:
    prior = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
    index = cache.index
    key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask,
                                             (0, index))
    key_slots = jnp.arange(cache.valid.shape[1])
  if positions is None:
    positions = prior + jnp.cumsum(attention_mask, 1, dtype=jnp.int32) - 1
    positions = jnp.maximum(positions, 0)
  return positions, key_valid, index, key_slots, index + jnp.arange(t)
