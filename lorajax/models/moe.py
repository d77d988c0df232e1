"""A plain Flax linen mixture-of-experts decoder (Mixtral, Qwen3-MoE).

The attention, norms, RoPE and KV cache are those of
``lorajax.models.llama``; each layer's SwiGLU MLP is replaced by a sparse
mixture of ``num_experts`` SwiGLU experts. A router picks, per token, the
``experts_per_token`` experts of highest softmax probability (softmax and
top-k in float32) and sums their outputs weighted by those probabilities,
renormalized to sum to one when ``norm_topk`` (Mixtral always; Qwen3-MoE
when ``norm_topk_prob``).

Parameter paths of a layer (under ``'params'``)::

  layers_{i}/attn/...                          as in ``llama.Llama``
  layers_{i}/mlp/gate/kernel                   [d, E]       the router
  layers_{i}/mlp/experts/gate_up_proj/kernel   [E, d, 2f]   gate | up
  layers_{i}/mlp/experts/down_proj/kernel      [E, f, d]

(``f`` is ``expert_size``; the gate half comes first, as transformers'
fused ``gate_up_proj``.) The experts are computed densely: every expert
sees every token, ``einsum('end,edf->enf')`` with the expert axis ``e`` a
batch axis of the ``dot_general``, and the router's weights (zero for the
experts a token did not pick) mix the results. That costs
``E / experts_per_token`` times the FLOPs of a sparse dispatch, and in
exchange the LoRA rewrite sees one batched kernel whose expert axis is a
batch axis, so a LoRA rule on ``.*/experts/.*`` gives each expert its own
adapter (``a`` ``[E, in, r]``, ``b`` ``[E, r, out]``).

Decoding follows ``llama.Llama``: ``cache_len=M`` starts a ``KVCache`` and
returns ``(logits, cache)``; ``cache=`` extends one.

Example:

  >>> config = MoeConfig.tiny()
  >>> model = MoeDecoder(config)
  >>> tokens = jnp.zeros((1, 4), jnp.int32)
  >>> params = model.init(jax.random.key(0), tokens)['params']
  >>> params['layers_0']['mlp']['experts']['down_proj']['kernel'].shape
  (4, 16, 32)
  >>> model.apply({'params': params}, tokens).shape
  (1, 4, 256)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorajax.models import decoder_parts
from lorajax.models import llama
from lorajax.models import remat as remat_lib


@dataclasses.dataclass(frozen=True)
class MoeConfig(llama.LlamaConfig):
  """A ``LlamaConfig`` whose MLPs are mixtures of experts.

  Attributes (beyond ``LlamaConfig``'s; its ``intermediate_size`` is
  unused):
    num_experts: experts per layer ``E``.
    experts_per_token: how many experts each token uses (top-k).
    expert_size: the SwiGLU width ``f`` of one expert.
    norm_topk: divide the top-k probabilities by their sum.
  """
  num_experts: int = 4
  experts_per_token: int = 2
  expert_size: int = 16
  norm_topk: bool = True

  def __post_init__(self):
    super().__post_init__()
    if not 1 <= self.experts_per_token <= self.num_experts:
      raise ValueError(f'experts_per_token={self.experts_per_token}; '
                       f'expected 1..num_experts={self.num_experts}')

  @classmethod
  def tiny(cls, **overrides) -> MoeConfig:
    """A 2-layer, d=32 model with 4 experts of width 16, for tests."""
    kw = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=64,
              rope_base=10000.0, rms_eps=1e-5, max_position=128,
              num_experts=4, experts_per_token=2, expert_size=16)
    return cls(**{**kw, **overrides})


def routing_weights(logits: jax.Array, k: int, normalize: bool
                    ) -> jax.Array:
  """Dense ``[N, E]`` float32 weights: the top-k softmax probabilities of
  each row at their experts, zero elsewhere.

  Args:
    logits: ``[N, E]`` router logits.
    k: experts per token.
    normalize: rescale each row's k probabilities to sum to one.

  >>> w = routing_weights(jnp.log(jnp.array([[.1, .6, .3]])), 2, True)
  >>> [round(float(v), 2) for v in w[0]]
  [0.0, 0.67, 0.33]
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top, index = jax.lax.top_k(probs, k)
  if normalize:
    top = top / jnp.sum(top, -1, keepdims=True)
  picked = jax.nn.one_hot(index, logits.shape[-1], dtype=jnp.float32)
  return jnp.einsum('nk,nke->ne', top, picked)


