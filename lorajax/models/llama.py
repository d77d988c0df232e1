"""A plain Flax linen Llama decoder (SmolLM2) and its family variants.

The model is ordinary linen code: every projection is an
``nn.Dense(use_bias=False)`` with a 2-D ``[in, out]`` kernel, so LoRA rules such
as ``.*/(q_proj|v_proj)/kernel`` match it and the jaxpr rewrite sees one
``dot_general`` per kernel. Parameter paths (under the ``'params'``
collection)::

  embed/embedding                       [vocab, d]
  layers_{i}/attn_norm/scale            [d]
  layers_{i}/attn/{q,k,v,o}_proj/kernel [d, h*hd], [d, kv*hd], ..., [h*hd, d]
  layers_{i}/mlp_norm/scale             [d]
  layers_{i}/mlp/{gate,up,down}_proj/kernel
  final_norm/scale                      [d]
  lm_head/kernel                        [d, vocab]  (only when untied)

Optional per family (``LlamaConfig`` fields, all off for Llama/SmolLM2):
``qkv_bias`` adds ``attn/{q,k,v}_proj/bias`` (Qwen2), ``out_bias``
``attn/o_proj/bias``, ``mlp_bias`` ``mlp/{gate,up,down}_proj/bias``,
``qk_norm`` ``attn/{q,k}_norm/scale`` ``[hd]`` (Qwen3: RMSNorm of each head
before RoPE); ``sliding_window`` limits every query to itself and the
``sliding_window - 1`` slots before it (Mistral; with ``sliding_layers``
only on the layers it marks, Gemma2), and ``rope_scaling`` (``Llama3Rope``)
rescales the RoPE frequencies as Llama 3.1 does. Gemma: ``norm_offset=1``
(RMSNorm multiplies by ``1 + scale``), ``scale_embeddings`` (times
``sqrt(d)``), ``activation='gelu_tanh'``; Gemma2 adds ``sandwich_norms``
(``layers_{i}/attn_out_norm/scale`` and ``mlp_out_norm/scale`` on the
outputs of attention and MLP), ``query_scale``, ``attn_softcap`` and
``final_softcap``; Phi-3: ``fused_proj`` (one ``attn/qkv_proj/kernel``
``[d, (h + 2 kv) hd]`` and one ``mlp/gate_up_proj/kernel`` ``[d, 2 f]``, as
transformers stores them) and ``rope_dim`` (RoPE on the first ``rope_dim``
channels of each head). The pieces are in ``decoder_parts``.

With ``scan_layers=True`` the layers are one ``nn.scan`` named ``layers`` and
every layer leaf gains a leading axis of length ``num_layers``
(``layers/attn/q_proj/kernel`` is ``[L, d, h*hd]``); ``llama_layout.scan_params``
and ``unscan_params`` convert between the two layouts.

RoPE is the "rotate half" form of Hugging Face transformers: weights are kept
in the Hugging Face row order (the GGUF loader un-permutes Q and K).

Decoding is functional: ``model.apply(params, tokens, cache_len=M)`` returns
``(logits, cache)`` with a fresh ``KVCache`` of ``M`` slots filled with the
prompt, and ``model.apply(params, next_tokens, cache=cache)`` returns
``(logits, new_cache)``.

Example:

  >>> config = LlamaConfig.tiny()
  >>> model = Llama(config)
  >>> tokens = jnp.zeros((1, 4), jnp.int32)
  >>> params = model.init(jax.random.key(0), tokens)['params']
  >>> model.apply({'params': params}, tokens).shape
  (1, 4, 256)
  >>> logits, cache = model.apply({'params': params}, tokens, cache_len=8)
  >>> logits, cache = model.apply({'params': params}, tokens[:, :1],
  ...                             cache=cache)
  >>> int(cache.index)
  5
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorajax.models import attention
from lorajax.models import decoder_parts
from lorajax.models import remat as remat_lib
# The config and the cache live in their own module; importable from here.
from lorajax.models.llama_config import init_cache
from lorajax.models.llama_config import KVCache
from lorajax.models.llama_config import LlamaConfig
# RoPE lives in its own module; these names stay importable from here.
from lorajax.models.rope import apply_rope
from lorajax.models.rope import Llama3Rope  # pylint: disable=unused-import
from lorajax.models.rope import rope_inv_freq  # pylint: disable=unused-import
from lorajax.models.rope import rope_tables


class RMSNorm(nn.Module):
  """``x / rms(x) * (offset + scale)``, in float32, returned in ``dtype``.

  ``offset`` is 0 for Llama (``scale`` starts at 1) and 1 for Gemma
  (``scale`` starts at 0).
  """
  eps: float
  dtype: Any = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param('scale', init, (x.shape[-1],), jnp.float32)
    if self.offset:
      scale = self.offset + scale.astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (x32 * scale).astype(self.dtype)


def _norm(cfg: LlamaConfig, name: str) -> RMSNorm:
  return RMSNorm(cfg.rms_eps, cfg.dtype, cfg.norm_offset, name=name)


def _dense(features: int, name: str, dtype: Any,
           bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=dtype, name=name,
                  kernel_init=nn.initializers.normal(0.02))


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional layer cache."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
               mask: jax.Array, layer_cache: tuple[jax.Array, jax.Array] | None,
               index: jax.Array, prefix: jax.Array | None = None
               ) -> tuple[jax.Array, Any]:
    """Attends ``x`` ``[B, T, d]`` over itself and the cached keys.

    Args:
      x: normalized hidden states ``[B, T, d]``.
      rope: ``(sin, cos)`` from ``rope_tables``.
      mask: ``[B, T, S]`` bool, which keys each query may see (``S = T``
        without a cache, the cache length with one).
      layer_cache: ``(keys, values)`` ``[B, S, kv_heads, hd]`` or None.
      index: the cache slot of the first of the ``T`` new tokens.
      prefix: ``[2, n, kv_heads, hd]`` learned keys and values put before
        the others (not rotated, not cached); ``mask`` then has ``n + S``
        columns.

    Returns:
      ``([B, T, d] output, updated layer_cache)``.
    """
    cfg = self.config
    b, t, _ = x.shape
    if cfg.fused_proj:  # Phi-3: queries, keys, values from one kernel.
      sizes = (cfg.num_heads * cfg.head_dim,
               *[cfg.num_kv_heads * cfg.head_dim] * 2)
      q, k, v = decoder_parts.split_fused(
          _dense(sum(sizes), 'qkv_proj', cfg.dtype)(x), sizes)
    else:
      q = _dense(cfg.num_heads * cfg.head_dim, 'q_proj', cfg.dtype,
                 cfg.qkv_bias)(x)
      k = _dense(cfg.num_kv_heads * cfg.head_dim, 'k_proj', cfg.dtype,
                 cfg.qkv_bias)(x)
      v = _dense(cfg.num_kv_heads * cfg.head_dim, 'v_proj', cfg.dtype,
                 cfg.qkv_bias)(x)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_eps, cfg.dtype, name='q_norm')(q)
      k = RMSNorm(cfg.rms_eps, cfg.dtype, name='k_norm')(k)
    q = apply_rope(q, *rope)
    k = apply_rope(k, *rope)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if layer_cache is not None:
      cache_k, cache_v = layer_cache
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
      v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
      layer_cache = (k, v)
    if prefix is not None:
      pk, pv = (jnp.broadcast_to(p.astype(k.dtype), (b, *p.shape))
                for p in (prefix[0], prefix[1]))
      k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    # Without a cache, query t sees no key after the prefix's and its own.
    causal_offset = None
    if layer_cache is None:
      causal_offset = 0 if prefix is None else prefix.shape[1]
    out = attention.attend_in_blocks(cfg, q, k, v, mask,
                                     causal_offset=causal_offset)
    out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
    return _dense(cfg.hidden_size, 'o_proj', cfg.dtype,
                  cfg.out_bias)(out), layer_cache


class Mlp(nn.Module):
  """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU when ``act`` is
  SiLU); with ``fused_proj`` gate and up are the halves of ``gate_up``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    f = cfg.intermediate_size
    if cfg.fused_proj:
      gate, up = decoder_parts.split_fused(
          _dense(2 * f, 'gate_up_proj', cfg.dtype)(x), (f, f))
    else:
      gate = _dense(f, 'gate_proj', cfg.dtype, cfg.mlp_bias)(x)
      up = _dense(f, 'up_proj', cfg.dtype, cfg.mlp_bias)(x)
    act = decoder_parts.ACTIVATIONS[cfg.activation]
    return _dense(cfg.hidden_size, 'down_proj', cfg.dtype,
                  cfg.mlp_bias)(act(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm attention and MLP blocks with residuals.

  Returns ``(h, layer_cache)`` so that it can be the body of ``nn.scan``.
  ``local`` (a scanned bool) picks this layer's mask from a stacked
  ``[2, B, T, S]`` pair (all keys, window) when layers differ; None means
  ``mask`` is the layer's own.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, h: jax.Array, layer_cache: Any,
               rope: tuple[jax.Array, jax.Array], mask: jax.Array,
               index: jax.Array, prefix: jax.Array | None = None,
               local: jax.Array | None = None) -> tuple[jax.Array, Any]:
    cfg = self.config
    if local is not None:
      mask = mask[local.astype(jnp.int32)]
    attn_out, layer_cache = Attention(cfg, name='attn')(
        _norm(cfg, 'attn_norm')(h), rope, mask, layer_cache, index, prefix)
    if cfg.sandwich_norms:
      attn_out = _norm(cfg, 'attn_out_norm')(attn_out)
    h = h + attn_out
    mlp_out = Mlp(cfg, name='mlp')(_norm(cfg, 'mlp_norm')(h))
    if cfg.sandwich_norms:
      mlp_out = _norm(cfg, 'mlp_out_norm')(mlp_out)
    return h + mlp_out, layer_cache


class Llama(nn.Module):
  """Llama causal language model.

  Call: ``model.apply({'params': params}, tokens, *, positions=None,
  attention_mask=None, cache=None, cache_len=None, prompt=None,
  prefix=None)``.

  Args (of ``__call__``):
    tokens: ``[B, T]`` int token ids.
    positions: ``[B, T]`` RoPE positions; by default the number of real
      tokens before each token (so left padding is handled), counting those
      already in the cache.
    attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding; default all
      ones. Padding keys are never attended to.
    segment_ids: ``[B, T]`` int, packing: several sequences in a row, each
      with its own id > 0 (0 is padding). A token attends only to earlier
      tokens of its own segment, and by default its position counts from
      the start of its segment. Not allowed with a cache or ``prompt=``.
    cache: a ``KVCache`` to extend; its ``index + T`` must not exceed its
      length (it is not checked under ``jit``).
    cache_len: start a fresh cache of this many slots (ignored if ``cache``
      is given).
    prompt: prompt tuning: ``[n, d]`` (or ``[B, n, d]``) learned embeddings
      put before the tokens' embeddings, as real tokens (positions
      ``0..n-1``, the tokens follow; they fill the first ``n`` slots of a
      fresh cache). Their logits are dropped. Not allowed with ``cache=``:
      the prompt is consumed by the first call.
    prefix: prefix tuning: ``[num_layers, 2, n, kv_heads, hd]`` learned keys
      and values that every query of every layer sees, before the others.
      They are not rotated and not stored in the cache: pass the prefix on
      every call, decoding steps included.
    hidden_only: return the final-normed hidden states ``[B, T, d]``
      (float32) instead of logits (a bare ``LlamaModel``'s output).

  Returns:
    ``logits`` ``[B, T, vocab]`` float32, or ``(logits, new_cache)`` when
    ``cache`` or ``cache_len`` is given.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens, *, positions=None, attention_mask=None,
               cache: KVCache | None = None, cache_len: int | None = None,
               prompt: jax.Array | None = None,
               prefix: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               hidden_only: bool = False):
    cfg = self.config
    b, t = tokens.shape
    if segment_ids is not None:
      if cache is not None or cache_len is not None or prompt is not None:
        raise ValueError('segment_ids= (packed sequences) works without a '
                         'cache and without prompt=')
      segment_ids = segment_ids.astype(jnp.int32)
      if attention_mask is None:
        attention_mask = segment_ids > 0
      if positions is None:
        positions = segment_positions(segment_ids)
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    _check_prompts(cfg, prompt, prefix, cache)
    n_prompt = 0 if prompt is None else prompt.shape[-2]
    if n_prompt:
      attention_mask = jnp.concatenate(
          [jnp.ones((b, n_prompt), bool), attention_mask], 1)
      if positions is not None:
        positions = jnp.concatenate(
            [jnp.broadcast_to(jnp.arange(n_prompt), (b, n_prompt)),
             positions + n_prompt], 1)
      t += n_prompt
    if cache is None and cache_len is not None:
      cache = init_cache(cfg, b, cache_len)
    positions, key_valid, index, key_slots, query_slots = (
        decoder_parts.cache_slots(attention_mask, cache, positions))
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    windowed = None
    if cfg.sliding_window is not None:  # Only the last W slots.
      windowed = decoder_parts.window_mask(causal, key_slots, query_slots,
                                           cfg.sliding_window)
      if cfg.sliding_layers is None:  # Mistral: every layer.
        causal, windowed = windowed, None

    def full_mask(causal):  # [B, T, (n +) S]
      mask = causal[None] & key_valid[:, None, :]
      if segment_ids is not None:  # No attention across packed sequences.
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
      if prefix is not None:  # [B, T, n + S]: the prefix is always visible.
        mask = jnp.concatenate(
            [jnp.ones((b, t, prefix.shape[2]), bool), mask], -1)
      return mask

    mask = full_mask(causal)
    local_mask = None if windowed is None else full_mask(windowed)
    rope = rope_tables(positions, cfg.rope_dim or cfg.head_dim,
                       cfg.rope_base, cfg.rope_scaling)

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                     embedding_init=nn.initializers.normal(0.02), name='embed')
    h = embed(tokens)
    if cfg.scale_embeddings:  # Gemma: sqrt(d), rounded to the compute dtype.
      h = h * jnp.asarray(math.sqrt(cfg.hidden_size), h.dtype)
    if n_prompt:
      h = jnp.concatenate([jnp.broadcast_to(
          prompt.astype(h.dtype), (b, n_prompt, cfg.hidden_size)), h], 1)
    kv = None if cache is None else (cache.keys, cache.values)
    layer_cls = remat_lib.wrap(DecoderLayer, cfg.remat,
                               prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(layer_cls, variable_axes={'params': 0},
                      split_rngs={'params': True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast,
                               0, 0),
                      length=cfg.num_layers)
      local = None
      if local_mask is not None:  # Each layer picks its mask.
        mask = jnp.stack([mask, local_mask])
        local = jnp.asarray(cfg.sliding_layers, bool)
      h, kv = stack(cfg, name='layers')(h, kv, rope, mask, index, prefix,
                                        local)
    else:
      new_kv = []
      for i in range(cfg.num_layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        layer_mask = mask
        if local_mask is not None and cfg.sliding_layers[i]:
          layer_mask = local_mask
        h, layer_kv = layer_cls(cfg, name=f'layers_{i}')(
            h, layer_kv, rope, layer_mask, index,
            None if prefix is None else prefix[i])
        new_kv.append(layer_kv)
      if kv is not None:
        kv = (jnp.stack([x[0] for x in new_kv]),
              jnp.stack([x[1] for x in new_kv]))
    h = _norm(cfg, 'final_norm')(h)
    if hidden_only:
      logits = h
    elif cfg.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = _dense(cfg.vocab_size, 'lm_head', cfg.dtype)(h)
    logits = logits.astype(jnp.float32)[:, n_prompt:]
    if cfg.final_softcap is not None and not hidden_only:
      logits = decoder_parts.softcap(logits, cfg.final_softcap)
    if cache is None:
      return logits
    return logits, KVCache(kv[0], kv[1], key_valid, index + t)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """``[B, T]`` int32 positions that restart at 0 where the segment id
  changes.

  >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
  [[0, 1, 2, 0, 1, 0]]
  """
  t = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - first


def _check_prompts(cfg: LlamaConfig, prompt: jax.Array | None,
                   prefix: jax.Array | None, cache: KVCache | None) -> None:
  """Raises ValueError for prompt / prefix tensors that do not fit."""
  if prompt is not None:
    if cache is not None:
      raise ValueError('prompt= starts a sequence; it cannot extend a cache '
                       '(pass it to the first call, with cache_len=)')
    if prompt.ndim not in (2, 3) or prompt.shape[-1] != cfg.hidden_size:
      raise ValueError(f'prompt has shape {prompt.shape}; expected '
                       f'[n, {cfg.hidden_size}] or [batch, n, '
                       f'{cfg.hidden_size}]')
  want = (cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
  if prefix is not None and (prefix.ndim != 5 or
                             prefix.shape[:2] + prefix.shape[3:] != want):
    raise ValueError(
        f'prefix has shape {prefix.shape}; expected [{want[0]}, 2, n, '
        f'{want[2]}, {want[3]}] (layers, keys/values, length, kv_heads, '
        f'head_dim)')
