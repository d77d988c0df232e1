"""A BERT encoder in plain Flax linen, laid out like Hugging Face's BERT.

The module is ``BertForSequenceClassification`` without the framework around
it: learned word, position and token-type embeddings with a post-LayerNorm,
``num_layers`` self-attention blocks, a pooler (dense + tanh on ``[CLS]``) and
a ``classifier`` dense on the pooled output. ``BertConfig.pooling='mean'``
feeds the classifier the mean of the real tokens' hidden states instead (how
sentence-transformers pools all-MiniLM-L6-v2); transformers has no sequence
classifier that pools so, and the Hugging Face exports refuse it. Every
projection is a plain ``nn.Dense`` with a 2-D kernel ``[in, out]``, so
Hugging Face weights map one to one (transposed) and LoRA rules such as
``.*/attention/(query|value)/kernel`` match without touching this file.

Parameter paths (under the ``'params'`` collection)::

  embeddings/{word,position,token_type}_embeddings/embedding
  embeddings/ln/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_{i}/attention/output_ln/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}
  encoder/layer_{i}/output_ln/{scale,bias}
  pooler/{kernel,bias}
  classifier/{kernel,bias}

``BertConfig.head='roberta'`` is RoBERTa's classification head instead of
the pooler and classifier (``classifier/dense/*``, ``classifier/out_proj/*``:
dense + tanh on the first token, then the output dense), and
``position_padding_idx`` numbers positions as RoBERTa does (from
``padding_idx + 1`` over the tokens that are not padding).

Prompt and prefix tuning enter as optional call arguments (``prompt=``,
``prefix=``, see ``lorajax.methods.prompts``); without them the model is the
plain encoder.

Example:

  >>> config = BertConfig.minilm_l6(num_labels=2)
  >>> model = Bert(config)
  >>> ids = jnp.ones((2, 8), jnp.int32)
  >>> variables = model.init(jax.random.key(0), ids)
  >>> model.apply(variables, ids).logits.shape
  (2, 2)
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax.models import ops
from lorajax.models import remat as remat_lib
# The config lives in its own module; these names stay importable from here.
from lorajax.models.bert_config import ACTIVATIONS  # pylint: disable=unused-import  # noqa
from lorajax.models.bert_config import BertConfig
from lorajax.models.bert_config import HEADS  # pylint: disable=unused-import
from lorajax.models.bert_config import POOLINGS  # pylint: disable=unused-import


class BertOutput(NamedTuple):
  """What ``Bert`` returns.

  Attributes:
    logits: ``[B, num_labels]`` classifier output, float32.
    pooled: ``[B, H]`` what the classifier reads: the pooler output (tanh
      of a dense on ``[CLS]``), or with ``pooling='mean'`` the float32 mean
      of the real tokens.
    hidden: ``[B, T, H]`` last hidden states, in the compute dtype.
  """
  logits: jax.Array
  pooled: jax.Array
  hidden: jax.Array


def kernel_init(config: BertConfig) -> nn.initializers.Initializer:
  """The initializer of every kernel and embedding: N(0, initializer_range)."""
  return nn.initializers.normal(stddev=config.initializer_range)


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=config.dtype, param_dtype=config.param_dtype,
                  kernel_init=kernel_init(config), name=name)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype,
                      param_dtype=config.param_dtype, name=name)


class BertEmbeddings(nn.Module):
  """Word + position (+ token-type) embeddings, LayerNorm, dropout."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *,
               deterministic: bool,
               prompt: jax.Array | None = None) -> jax.Array:
    """Embeds ``[B, T]`` ids into ``[B, T, H]`` (``[B, n + T, H]`` with an
    ``[n, H]`` or ``[B, n, H]`` ``prompt`` prepended to the word embeddings;
    its positions come first and its token type is 0)."""
    cfg = self.config

    def embed(num, name):
      return nn.Embed(num, cfg.hidden_size, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype,
                      embedding_init=kernel_init(cfg), name=name)

    words = embed(cfg.vocab_size, 'word_embeddings')(input_ids)
    if prompt is not None:
      batch, n = input_ids.shape[0], prompt.shape[-2]
      prompt = jnp.broadcast_to(prompt.astype(words.dtype),
                                (batch, n, cfg.hidden_size))
      words = jnp.concatenate([prompt, words], axis=1)
      token_type_ids = jnp.concatenate(
          [jnp.zeros((batch, n), token_type_ids.dtype), token_type_ids], 1)
    positions = jnp.arange(words.shape[1])[None, :]
    if cfg.position_padding_idx is not None:  # RoBERTa: from the ids.
      real = (input_ids != cfg.position_padding_idx).astype(jnp.int32)
      if prompt is not None:
        real = jnp.concatenate([jnp.ones((batch, n), jnp.int32), real], 1)
      positions = jnp.cumsum(real, 1) * real + cfg.position_padding_idx
    x = words + embed(cfg.max_position, 'position_embeddings')(positions)
    if cfg.type_vocab_size:
      x = x + embed(cfg.type_vocab_size,
                    'token_type_embeddings')(token_type_ids)
    x = _layer_norm(cfg, 'ln')(x)
    return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention, output projection, residual and LayerNorm."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *,
               deterministic: bool,
               prefix: jax.Array | None = None,
               query_at: int | None = None) -> jax.Array:
    """Attends ``x`` ``[B, T, H]`` over the real tokens of ``mask``.

    ``prefix`` ``[2, n, heads, head_dim]`` (keys, values) is prepended to
    the keys and values; every query sees it. ``query_at``: only the token
    at that position queries (keys and values are still every token's);
    the result is ``[B, 1, H]``, that token's row of the whole result.
    """
    cfg = self.config
    batch = x.shape[0]
    xq = x if query_at is None else x[:, query_at:query_at + 1]

    def heads(name, inputs):
      y = _dense(cfg, cfg.hidden_size, name)(inputs)
      return y.reshape(batch, inputs.shape[1], cfg.num_heads, cfg.head_dim)

    q, k, v = heads('query', xq), heads('key', x), heads('value', x)
    length = xq.shape[1]
    if prefix is not None:
      n = prefix.shape[1]
      pk, pv = (jnp.broadcast_to(p.astype(k.dtype), (batch, *p.shape))
                for p in (prefix[0], prefix[1]))
      k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
      mask = jnp.concatenate([jnp.ones((batch, n), bool), mask], 1)
    if cfg.lean_backward:
      rng = None
      if not deterministic and cfg.attention_dropout > 0.0:
        rng = self.make_rng('dropout')
      context = ops.attention(q, k, v, mask,
                              dropout_rate=cfg.attention_dropout,
                              dropout_rng=rng,
                              save_probs=cfg.save_attention_probs)
    else:
      scores = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                          preferred_element_type=jnp.float32)
      scores = scores / np.sqrt(cfg.head_dim).astype(np.float32)
      # A fully masked row becomes uniform rather than NaN.
      scores = jnp.where(mask[:, None, None, :], scores,
                         jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
      probs = nn.Dropout(cfg.attention_dropout)(
          probs, deterministic=deterministic)
      context = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    context = context.reshape(batch, length, cfg.hidden_size)
    y = _dense(cfg, cfg.hidden_size, 'output')(context)
    y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
    return _layer_norm(cfg, 'output_ln')(y + xq)


class BertLayer(nn.Module):
  """One post-LN transformer block: attention, then a GELU feed-forward.

  Its arguments may be given by position (``nn.remat`` picks the static
  ``deterministic`` by position).
  """
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool,
               prefix: jax.Array | None = None,
               query_at: int | None = None) -> jax.Array:
    """``[B, T, H]``, or with ``query_at`` only that token's ``[B, 1, H]``
    row (see ``BertSelfAttention``)."""
    cfg = self.config
    x = BertSelfAttention(cfg, name='attention')(
        x, mask, deterministic=deterministic, prefix=prefix,
        query_at=query_at)
    h = _dense(cfg, cfg.intermediate_size, 'intermediate')(x)
    if cfg.hidden_act == 'relu':
      h = jax.nn.relu(h)
    elif cfg.lean_backward:
      h = ops.gelu(h)
    else:
      h = nn.gelu(h, approximate=False)
    h = _dense(cfg, cfg.hidden_size, 'output')(h)
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    return _layer_norm(cfg, 'output_ln')(h + x)


