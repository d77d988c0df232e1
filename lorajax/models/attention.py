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
from lorajax.runtime import cpu_attention


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


# Causal attention on the CPU without ``attn_chunk``: blocks of about this
# many queries, at most MAX_CAUSAL_BLOCKS of them (0: never split).
DEFAULT_CAUSAL_BLOCK = 64
CAUSAL_BLOCK = DEFAULT_CAUSAL_BLOCK
MAX_CAUSAL_BLOCKS = 16


def causal_blocks(t: int) -> int:
  """How many query blocks ``attend_in_blocks`` makes of a causal
  attention over ``t`` queries without ``attn_chunk`` (1: all at once).

  On the CPU, ``t // CAUSAL_BLOCK`` (at most ``MAX_CAUSAL_BLOCKS``): each
  block attends only to the keys up to its last query, so the scores the
  causal mask hides above the diagonal are mostly never formed (with ``n``
  blocks, ``(n + 1) / 2n`` of them are), and each block's scores are
  smaller. Measured alone on a 2-core AMD EPYC (2026-12-01,
  ``python -m experiments.bench.attention_groups --part causal``, forward
  and backward of one SmolLM2-135M layer's attention, 9 heads, 3 KV
  heads): 8 × 256 tokens 76.2 ms whole, 54.5 in 2 blocks, 45.3 in 4, 44.0
  in 8, 68.3 in 16; 16 × 128: 28.5 whole, 19.3 in 2; 4 × 512: 185.5
  whole, 96.8 in 4, 80.7 in 8, 95.8 in 16. Blocks of 64 queries were the
  fastest or within 3% of it at each length. On accelerators: 1.

  >>> causal_blocks(256), causal_blocks(100), causal_blocks(4096)
  (4, 1, 16)
  """
  if jax.default_backend() != 'cpu' or CAUSAL_BLOCK <= 0:
    return 1
  return max(1, min(MAX_CAUSAL_BLOCKS, t // CAUSAL_BLOCK))


def fused_applies(cfg: Any, q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether ``attend_in_blocks`` runs the fused CPU kernel
  (``lorajax.runtime.cpu_attention``): float32 attention without a
  softcap, on the CPU, unless ``LORAJAX_CPU_ATTENTION=xla``. A causal
  decoder's kernel never forms the scores above its diagonal."""
  return (cfg.attn_softcap is None
          and all(x.dtype == jnp.float32 for x in (q, k, v))
          and jnp.dtype(cfg.dtype) == jnp.float32
          and cpu_attention.available())


def attend_in_blocks(cfg: Any, q: jax.Array, k: jax.Array,
                     v: jax.Array, mask: jax.Array, *,
                     causal_offset: int | None = None) -> jax.Array:
  """``attend`` over blocks of ``cfg.attn_chunk`` queries (all at once
  when it is 0 or covers ``T``).

  ``causal_offset=n`` says that ``mask`` never lets query ``t`` see a key
  after key ``n + t`` (a causal decoder without a cache, after ``n`` prefix
  keys). Without ``attn_chunk`` the queries then run in ``causal_blocks(T)``
  blocks, unrolled, each over the keys up to its last query's: the keys a
  block skips are masked for all its queries, so every row that sees a key
  is computed as in ``attend``. A row that sees no key at all (a left
  padding query's, whose output nothing reads) is uniform over the block's
  keys instead of all keys.

  Where :func:`fused_applies` (float32 on the CPU), the queries, blocks or
  not, go to the fused kernel of ``lorajax.runtime.cpu_attention`` instead
  (unless ``attn_chunk`` splits them): one pass per sequence and key/value
  head with its scores in cache; with ``causal_offset`` it forms no score
  above the diagonal, and a row that sees no key is uniform over the keys
  up to its own position.

  With ``attn_chunk`` the blocks run under ``lax.map`` and each is
  rematerialized, so forward
  and backward hold the scores of one block, ``[B, heads, chunk, S]``,
  never ``[B, heads, T, S]``. The last block is padded with queries that
  see no key (their rows are dropped). Each query's row is computed as in
  ``attend``: same softmax over the same keys.
  """
  b, t = q.shape[:2]
  chunk = cfg.attn_chunk
  if (not chunk or chunk >= t) and fused_applies(cfg, q, k, v):
    kv_heads, groups, hd = q.shape[2:]
    out = cpu_attention.attention(
        q.reshape(b, t, kv_heads * groups, hd), k, v, mask,
        scale=cfg.query_scale, causal_offset=causal_offset)
    return out.reshape(q.shape)
  if not chunk or chunk >= t:
    blocks = 1 if causal_offset is None else causal_blocks(t)
    if blocks == 1:
      return attend(cfg, q, k, v, mask)
    size = -(-t // blocks)
    outs = []
    for lo in range(0, t, size):
      hi = min(t, lo + size)
      keys = min(k.shape[1], causal_offset + hi)
      outs.append(attend(cfg, q[:, lo:hi], k[:, :keys], v[:, :keys],
                         mask[:, lo:hi, :keys]))
    return jnp.concatenate(outs, axis=1)
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