class _Kernel(nn.Module):
  """One parameter named ``kernel`` (so that its path ends in ``/kernel``)."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param('kernel', nn.initializers.normal(0.02), self.shape,
                      jnp.float32)


class Experts(nn.Module):
  """``E`` SwiGLU experts applied densely: ``[N, d]`` -> ``[E, N, d]``."""
  config: MoeConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.expert_size
    w_gu = _Kernel((e, d, 2 * f), name='gate_up_proj')()
    w_down = _Kernel((e, f, d), name='down_proj')()
    # The expert axis is a batch axis of both dot_generals.
    xe = jnp.broadcast_to(x.astype(cfg.dtype), (e, *x.shape))
    h = jnp.einsum('end,edf->enf', xe, w_gu.astype(cfg.dtype))
    h = nn.silu(h[..., :f]) * h[..., f:]
    return jnp.einsum('enf,efd->end', h, w_down.astype(cfg.dtype))


class SparseMoe(nn.Module):
  """Router (``gate``) and ``experts``: ``[B, T, d]`` -> ``[B, T, d]``."""
  config: MoeConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    # The router runs in float32: its top-k decides which experts count.
    router = nn.Dense(cfg.num_experts, use_bias=False, dtype=jnp.float32,
                      name='gate', kernel_init=nn.initializers.normal(0.02))
    weights = routing_weights(router(flat), cfg.experts_per_token,
                              cfg.norm_topk).astype(cfg.dtype)
    y = Experts(cfg, name='experts')(flat)
    return jnp.einsum('ne,end->nd', weights, y).reshape(b, t, d)


class MoeLayer(nn.Module):
  """Pre-norm attention (``llama.Attention``) and sparse-MoE blocks with
  residuals; returns ``(h, layer_cache)`` for ``nn.scan``."""
  config: MoeConfig

  @nn.compact
  def __call__(self, h: jax.Array, layer_cache: Any,
               rope: tuple[jax.Array, jax.Array], mask: jax.Array,
               index: jax.Array) -> tuple[jax.Array, Any]:
    cfg = self.config
    norm = lambda name: llama.RMSNorm(cfg.rms_eps, cfg.dtype, name=name)  # pylint: disable=unnecessary-lambda-assignment
    attn_out, layer_cache = llama.Attention(cfg, name='attn')(
        norm('attn_norm')(h), rope, mask, layer_cache, index)
    h = h + attn_out
    h = h + SparseMoe(cfg, name='mlp')(norm('mlp_norm')(h))
    return h, layer_cache


def attention_mask_and_positions(
    attention_mask: jax.Array, cache: llama.KVCache | None,
    positions: jax.Array | None, segment_ids: jax.Array | None,
    sliding_window: int | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """What a decoder call attends to, as ``llama.Llama`` computes it.

  Args:
    attention_mask: ``[B, T]`` bool, real tokens.
    cache: the cache being extended, or None.
    positions: ``[B, T]`` RoPE positions, or None for the count of real
      tokens before each one (cached ones included).
    segment_ids: ``[B, T]`` packed-sequence ids, or None.
    sliding_window: Mistral-style window, or None.

  Returns:
    ``(mask [B, T, S], positions [B, T], key_valid [B, S], index)``.
  """
  positions, key_valid, index, key_slots, query_slots = (
      decoder_parts.cache_slots(attention_mask, cache, positions))
  causal = key_slots[None, :] <= query_slots[:, None]
  if sliding_window is not None:
    causal = causal & (key_slots[None, :] > query_slots[:, None]
                       - sliding_window)
  mask = causal[None] & key_valid[:, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask, positions, key_valid, index


class MoeDecoder(nn.Module):
  """Mixture-of-experts causal language model.

  Call: ``model.apply({'params': params}, tokens, *, positions=None,
  attention_mask=None, cache=None, cache_len=None, segment_ids=None,
  hidden_only=False)``, the arguments of ``llama.Llama`` of the same names
  (prompt and prefix tuning are not implemented for this model).

  Returns:
    ``logits`` ``[B, T, vocab]`` float32 (the final-normed hidden states
    ``[B, T, d]`` with ``hidden_only``), or ``(logits, new_cache)`` when
    ``cache`` or ``cache_len`` is given.
  """
  config: MoeConfig

  @nn.compact
  def __call__(self, tokens, *, positions=None, attention_mask=None,
               cache: llama.KVCache | None = None,
               cache_len: int | None = None,
               segment_ids: jax.Array | None = None,
               hidden_only: bool = False):
    cfg = self.config
    b, t = tokens.shape
    if segment_ids is not None:
      if cache is not None or cache_len is not None:
        raise ValueError('segment_ids= (packed sequences) works without a '
                         'cache')
      segment_ids = segment_ids.astype(jnp.int32)
      if attention_mask is None:
        attention_mask = segment_ids > 0
      if positions is None:
        positions = llama.segment_positions(segment_ids)
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    if cache is None and cache_len is not None:
      cache = llama.init_cache(cfg, b, cache_len)
    mask, positions, key_valid, index = attention_mask_and_positions(
        attention_mask.astype(bool), cache, positions, segment_ids,
        cfg.sliding_window)
    rope = llama.rope_tables(positions, cfg.head_dim, cfg.rope_base,
                             cfg.rope_scaling)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                     embedding_init=nn.initializers.normal(0.02), name='embed')
    h = embed(tokens)
    kv = None if cache is None else (cache.keys, cache.values)
    layer_cls = remat_lib.wrap(MoeLayer, cfg.remat,
                               prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(layer_cls, variable_axes={'params': 0},
                      split_rngs={'params': True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.num_layers)
      h, kv = stack(cfg, name='layers')(h, kv, rope, mask, index)
    else:
      new_kv = []
      for i in range(cfg.num_layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        h, layer_kv = layer_cls(cfg, name=f'layers_{i}')(
            h, layer_kv, rope, mask, index)
        new_kv.append(layer_kv)
      if kv is not None:
        kv = (jnp.stack([x[0] for x in new_kv]),
              jnp.stack([x[1] for x in new_kv]))
    h = llama.RMSNorm(cfg.rms_eps, cfg.dtype, name='final_norm')(h)
    if hidden_only:
      logits = h
    elif cfg.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                        name='lm_head',
                        kernel_init=nn.initializers.normal(0.02))(h)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    return logits, llama.KVCache(kv[0], kv[1], key_valid, index + t)
