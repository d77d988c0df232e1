"""P-tuning (Liu et al., 2021): virtual tokens computed by a prompt encoder.

Prompt tuning learns the ``n`` virtual input embeddings directly. P-tuning
learns them through a reparameterization of a table ``embedding`` ``[n, d]``
— the two encoders of Hugging Face PEFT's ``PromptEncoder``:

- ``'MLP'``: ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)``
  applied to each row;
- ``'LSTM'``: a bidirectional LSTM of ``layers`` layers and width ``h`` run
  over the ``n`` rows as a sequence, then ``Linear(2h, 2h) -> ReLU ->
  Linear(2h, d)`` (PEFT's dropout between LSTM layers is not applied).

The encoder's output is the prompt the model receives (``prompt=``). Only
the prompt reaches the model, so once training ends the encoder is folded
(``lorajax.methods.prompts.fold``): the tree is replaced by the ``[n, d]``
prompt it computes, which is what PEFT saves too. ``from_peft_state`` reads
a PEFT ``PromptEncoder``'s state dict (the tests compare the two encoders).

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
import numpy as np

PyTree = Any
# PEFT's encoder_reparameterization_type values (lorajax runs both).
ENCODER_TYPES = ('MLP', 'LSTM')
_MLP_DEPTH = {'MLP': 3, 'LSTM': 2}


def check_encoder_type(encoder_type: str, *,
                       field: str = 'encoder_reparameterization_type'
                       ) -> str:
  """``encoder_type`` upper-cased, if it is one of ``ENCODER_TYPES``.

  Args:
    encoder_type: PEFT's ``encoder_reparameterization_type`` (any case).
    field: the name the message gives it (``'ptuning.encoder'`` in a config).

  Raises:
    ValueError: another value (named with ``field``).
  """
  value = str(encoder_type).upper()
  if value not in ENCODER_TYPES:
    raise ValueError(f'{field}={encoder_type!r}; expected one of '
                     f'{ENCODER_TYPES}')
  return value


def _dense(key, d_in, d_out):
  return {'kernel': (jax.random.normal(key, (d_in, d_out), jnp.float32)
                     / math.sqrt(d_in)),
          'bias': jnp.zeros((d_out,), jnp.float32)}


def init_encoder(key: jax.Array, n_virtual: int, hidden_size: int, *,
                 encoder_hidden: int | None = None, encoder: str = 'MLP',
                 lstm_layers: int = 2, embedding: jax.Array | None = None,
                 stddev: float = 0.02) -> PyTree:
  """A fresh P-tuning encoder tree.

  Args:
    key: PRNG key.
    n_virtual: number of virtual tokens.
    hidden_size: the model's width ``d`` (the prompt's width).
    encoder_hidden: the encoder's width ``h``; default ``hidden_size``
      (PEFT's default ``encoder_hidden_size``).
    encoder: ``'MLP'`` or ``'LSTM'``.
    lstm_layers: LSTM layers (PEFT's ``encoder_num_layers``); LSTM only.
    embedding: the model's word embeddings ``[vocab, d]``; when given, the
      table starts as the embeddings of random vocabulary tokens, else as
      ``N(0, stddev)``.
    stddev: see ``embedding``.

  Returns:
    ``{'embedding': [n, d], 'mlp': {'layer_i': {'kernel', 'bias'}}}`` and,
    for an LSTM, ``'lstm': {'layer_i': {'forward'|'backward': {'w_ih'
    [in, 4h], 'w_hh' [h, 4h], 'bias' [4h]}}}`` (gates i, f, g, o); float32,
    LeCun-normal kernels, zero biases.

  Raises:
    ValueError: a non-positive size, an unknown encoder, or an embedding
      table of another width.
  """
  encoder = check_encoder_type(encoder, field='encoder')
  h = hidden_size if encoder_hidden is None else encoder_hidden
  for name, value in (('n_virtual', n_virtual), ('hidden_size', hidden_size),
                      ('encoder_hidden', h), ('lstm_layers', lstm_layers)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')
  k_table, k_mlp, k_lstm = jax.random.split(key, 3)
  if embedding is not None:
    if embedding.shape[-1] != hidden_size:
      raise ValueError(f'embedding table has width {embedding.shape[-1]}, '
                       f'expected hidden_size={hidden_size}')
    ids = jax.random.randint(k_table, (n_virtual,), 0, embedding.shape[0])
    table = jnp.asarray(embedding, jnp.float32)[ids]
  else:
    table = stddev * jax.random.normal(k_table, (n_virtual, hidden_size),
                                       jnp.float32)
  widths = ((hidden_size, h, h, hidden_size) if encoder == 'MLP'
            else (2 * h, 2 * h, hidden_size))
  keys = jax.random.split(k_mlp, len(widths) - 1)
  tree = {'embedding': table, 'mlp': {
      f'layer_{i}': _dense(k, d_in, d_out)
      for i, (k, d_in, d_out) in enumerate(zip(keys, widths[:-1],
                                               widths[1:]))}}
  if encoder == 'LSTM':
    lstm = {}
    for i, k in enumerate(jax.random.split(k_lstm, lstm_layers)):
      d_in = hidden_size if i == 0 else 2 * h
      k_f, k_b = jax.random.split(k)
      lstm[f'layer_{i}'] = {
          name: {'w_ih': _dense(ka, d_in, 4 * h)['kernel'],
                 'w_hh': _dense(kb, h, 4 * h)['kernel'],
                 'bias': jnp.zeros((4 * h,), jnp.float32)}
          for name, (ka, kb) in (('forward', jax.random.split(k_f)),
                                 ('backward', jax.random.split(k_b)))}
    tree['lstm'] = lstm
  return tree


def _lstm_direction(cell: PyTree, x: jax.Array, reverse: bool) -> jax.Array:
  """One direction of one LSTM layer over ``x`` ``[n, in]``: ``[n, h]``."""
  h_size = cell['w_hh'].shape[0]
  inputs = x @ cell['w_ih'] + cell['bias']            # [n, 4h]

  def step(carry, gates_in):
    h, c = carry
    gates = gates_in + h @ cell['w_hh']
    i, f, g, o = jnp.split(gates, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((h_size,), x.dtype)
  _, out = jax.lax.scan(step, (zeros, zeros), inputs, reverse=reverse)
  return out


def encode(tree: PyTree) -> jax.Array:
  """The ``[n, d]`` prompt the encoder computes from its table.

  Args:
    tree: from ``init_encoder`` (or trained, or ``from_peft_state``).

  Raises:
    ValueError: a tree without an MLP of the encoder's depth.
  """
  encoder = 'LSTM' if 'lstm' in tree else 'MLP'
  layers = [f'layer_{i}' for i in range(_MLP_DEPTH[encoder])]
  mlp = tree.get('mlp', {})
  if sorted(mlp) != layers or 'embedding' not in tree:
    raise ValueError(f"a P-tuning {encoder} encoder has 'embedding' and "
                     f"'mlp' with {layers}; got {sorted(tree)} and mlp "
                     f'{sorted(mlp)}')
  x = tree['embedding']
  for i in range(len(tree.get('lstm', {}))):
    layer = tree['lstm'][f'layer_{i}']
    x = jnp.concatenate([_lstm_direction(layer['forward'], x, False),
                         _lstm_direction(layer['backward'], x, True)], -1)
  for i, name in enumerate(layers):
    x = x @ mlp[name]['kernel'] + mlp[name]['bias']
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def from_peft_state(state: dict[str, Any]) -> PyTree:
  """The encoder tree of a PEFT ``PromptEncoder``'s state dict.

  Args:
    state: ``{'embedding.weight', 'mlp_head.{0,2[,4]}.{weight,bias}'[,
      'lstm_head.weight_ih_l0[_reverse]', ...]}`` as arrays (torch
      ``[out, in]`` weights).

  Returns:
    A tree ``encode`` takes (float32).

  Raises:
    ValueError: a key this layout does not have, or one missing.
  """
  s = {k: np.asarray(v, np.float32) for k, v in state.items()}
  used = set()

  def take(key):
    if key not in s:
      raise ValueError(f'PromptEncoder state has no {key!r}; it has '
                       f'{sorted(s)}')
    used.add(key)
    return jnp.asarray(s[key])

  lstm_layers = sorted({int(k.split('_l')[1].split('_')[0]) for k in s
                        if k.startswith('lstm_head.weight_ih_l')})
  depth = _MLP_DEPTH['LSTM' if lstm_layers else 'MLP']
  tree = {'embedding': take('embedding.weight'), 'mlp': {
      f'layer_{i}': {'kernel': take(f'mlp_head.{2 * i}.weight').T,
                     'bias': take(f'mlp_head.{2 * i}.bias')}
      for i in range(depth)}}
  if lstm_layers:
    tree['lstm'] = {}
    for i in lstm_layers:
      layer = {}
      for name, suffix in (('forward', ''), ('backward', '_reverse')):
        layer[name] = {
            'w_ih': take(f'lstm_head.weight_ih_l{i}{suffix}').T,
            'w_hh': take(f'lstm_head.weight_hh_l{i}{suffix}').T,
            'bias': (take(f'lstm_head.bias_ih_l{i}{suffix}')
                     + take(f'lstm_head.bias_hh_l{i}{suffix}'))}
      tree['lstm'][f'layer_{i}'] = layer
  if set(s) - used:
    raise ValueError(f'PromptEncoder state has keys this layout does not '
                     f'read: {sorted(set(s) - used)}')
  return tree


def describe(tree: PyTree) -> dict[str, Any]:
  """PEFT's config fields of an encoder tree: ``encoder_reparameterization_
  type``, ``encoder_hidden_size`` and (LSTM) ``encoder_num_layers``."""
  if 'lstm' in tree:
    return {'encoder_reparameterization_type': 'LSTM',
            'encoder_hidden_size': int(
                tree['lstm']['layer_0']['forward']['w_hh'].shape[0]),
            'encoder_num_layers': len(tree['lstm'])}
  return {'encoder_reparameterization_type': 'MLP',
          'encoder_hidden_size': int(
              tree['mlp']['layer_0']['kernel'].shape[1])}


def for_config(config: Any, model: Any, key: jax.Array) -> PyTree:
  """The ``prompts`` tree of a ``config.method='ptuning'`` run.

  Args:
    config: the run config (``ptuning.num_tokens``, ``ptuning.encoder_hidden``
      (0: the model's width), ``ptuning.encoder``, ``ptuning.lstm_layers``,
      ``prompt.init_from_vocab``).
    model: ``model_loading.Model`` (its ``config.hidden_size`` and
      ``embedding`` table).
    key: PRNG key.

  Returns:
    ``{'prompt_encoder': init_encoder(...)}``.

  Raises:
    ValueError: an unknown ``ptuning.encoder`` (named, before ``model`` is
      read), or bad sizes.
  """
  encoder = check_encoder_type(config.ptuning.encoder,
                               field='ptuning.encoder')
  hidden = int(model.config.hidden_size)
  return {'prompt_encoder': init_encoder(
      key, int(config.ptuning.num_tokens), hidden,
      encoder_hidden=int(config.ptuning.encoder_hidden) or hidden,
      encoder=encoder, lstm_layers=int(config.ptuning.lstm_layers),
      embedding=(model.embedding if config.prompt.init_from_vocab
                 else None))}
