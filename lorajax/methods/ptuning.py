"""P-tuning (Liu et al., 2021): virtual tokens computed by a prompt encoder.

Prompt tuning learns the ``n`` virtual input embeddings directly. P-tuning
learns them through a reparameterization: a table ``embedding`` ``[n, d]``
goes through a small MLP (``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU ->
Linear(h, d)``, the layout of Hugging Face PEFT's ``PromptEncoder`` with
``encoder_reparameterization_type='MLP'``), whose output is the prompt the
model receives (``prompt=``). Only the prompt reaches the model, so once
training ends the encoder is folded (``fold``): the tree is replaced by the
``[n, d]`` prompt it computes, which is what PEFT saves too.

PEFT's LSTM encoder is not implemented; asking for it raises.

The tree lives under ``'prompt_encoder'`` in a run's ``prompts`` tree
(``lorajax.methods.prompts.model_inputs`` computes its prompt).

Example:

  >>> import jax
  >>> tree = init_encoder(jax.random.key(0), 4, 8, encoder_hidden=16)
  >>> encode(tree).shape
  (4, 8)
  >>> sorted(tree['mlp'])
  ['layer_0', 'layer_1', 'layer_2']
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
# The reparameterizations PEFT's P-tuning offers, and those lorajax runs.
ENCODER_TYPES = ('MLP', 'LSTM')
IMPLEMENTED = ('MLP',)
_LAYERS = ('layer_0', 'layer_1', 'layer_2')


def check_encoder_type(encoder_type: str, *,
                       field: str = 'encoder_reparameterization_type'
                       ) -> None:
  """Raises ValueError unless ``encoder_type`` is one lorajax runs.

  Args:
    encoder_type: PEFT's ``encoder_reparameterization_type`` (any case).
    field: the name the message gives it (``'ptuning.encoder'`` in a config).
  """
  value = str(encoder_type).upper()
  if value == 'LSTM':
    raise ValueError(
        f"{field}={encoder_type!r}: PEFT's bidirectional LSTM prompt encoder "
        "is not implemented in lorajax; use 'MLP'")
  if value not in IMPLEMENTED:
    raise ValueError(f'{field}={encoder_type!r}; expected one of '
                     f'{IMPLEMENTED}')


def init_encoder(key: jax.Array, n_virtual: int, hidden_size: int, *,
                 encoder_hidden: int | None = None,
                 embedding: jax.Array | None = None,
                 stddev: float = 0.02) -> PyTree:
  """A fresh P-tuning encoder tree.

  Args:
    key: PRNG key.
    n_virtual: number of virtual tokens.
    hidden_size: the model's width ``d`` (the prompt's width).
    encoder_hidden: the MLP's width ``h``; default ``hidden_size`` (PEFT's
      default ``encoder_hidden_size``).
    embedding: the model's word embeddings ``[vocab, d]``; when given, the
      table starts as the embeddings of random vocabulary tokens, else as
      ``N(0, stddev)``.
    stddev: see ``embedding``.

  Returns:
    ``{'embedding': [n, d], 'mlp': {'layer_0'|'layer_1'|'layer_2':
    {'kernel', 'bias'}}}`` (float32; kernels ``[in, out]`` LeCun-normal,
    biases zero).

  Raises:
    ValueError: a non-positive size or an embedding table of another width.
  """
  encoder_hidden = hidden_size if encoder_hidden is None else encoder_hidden
  for name, value in (('n_virtual', n_virtual), ('hidden_size', hidden_size),
                      ('encoder_hidden', encoder_hidden)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')
  k_table, *k_layers = jax.random.split(key, 4)
  if embedding is not None:
    if embedding.shape[-1] != hidden_size:
      raise ValueError(f'embedding table has width {embedding.shape[-1]}, '
                       f'expected hidden_size={hidden_size}')
    ids = jax.random.randint(k_table, (n_virtual,), 0, embedding.shape[0])
    table = jnp.asarray(embedding, jnp.float32)[ids]
  else:
    table = stddev * jax.random.normal(k_table, (n_virtual, hidden_size),
                                       jnp.float32)
  widths = (hidden_size, encoder_hidden, encoder_hidden, hidden_size)
  mlp = {}
  for name, k, d_in, d_out in zip(_LAYERS, k_layers, widths[:-1],
                                  widths[1:]):
    mlp[name] = {
        'kernel': (jax.random.normal(k, (d_in, d_out), jnp.float32)
                   / math.sqrt(d_in)),
        'bias': jnp.zeros((d_out,), jnp.float32)}
  return {'embedding': table, 'mlp': mlp}


def encode(tree: PyTree) -> jax.Array:
  """The ``[n, d]`` prompt the encoder computes from its table.

  Args:
    tree: from ``init_encoder`` (or trained).

  Raises:
    ValueError: a tree without the three MLP layers.
  """
  mlp = tree.get('mlp', {})
  if sorted(mlp) != list(_LAYERS) or 'embedding' not in tree:
    raise ValueError(f"a P-tuning encoder has 'embedding' and 'mlp' with "
                     f'{list(_LAYERS)}; got {sorted(tree)} and mlp '
                     f'{sorted(mlp)}')
  x = tree['embedding']
  for i, name in enumerate(_LAYERS):
    x = x @ mlp[name]['kernel'] + mlp[name]['bias']
    if i < len(_LAYERS) - 1:
      x = jax.nn.relu(x)
  return x


def for_config(config: Any, model: Any, key: jax.Array) -> PyTree:
  """The ``prompts`` tree of a ``config.method='ptuning'`` run.

  Args:
    config: the run config (``ptuning.num_tokens``, ``ptuning.encoder_hidden``
      (0: the model's width), ``ptuning.encoder``, ``prompt.init_from_vocab``).
    model: ``model_loading.Model`` (its ``config.hidden_size`` and
      ``embedding`` table).
    key: PRNG key.

  Returns:
    ``{'prompt_encoder': init_encoder(...)}``.

  Raises:
    ValueError: ``ptuning.encoder`` other than ``'MLP'`` (named), or bad
      sizes.
  """
  check_encoder_type(config.ptuning.encoder, field='ptuning.encoder')
  hidden = int(model.config.hidden_size)
  return {'prompt_encoder': init_encoder(
      key, int(config.ptuning.num_tokens), hidden,
      encoder_hidden=int(config.ptuning.encoder_hidden) or hidden,
      embedding=(model.embedding if config.prompt.init_from_vocab
                 else None))}
