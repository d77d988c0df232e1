"""The hyper-parameters of a BERT-family encoder (``lorajax.models.bert``).

``BertConfig`` covers BERT, RoBERTa and DistilBERT shapes with their heads,
pooling and activation, and checks its fields when made. It is importable
from ``lorajax.models.bert`` too.

Example:

  >>> BertConfig.minilm_l6().num_layers
  6
  >>> BertConfig.minilm_l6(pooling='max')
  Traceback (most recent call last):
  ...
  ValueError: pooling='max'; expected one of ('cls', 'mean')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from lorajax.models import remat as remat_lib

Dtype = Any
# What ``BertConfig.pooling`` may be: the [CLS] pooler, or the token mean.
POOLINGS = ('cls', 'mean')
# What ``BertConfig.head`` may be: BERT's pooler + classifier, or the
# first-token heads of RoBERTa (tanh) and DistilBERT (ReLU).
HEADS = ('bert', 'roberta', 'distilbert')
# What ``BertConfig.hidden_act`` may be: erf GELU (BERT) or ReLU.
ACTIVATIONS = ('gelu', 'relu')


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder with a classification head.

  Attributes:
    vocab_size: number of WordPiece tokens.
    hidden_size: width H of the residual stream.
    num_layers: number of transformer blocks.
    num_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: width of the feed-forward hidden layer.
    max_position: number of learned position embeddings (longest input).
    type_vocab_size: number of token types (segments); 0 means the model
      has no token-type table (DistilBERT) and ``token_type_ids`` are
      ignored.
    layer_norm_eps: epsilon of every LayerNorm.
    hidden_dropout: dropout rate on embeddings and block outputs.
    attention_dropout: dropout rate on attention probabilities.
    classifier_dropout: dropout rate before the classifier; ``None`` uses
      ``hidden_dropout``.
    num_labels: output width of the classifier.
    initializer_range: stddev of the normal initializer of kernels and
      embeddings.
    dtype: compute dtype; parameters are cast to it where they are used (as
      ``nn.Dense(dtype=...)`` does). Softmax and LayerNorm statistics stay in
      float32, and ``logits`` are returned in float32.
    param_dtype: dtype of freshly initialized parameters.
    lean_backward: compute attention and GELU with ``lorajax.models.ops``:
      the same values, with custom derivatives that keep only what the
      backward pass needs (on a MiniLM LoRA step, 0.93 GB of XLA temporaries
      instead of 1.46 GB). False differentiates the plain formulas.
    save_attention_probs: with ``lean_backward``, keep the attention
      probabilities for the backward pass instead of recomputing them from
      ``q`` and ``k`` (one more ``q·kᵀ`` per layer, about 1.4% of a step's
      FLOPs, for ``[B, heads, T, T]`` less memory per layer).
    pooling: the classifier's input. ``'cls'``: the pooler (dense + tanh)
      on ``[CLS]``, then dropout, as ``BertForSequenceClassification``.
      ``'mean'``: the float32 mean of the real tokens' hidden states, no
      dropout, classifier in float32 (the pooler's parameters still exist,
      unused).
    head: ``'bert'`` (pooler, then ``classifier``), ``'roberta'``
      (``RobertaClassificationHead``: ``classifier/dense`` + tanh on the
      first token, then ``classifier/out_proj``; no pooler parameters) or
      ``'distilbert'`` (the same two denses with ReLU, as
      ``DistilBertForSequenceClassification``'s ``pre_classifier`` and
      ``classifier``; dropout only after the ReLU).
    hidden_act: the feed-forward activation, one of ``ACTIVATIONS``.
    cls_readout: a classifier that reads ``[CLS]`` (``pooling='cls'``, any
      ``head``) takes it from a second run of the last layer with ``[CLS]``
      as the only query; under ``jit`` the whole-sequence last layer is then
      dead code when only the logits are used (MiniLM q/v LoRA at 32×128:
      191.1 → 163.8 XLA GFLOP a step). False runs the last layer for every
      token and reads its ``[CLS]`` row, as transformers does; the logits
      agree to float rounding.
    position_padding_idx: None numbers positions ``0..T-1`` (BERT). An id
      numbers them as RoBERTa does: tokens other than this id get
      ``padding_idx + 1, padding_idx + 2, ...``, padding gets
      ``padding_idx``; ``max_position`` then counts those offset slots.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float | None = None
  num_labels: int = 2
  initializer_range: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lean_backward: bool = True
  save_attention_probs: bool = False
  pooling: str = 'cls'
  head: str = 'bert'
  position_padding_idx: int | None = None
  hidden_act: str = 'gelu'
  remat: str = 'none'
  cls_readout: bool = True

  def __post_init__(self):
    object.__setattr__(self, 'remat', remat_lib.check(self.remat))
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f'hidden_size={self.hidden_size} is not divisible by '
          f'num_heads={self.num_heads}')
    if self.num_labels < 1:
      raise ValueError(f'num_labels={self.num_labels}; expected >= 1')
    if self.pooling not in POOLINGS:
      raise ValueError(f'pooling={self.pooling!r}; expected one of '
                       f'{POOLINGS}')
    if self.head not in HEADS:
      raise ValueError(f'head={self.head!r}; expected one of {HEADS}')
    if self.head != 'bert' and self.pooling != 'cls':
      raise ValueError(f'head={self.head!r} reads the first token; '
                       f'pooling={self.pooling!r} is not implemented for it')
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act={self.hidden_act!r}; expected one of '
                       f'{ACTIVATIONS}')
    # Normalise 'bfloat16' / jnp.bfloat16 / np.dtype to one hashable np.dtype.
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    object.__setattr__(self, 'param_dtype', jnp.dtype(self.param_dtype))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def minilm_l6(cls, **overrides: Any) -> BertConfig:
    """all-MiniLM-L6-v2: 6 layers, H=384, 12 heads, FFN 1536 (22.7M params)."""
    fields = dict(hidden_size=384, num_layers=6, num_heads=12,
                  intermediate_size=1536)
    return cls(**(fields | overrides))

  @classmethod
  def bert_base(cls, **overrides: Any) -> BertConfig:
    """BERT-base: 12 layers, H=768, 12 heads, FFN 3072 (109.5M params)."""
    fields = dict(hidden_size=768, num_layers=12, num_heads=12,
                  intermediate_size=3072)
    return cls(**(fields | overrides))

  def replace(self, **changes: Any) -> BertConfig:
    """Returns a copy with ``changes`` applied."""
    return dataclasses.replace(self, **changes)
