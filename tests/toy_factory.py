"""Model factories for tests/test_model_factory.py: your own Flax models.

``config.model.factory = 'toy_factory:make_classifier'`` trains
``TinyClassifier`` (plain ``nn.Dense`` layers over mean-pooled embeddings);
``make_lm`` a tiny causal LM; the rest return what the run must refuse.
"""

import functools
import types

from flax import linen as nn
import jax
import jax.numpy as jnp

from lorajax.training import model_factory

VOCAB = 30522   # The default classification tokenizer's (BERT WordPiece).


class Block(nn.Module):
  """A residual MLP: x + down(gelu(up(x)))."""
  width: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(2 * self.width, name='up')(x))
    return x + nn.Dense(self.width, name='down')(h)


class Encoder(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = Block(self.width, name=f'block_{i}')(x)
    return x


class TinyClassifier(nn.Module):
  """Embeddings, masked mean, two Dense blocks, a classifier: parameter
  paths ``embed/embedding``, ``encoder/block_{0,1}/{up,down}/{kernel,bias}``,
  ``classifier/{kernel,bias}``."""
  width: int
  num_labels: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, input_ids, attention_mask, *, train=False):
    x = nn.Embed(VOCAB, self.width, name='embed')(input_ids)
    m = attention_mask[..., None].astype(x.dtype)
    x = Encoder(self.width, name='encoder')(
        (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_labels, name='classifier')(x)


@functools.partial(jax.jit, static_argnums=0)
def _init(module, key):
  """One compiled init (op by op, Flax's init compiles every primitive)."""
  ids = jnp.ones((1, 4), jnp.int32)
  return module.init(key, ids, ids)['params']


def make_classifier(*, key, num_labels, width=16, pretrained_seed=0):
  """A 'pretrained' body (fixed seed: the same base for every run seed) and
  a head that depends on the run's ``key``."""
  module = TinyClassifier(width, num_labels)
  params = _init(module, jax.random.key(pretrained_seed))
  params['classifier'] = _init(module, key)['classifier']
  return model_factory.FactoryModel(params, module=module)


def make_classifier_apply(*, key, num_labels, width=16, dropout=0.1):
  """The same model through ``apply``, with dropout in training."""
  module = TinyClassifier(width, num_labels, dropout)

  def apply(params, batch, *, train, rng):
    return module.apply({'params': params}, batch['input_ids'],
                        batch['attention_mask'], train=train,
                        rngs=None if rng is None else {'dropout': rng})
  return types.SimpleNamespace(params=_init(module, key), apply=apply)


class TinyLm(nn.Module):
  """A causal LM: each position sees itself and the one before."""
  vocab: int
  width: int

  @nn.compact
  def __call__(self, inputs):
    x = nn.Embed(self.vocab, self.width, name='embed')(inputs)
    prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    x = x + nn.Dense(self.width, name='mix')(prev)
    return nn.Dense(self.vocab, name='lm_head')(nn.gelu(x))


@functools.partial(jax.jit, static_argnums=0)
def _init_lm(module, key):
  return module.init(key, jnp.ones((1, 4), jnp.int32))['params']


class CharTokenizer:
  """Bytes as token ids (0-255), 256 ends a document."""

  def encode_batch(self, texts):
    return [list(t.encode('utf-8')) for t in texts]

  def get_vocab_size(self):
    return 257


def make_lm(*, key, num_labels, width=8):
  del num_labels   # None for task 'lm'.
  module = TinyLm(257, width)
  params = _init_lm(module, key)
  return types.SimpleNamespace(params=params, module=module,
                               tokenizer=CharTokenizer(), eos_id=256)


# ---- what the run refuses -------------------------------------------------

NOT_CALLABLE = 3


def wrong_logits(*, key, num_labels, width=16):
  """Logits of 5 classes whatever ``num_labels`` is."""
  return make_classifier(key=key, num_labels=5, width=width)


def no_params(*, key, num_labels, width=8):
  del key, num_labels, width
  return types.SimpleNamespace(module=TinyClassifier(8, 2))


def variables_dict(*, key, num_labels, width=16):
  made = make_classifier(key=key, num_labels=num_labels, width=width)
  return model_factory.FactoryModel({'params': made.params},
                                    module=made.module)


def lm_too_few_logits(*, key, num_labels, width=8):
  """An LM whose head has 100 outputs, under a 257-id tokenizer."""
  del num_labels
  module = TinyLm(100, width)
  return types.SimpleNamespace(
      params=_init_lm(module, key), module=module, tokenizer=CharTokenizer(), eos_id=256)