class BertEncoder(nn.Module):
  """``num_layers`` blocks named ``layer_0`` ... ``layer_{N-1}``."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *,
               deterministic: bool,
               prefix: jax.Array | None = None,
               first_at: int | None = None
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The last layer's ``[B, T, H]`` states; with ``first_at``, also the
    token at ``first_at``'s ``[B, H]`` state from a second run of the last
    layer with that one query (the same parameters).

    A classifier that reads one token needs only that token's row of the
    last layer: the second run computes its query projection, attention
    row, output projection and feed-forward for one token instead of
    ``T``. Under ``jit``, when the caller uses only that row, the whole
    last layer is dead code and XLA drops it.
    """
    # deterministic (argument 3, self is 0) and query_at (argument 5) are
    # Python values: static.
    layer_cls = remat_lib.wrap(BertLayer, self.config.remat,
                               static_argnums=(3, 5))
    last = self.config.num_layers - 1
    for i in range(last):
      x = layer_cls(self.config, name=f'layer_{i}')(
          x, mask, deterministic,
          None if prefix is None else prefix[i], None)
    layer = layer_cls(self.config, name=f'layer_{last}')
    prefix_last = None if prefix is None else prefix[last]
    hidden = layer(x, mask, deterministic, prefix_last, None)
    if first_at is None:
      return hidden
    first = layer(x, mask, deterministic, prefix_last, first_at)
    return hidden, first[:, 0]


