"""Grouped-query softmax attention of the decoders, whole or in query blocks.

``attend`` is the attention every ``lorajax.models.llama`` family computes
(``LlamaConfig`` fields ``head_dim``, ``query_scale``, ``attn_softcap``,
``dtype``); ``attend_in_blocks`` runs it over blocks of
``LlamaConfig.attn_chunk`` queries, so a long sequence's ``[heads, T, S]``
scores are never whole in memory (``config.attn_chunk``; figures in
``experiments/bench/lm_memory.py``).

Example:

  >>> from lorajax.models import llama
  >>> cfg = llama.LlamaConfig.tiny(num_heads=4, num_kv_heads=2)
  >>> q = jnp.ones((1, 5, 2, 2, cfg.head_dim))
  >>> kv = jnp.ones((1, 5, 2, cfg.head_dim))
  >>> mask = jnp.tril(jnp.ones((5, 5), bool))[None]
  >>> whole = attend(cfg, q, kv, kv, mask)
  >>> blocks = attend_in_blocks(cfg.replace(attn_chunk=2), q, kv, kv, mask)
  >>> whole.shape, bool(jnp.allclose(whole, blocks))
  ((1, 5, 2, 2, 8), True)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.models import decoder_parts


def attend(cfg: Any, q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array) -> jax.Array:
  """Grouped-query softmax attention of queries ``q`` ``[B, T, kv_heads,
  groups, hd]`` over keys and values ``[B, S, kv_heads, hd]``, where
  ``mask`` ``[B, T, S]`` says which keys each query sees; ``[B, T,
  kv_heads, groups, hd]``."""
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32)
  if cfg.query_scale is None:
    scores = scores / math.sqrt(cfg.head_dim)
  else:
    scores = scores * cfg.query_scale
  if cfg.attn_softcap is not None:
    scores = decoder_parts.softcap(scores, cfg.attn_softcap)
  # A finite fill keeps rows with no visible key (left padding) NaN-free.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
  return jnp.einsum('bkgts,bskd->btkgd', weights, v.astype(cfg.dtype))


def attend_in_blocks(cfg: Any, q: jax.Array, k: jax.Array,
                     v: jax.Array, mask: jax.Array) -> jax.Array:
  """``attend`` over blocks of ``cfg.attn_chunk`` queries (all at once
  when it is 0 or covers ``T``).

  The blocks run under ``lax.map`` and each is rematerialized, so forward
  and backward hold the scores of one block, ``[B, heads, chunk, S]``,
  never ``[B, heads, T, S]``. The last block is padded with queries that
  see no key (their rows are dropped). Each query's row is computed as in
  ``attend``: same softmax over the same keys.
  """
  b, t = q.shape[:2]
  chunk = cfg.attn_chunk
  if not chunk or chunk >= t:
    return attend(cfg, q, k, v, mask)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    q = jnp.pad(q, [(0, 0), (0, pad)] + [(0, 0)] * (q.ndim - 2))
    mask = jnp.pad(mask, [(0, 0), (0, pad), (0, 0)])
  blocks = (q.reshape(b, n, chunk, *q.shape[2:]).swapaxes(0, 1),
            mask.reshape(b, n, chunk, mask.shape[-1]).swapaxes(0, 1))

  @jax.checkpoint
  def block(qm):
    return attend(cfg, qm[0], k, v, qm[1])

  out = jax.lax.map(block, blocks)        # [n, B, chunk, kv_heads, g, hd]
  out = out.swapaxes(0, 1).reshape(b, n * chunk, *out.shape[3:])
  return out[:, :t]
