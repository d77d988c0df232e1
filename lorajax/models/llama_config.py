"""The architecture of a Llama-family decoder, and its decoding cache.

``LlamaConfig`` holds every field of the family (Llama, SmolLM2, Qwen2/3,
Mistral, Gemma/Gemma2, Phi-3: see ``lorajax.models.llama``) and checks them
when made; ``KVCache`` and ``init_cache`` are the preallocated keys and values
of decoding. Both are importable from ``lorajax.models.llama`` too.

Example:

  >>> LlamaConfig.tiny().num_layers
  2
  >>> LlamaConfig.tiny(num_kv_heads=3)
  Traceback (most recent call last):
  ...
  ValueError: num_heads=4 is not a multiple of num_kv_heads=3
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lorajax.models import decoder_parts
from lorajax.models import remat as remat_lib
from lorajax.models.rope import Llama3Rope


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama decoder.

  Attributes:
    vocab_size: number of tokens.
    hidden_size: model width ``d``.
    num_layers: number of decoder layers ``L``.
    num_heads: query heads ``h``.
    num_kv_heads: key/value heads (grouped-query attention); divides
      ``num_heads``.
    head_dim: width of one head ``hd``.
    intermediate_size: width of the SwiGLU MLP.
    rope_base: RoPE frequency base (``rope_theta``).
    rms_eps: RMSNorm epsilon.
    max_position: context length the weights were trained for (informative;
      positions beyond it are not rejected).
    tie_embeddings: if true the LM head is ``h @ embed.T``, else a separate
      ``lm_head`` Dense.
    dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); parameters stay
      float32, logits are returned as float32.
    scan_layers: run the layers as one ``nn.scan`` (stacked parameters).
    remat: what the backward pass keeps of each layer: ``'none'``,
      ``'layer'`` (its input only) or ``'dots'`` (its projections'
      outputs); see ``lorajax.models.remat``. ``True``/``False`` mean
      ``'layer'``/``'none'``.
    attn_chunk: if > 0, attention runs over blocks of this many queries
      (``lorajax.models.attention``: ``lax.map``, each block
      rematerialized), so the ``[heads, T, S]`` scores of a long sequence
      are never whole in memory, forward or backward; every query still
      sees all its keys, so outputs and gradients equal the whole
      computation's (float rounding). 0: one block.
    qkv_bias: the q, k and v projections have biases (Qwen2).
    out_bias: the output projection ``o_proj`` has a bias.
    mlp_bias: the gate, up and down projections have biases.
    qk_norm: RMSNorm (over ``head_dim``) of every query and key head before
      RoPE (Qwen3).
    sliding_window: if set, a query sees only keys fewer than this many
      slots before it (itself included: ``q - window < k <= q``), as
      Mistral's sliding-window attention.
    rope_scaling: ``Llama3Rope`` frequency scaling, or None.
    sliding_layers: with ``sliding_window``, which layers use it (one bool
      a layer, Gemma2's alternation); None: all of them.
    norm_offset: every RMSNorm multiplies by ``norm_offset + scale`` (Gemma
      stores ``scale`` around 0 and uses 1).
    scale_embeddings: multiply the token embeddings by ``sqrt(hidden_size)``
      (in the compute dtype; Gemma).
    activation: the gate activation of the MLP, a key of
      ``decoder_parts.ACTIVATIONS``.
    query_scale: the factor of ``q·k``; None for ``head_dim ** -0.5``
      (Gemma2: ``query_pre_attn_scalar ** -0.5``).
    attn_softcap: if set, attention scores become ``c·tanh(s / c)`` before
      the mask (Gemma2).
    final_softcap: if set, logits become ``c·tanh(z / c)`` (Gemma2).
    sandwich_norms: RMSNorm the outputs of attention and MLP before their
      residual adds (Gemma2's post-attention and post-feed-forward norms).
    fused_proj: one ``qkv_proj`` and one ``gate_up_proj`` kernel instead of
      ``q/k/v_proj`` and ``gate/up_proj`` (Phi-3); no biases then.
    rope_dim: RoPE on the first ``rope_dim`` channels of each head only
      (Phi-3's ``partial_rotary_factor``); None for all ``head_dim``.
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_base: float = 10000.0
  rms_eps: float = 1e-5
  max_position: int = 2048
  tie_embeddings: bool = True
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = 'none'
  attn_chunk: int = 0
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  rope_scaling: Llama3Rope | None = None
  sliding_layers: tuple[bool, ...] | None = None
  norm_offset: float = 0.0
  scale_embeddings: bool = False
  activation: str = 'silu'
  query_scale: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sandwich_norms: bool = False
  fused_proj: bool = False
  rope_dim: int | None = None

  def __post_init__(self):
    object.__setattr__(self, 'remat', remat_lib.check(self.remat))
    if (isinstance(self.attn_chunk, bool) or
        not isinstance(self.attn_chunk, int) or self.attn_chunk < 0):
      raise ValueError(f'attn_chunk={self.attn_chunk!r}: expected an integer '
                       '>= 0 (queries a block; 0: all at once)')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for RoPE')
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f'sliding_window={self.sliding_window}; expected a '
                       'positive number of slots or None')
    if self.sliding_layers is not None and (
        self.sliding_window is None
        or len(self.sliding_layers) != self.num_layers):
      raise ValueError(f'sliding_layers={self.sliding_layers} needs a '
                       f'sliding_window and one entry for each of the '
                       f'{self.num_layers} layers')
    if self.activation not in decoder_parts.ACTIVATIONS:
      raise ValueError(f'activation={self.activation!r}; expected one of '
                       f'{tuple(decoder_parts.ACTIVATIONS)}')
    if self.fused_proj and (self.qkv_bias or self.mlp_bias):
      raise ValueError('fused_proj=True has no q/k/v or MLP biases')
    if self.rope_dim is not None and (
        self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim):
      raise ValueError(f'rope_dim={self.rope_dim}; expected an even number '
                       f'in (0, head_dim={self.head_dim}]')

  @classmethod
  def smollm2_135m(cls, **overrides) -> LlamaConfig:
    """SmolLM2-135M: 30 layers, d=576, 9 heads / 3 KV heads, tied."""
    kw = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
              num_kv_heads=3, head_dim=64, intermediate_size=1536,
              rope_base=100000.0, rms_eps=1e-5, max_position=8192,
              tie_embeddings=True)
    return cls(**{**kw, **overrides})

  @classmethod
  def tiny(cls, **overrides) -> LlamaConfig:
    """A 2-layer, d=32 model for tests."""
    kw = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=64,
              rope_base=10000.0, rms_eps=1e-5, max_position=128)
    return cls(**{**kw, **overrides})

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)


class KVCache(NamedTuple):
  """Preallocated keys and values of all layers.

  Attributes:
    keys: ``[L, B, M, kv_heads, head_dim]`` in the compute dtype.
    values: same shape as ``keys``.
    valid: ``[B, M]`` bool, which slots hold a real (non-padding) token.
    index: int32 scalar, the next free slot (same for the whole batch).
  """
  keys: jax.Array
  values: jax.Array
  valid: jax.Array
  index: jax.Array


def init_cache(config: LlamaConfig, batch_size: int, max_len: int) -> KVCache:
  """Returns an empty cache of ``max_len`` slots."""
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads,
           config.head_dim)
  return KVCache(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype),
                 jnp.zeros((batch_size, max_len), bool),
                 jnp.zeros((), jnp.int32))