class FirstTokenHead(nn.Module):
  """A classifier on the first token: RoBERTa's (dropout, dense + tanh,
  dropout, ``out_proj``) or DistilBERT's (dense + ReLU, dropout,
  ``out_proj``), by ``config.head``."""
  config: BertConfig

  @nn.compact
  def __call__(self, first: jax.Array, *, deterministic: bool
               ) -> tuple[jax.Array, jax.Array]:
    """Maps the first token's ``[B, H]`` state to ``(logits, pooled)``."""
    cfg = self.config
    rate = (cfg.hidden_dropout if cfg.classifier_dropout is None
            else cfg.classifier_dropout)
    if cfg.head == 'distilbert':
      pooled = jax.nn.relu(_dense(cfg, cfg.hidden_size, 'dense')(first))
    else:
      h = nn.Dropout(rate)(first, deterministic=deterministic)
      pooled = jnp.tanh(_dense(cfg, cfg.hidden_size, 'dense')(h))
    h = nn.Dropout(rate)(pooled, deterministic=deterministic)
    return _dense(cfg, cfg.num_labels, 'out_proj')(h), pooled


class Bert(nn.Module):
  """BERT encoder with pooler and sequence classifier.

  Attributes:
    config: the ``BertConfig``.
  """
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *,
               deterministic: bool = True,
               prompt: jax.Array | None = None,
               prefix: jax.Array | None = None) -> BertOutput:
    """Runs the encoder.

    Args:
      input_ids: ``[B, T]`` integer token ids, ``T <= max_position``.
      attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding;
        ``None`` means every token is real.
      token_type_ids: ``[B, T]`` segment ids; ``None`` means all zeros.
      deterministic: disables dropout when True. When False, pass
        ``rngs={'dropout': key}`` to ``apply``.
      prompt: prompt tuning: ``[n, H]`` (or ``[B, n, H]``) learned embeddings
        prepended to the word embeddings (positions ``0..n-1``; the tokens
        follow). Every token attends to them; they are dropped from
        ``hidden`` and the pooler reads the real ``[CLS]``.
      prefix: prefix tuning: ``[num_layers, 2, n, num_heads, head_dim]``
        learned keys and values prepended in every layer's attention.

    Returns:
      A ``BertOutput`` with ``logits`` ``[B, num_labels]``, ``pooled``
      ``[B, H]`` and ``hidden`` ``[B, T, H]`` (the real tokens only).
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(
          f'input_ids has shape {input_ids.shape}; expected [batch, length]')
    n_prompt = 0 if prompt is None else prompt.shape[-2]
    if input_ids.shape[1] + n_prompt > cfg.max_position:
      raise ValueError(
          f'input length {input_ids.shape[1]} (+ {n_prompt} prompt tokens) '
          f'exceeds max_position={cfg.max_position}')
    if prompt is not None and prompt.shape[-1] != cfg.hidden_size:
      raise ValueError(f'prompt has shape {prompt.shape}; expected '
                       f'[n, {cfg.hidden_size}]')
    want = (cfg.num_layers, 2, cfg.num_heads, cfg.head_dim)
    if prefix is not None and (prefix.ndim != 5 or
                               prefix.shape[:2] + prefix.shape[3:] != want):
      raise ValueError(
          f'prefix has shape {prefix.shape}; expected [{want[0]}, 2, n, '
          f'{want[2]}, {want[3]}] (layers, keys/values, length, heads, '
          f'head_dim)')
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    mask = attention_mask.astype(bool)
    if n_prompt:
      mask = jnp.concatenate(
          [jnp.ones((mask.shape[0], n_prompt), bool), mask], axis=1)

    x = BertEmbeddings(cfg, name='embeddings')(
        input_ids, token_type_ids, deterministic=deterministic, prompt=prompt)
    # The classifier reads the first real token ([CLS]) unless it mean-pools;
    # with cls_readout the encoder also runs that token's row of the last
    # layer alone.
    readout = cfg.cls_readout and cfg.pooling == 'cls'
    out = BertEncoder(cfg, name='encoder')(
        x, mask, deterministic=deterministic, prefix=prefix,
        first_at=n_prompt if readout else None)
    hidden, first = out if readout else (out, out[:, n_prompt])
    hidden = hidden[:, n_prompt:]
    if cfg.head != 'bert':
      logits, pooled = FirstTokenHead(cfg, name='classifier')(
          first, deterministic=deterministic)
      return BertOutput(logits=logits.astype(jnp.float32), pooled=pooled,
                        hidden=hidden)
    # The pooler runs (and has parameters) with either pooling, so one
    # checkpoint fits both; unused, jit drops it.
    pooled = jnp.tanh(_dense(cfg, cfg.hidden_size, 'pooler')(first))
    if cfg.pooling == 'mean':
      pooled = mean_pool(hidden, attention_mask)
      logits = nn.Dense(cfg.num_labels, dtype=jnp.float32,
                        param_dtype=cfg.param_dtype,
                        kernel_init=kernel_init(cfg), name='classifier')(pooled)
    else:
      rate = (cfg.hidden_dropout if cfg.classifier_dropout is None
              else cfg.classifier_dropout)
      h = nn.Dropout(rate)(pooled, deterministic=deterministic)
      logits = _dense(cfg, cfg.num_labels, 'classifier')(h)
    return BertOutput(logits=logits.astype(jnp.float32), pooled=pooled,
                      hidden=hidden)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Averages hidden states over the real tokens.

  Args:
    hidden: ``[B, T, H]`` hidden states.
    attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding.

  Returns:
    ``[B, H]`` float32 means; a row without real tokens gives zeros.
  """
  mask = attention_mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=-2)
  return total / jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)


def sentence_embedding(hidden: jax.Array,
                       attention_mask: jax.Array) -> jax.Array:
  """Mean-pools then L2-normalises: how all-MiniLM-L6-v2 embeds sentences.

  Args:
    hidden: ``[B, T, H]`` last hidden states (``BertOutput.hidden``).
    attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding.

  Returns:
    ``[B, H]`` float32 unit vectors; their dot product is cosine similarity.
  """
  pooled = mean_pool(hidden, attention_mask)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)
