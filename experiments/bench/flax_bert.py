"""A user's own BERT classifier in plain Flax linen, and its weight loader.

What someone who brings their own model writes: ``nn.Dense``,
``nn.LayerNorm``, ``nn.gelu`` and a softmax attention, with none of the
hand-written backward passes of lorajax's shipped ``lorajax.models.bert``.
The benchmark puts LoRA on it through ``lorajax.lora`` alone, so the row
measures the transform on a model lorajax has never seen: what the rewrite
finds in its jaxpr by itself (the softmax attention, computed by the fused
CPU kernel; the GELU, which keeps only its input for the backward pass) is
all it gets.

It computes what ``transformers.BertForSequenceClassification`` computes
(exact-erf GELU, LayerNorm eps 1e-12, the pooler on ``[CLS]``), so its loss
equals PEFT's on the same weights. Parameter names spell the Hugging Face
keys with ``_`` for their dots (``encoder_layer_0/attention_self/query/kernel``
is ``bert.encoder.layer.0.attention.self.query.weight`` transposed), which
is how such a user loads a checkpoint (``hf_key``, ``load_params``).

Example:

  >>> model = FlaxBert(hidden_size=32, num_layers=2, num_heads=4,
  ...                  intermediate_size=64, vocab_size=100)
  >>> ids = jnp.zeros((2, 8), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids, jnp.ones_like(ids))
  >>> model.apply(params, ids, jnp.ones_like(ids)).shape
  (2, 2)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from safetensors import safe_open

from lorajax import spec as spec_lib

PyTree = Any


class SelfAttention(nn.Module):
  """Multi-head softmax attention over the sequence, with a padding mask."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, t, h = x.shape
    hd = h // self.num_heads
    q, k, v = (nn.Dense(h, dtype=self.dtype, name=n)(x).reshape(
        b, t, self.num_heads, hd) for n in ('query', 'key', 'value'))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None, :], scores,
                       jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, h)


class Layer(nn.Module):
  """A post-norm BERT block: attention, then the GELU feed-forward."""
  num_heads: int
  intermediate_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = x.shape[-1]

    def norm(name):
      return nn.LayerNorm(epsilon=1e-12, dtype=self.dtype, name=name)

    # Submodules named as Hugging Face's: attention/self, attention/output.
    attn = SelfAttention(self.num_heads, self.dtype, name='attention_self')(
        x, mask)
    attn = nn.Dense(h, dtype=self.dtype, name='attention_output_dense')(attn)
    x = norm('attention_output_LayerNorm')(x + attn)
    y = nn.Dense(self.intermediate_size, dtype=self.dtype,
                 name='intermediate_dense')(x)
    y = nn.Dense(h, dtype=self.dtype,
                 name='output_dense')(nn.gelu(y, approximate=False))
    return norm('output_LayerNorm')(x + y)


class FlaxBert(nn.Module):
  """BERT encoder, pooler and classifier: ``(ids, mask) -> [B, labels]``."""
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  vocab_size: int = 30522
  max_position: int = 512
  num_labels: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array) -> jax.Array:
    t = input_ids.shape[1]
    embed = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                     name='embeddings_word_embeddings')(input_ids)
    embed += nn.Embed(self.max_position, self.hidden_size, dtype=self.dtype,
                      name='embeddings_position_embeddings')(jnp.arange(t))
    embed += nn.Embed(2, self.hidden_size, dtype=self.dtype,
                      name='embeddings_token_type_embeddings')(
                          jnp.zeros_like(input_ids))
    x = nn.LayerNorm(epsilon=1e-12, dtype=self.dtype,
                     name='embeddings_LayerNorm')(embed)
    mask = attention_mask.astype(bool)
    for i in range(self.num_layers):
      x = Layer(self.num_heads, self.intermediate_size, self.dtype,
                name=f'encoder_layer_{i}')(x, mask)
    pooled = jnp.tanh(nn.Dense(self.hidden_size, dtype=self.dtype,
                               name='pooler_dense')(x[:, 0]))
    logits = nn.Dense(self.num_labels, dtype=self.dtype,
                      name='classifier')(pooled)
    return logits.astype(jnp.float32)


# Module names use '_' where Hugging Face nests with '.'; these are the
# ones that keep their underscore.
_KEEP = ('word_embeddings', 'position_embeddings', 'token_type_embeddings')


def hf_key(path: str) -> str:
  """Our parameter path -> the ``BertForSequenceClassification`` key.

  >>> hf_key('encoder_layer_3/attention_self/query/kernel')
  'bert.encoder.layer.3.attention.self.query.weight'
  >>> hf_key('classifier/bias')
  'classifier.bias'
  """
  module, leaf = path.rsplit('/', 1)
  name = module.replace('/', '.')
  for keep in _KEEP:
    name = name.replace(keep, keep.replace('_', '#'))
  name = name.replace('_', '.').replace('#', '_')
  leaf = {'kernel': 'weight', 'scale': 'weight',
          'embedding': 'weight'}.get(leaf, leaf)
  prefix = '' if name == 'classifier' else 'bert.'
  return f'{prefix}{name}.{leaf}'


def load_params(model: FlaxBert, path: str) -> PyTree:
  """The model's parameters from a Hugging Face safetensors file (Linear
  weights ``[out, in]`` transposed to kernels ``[in, out]``)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids, ids)['params']
  params: dict[str, Any] = {}
  with safe_open(path, framework='numpy') as f:
    for leaf_path, like in spec_lib.flatten_paths(shapes):
      value = f.get_tensor(hf_key(leaf_path))
      if leaf_path.endswith('/kernel'):
        value = value.T
      if value.shape != like.shape:
        raise ValueError(f'{hf_key(leaf_path)} has shape {value.shape}; '
                         f'{leaf_path} expects {like.shape}')
      spec_lib.set_by_path(params, leaf_path, jnp.asarray(value))
  return params


# LoRA targets of each ``targets`` choice, over our parameter paths.
TARGETS = {
    'qv': r'encoder_layer_\d+/attention_self/(query|value)/kernel',
    'all': (r'encoder_layer_\d+/(attention_self/(query|key|value)|'
            r'attention_output_dense|intermediate_dense|output_dense)/kernel'),
}
