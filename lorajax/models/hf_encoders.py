"""Hugging Face encoder checkpoints (BERT, RoBERTa, XLM-R, DistilBERT) as
``Bert``.

RoBERTa and XLM-RoBERTa are BERT with two differences that change every
number, both ``BertConfig`` fields: positions are numbered from
``pad_token_id + 1`` over the tokens that are not padding
(``position_padding_idx``), and the sequence classifier is
``RobertaClassificationHead`` (``head='roberta'``: dense + tanh on the first
token, then ``out_proj``; no pooler).

DistilBERT is BERT without token types (``type_vocab_size=0``), with its
own names (``q_lin``, ``sa_layer_norm``, ``ffn.lin1``; ``config.json`` says
``dim``, ``n_layers``, ``hidden_dim``), LayerNorm epsilon 1e-12 throughout,
GELU or ReLU (``activation``), and a first-token classifier with ReLU
(``head='distilbert'``: ``pre_classifier``, ReLU, ``classifier``). Its
sinusoidal position table, where ``sinusoidal_pos_embds`` is set, is
stored in the checkpoint like a learned one and read as such.

``encoder_config(hf)`` reads ``config.json`` strictly (an activation other
than erf GELU, relative position embeddings, decoder or cross-attention
use, and model types other than ``ENCODER_TYPES`` are refused by name);
``read_encoder`` maps tensors one at a time, refuses a tensor it has no
place for, and initializes a classifier the checkpoint lacks.

Example:

  >>> config = encoder_config({'model_type': 'roberta', 'vocab_size': 99,
  ...     'hidden_size': 32, 'num_hidden_layers': 1,
  ...     'num_attention_heads': 4, 'intermediate_size': 37,
  ...     'pad_token_id': 1}, num_labels=3)
  >>> config.head, config.position_padding_idx, config.num_labels
  ('roberta', 1, 3)
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from lorajax.models import bert
from lorajax.models import bert_loading
from lorajax.models import hf_files

# model_type -> prefix of the base model's keys in task checkpoints.
ENCODER_TYPES = {'bert': 'bert', 'roberta': 'roberta',
                 'xlm-roberta': 'roberta', 'distilbert': 'distilbert'}
REFUSED_TYPES = {
    'modernbert': 'rotary embeddings, alternating local/global attention, '
                  'GeGLU',
    'deberta-v2': 'disentangled relative attention',
    'electra': 'embedding projection',
    'albert': 'shared layers and factorized embeddings',
}
# Stored buffers (not parameters).
_BUFFERS = ('embeddings.position_ids', 'embeddings.token_type_ids')


def _refuse(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f'config.json {field}={value!r}: {why}')


def encoder_config(hf: dict[str, Any], **overrides: Any) -> bert.BertConfig:
  """Builds a ``BertConfig`` from an encoder's ``config.json`` dict.

  Args:
    hf: the parsed ``config.json``; ``model_type`` picks the family.
    **overrides: ``BertConfig`` fields that win (``num_labels``, ``dtype``).

  Raises:
    ValueError: naming the field and value of anything not implemented.
  """
  model_type = hf.get('model_type', 'bert')
  if model_type in REFUSED_TYPES:
    raise _refuse('model_type', model_type, f'not implemented '
                  f'({REFUSED_TYPES[model_type]}); lorajax loads '
                  f'{sorted(ENCODER_TYPES)} encoders')
  if model_type not in ENCODER_TYPES:
    raise _refuse('model_type', model_type, 'not an encoder lorajax knows; '
                  f'expected one of {sorted(ENCODER_TYPES)}')
  if model_type == 'distilbert':
    return bert.BertConfig(**(_distilbert_fields(hf) | overrides))
  act = hf.get('hidden_act', 'gelu')
  if act != 'gelu':
    raise _refuse('hidden_act', act, "only the erf 'gelu' is implemented")
  pos = hf.get('position_embedding_type', 'absolute')
  if pos != 'absolute':
    raise _refuse('position_embedding_type', pos,
                  "only 'absolute' is implemented")
  for field in ('is_decoder', 'add_cross_attention'):
    if hf.get(field):
      raise _refuse(field, hf[field], 'only the bidirectional encoder is '
                    'implemented')
  roberta = model_type != 'bert'
  fields = dict(
      bert_loading.hf_fields(hf),
      pooling='cls',
      head='roberta' if roberta else 'bert',
      position_padding_idx=hf.get('pad_token_id', 1) if roberta else None)
  if hf.get('id2label'):
    fields['num_labels'] = len(hf['id2label'])
  return bert.BertConfig(**(fields | overrides))


def _distilbert_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """``BertConfig`` fields of a DistilBERT ``config.json`` (its own names
  and transformers' defaults)."""
  act = hf.get('activation', 'gelu')
  if act not in bert.ACTIVATIONS:
    raise _refuse('activation', act, f'implemented: {bert.ACTIVATIONS}')
  for field in ('is_decoder', 'add_cross_attention'):
    if hf.get(field):
      raise _refuse(field, hf[field], 'only the bidirectional encoder is '
                    'implemented')
  fields = dict(
      vocab_size=hf.get('vocab_size', 30522),
      hidden_size=hf.get('dim', 768),
      num_layers=hf.get('n_layers', 6),
      num_heads=hf.get('n_heads', 12),
      intermediate_size=hf.get('hidden_dim', 3072),
      max_position=hf.get('max_position_embeddings', 512),
      type_vocab_size=0,
      layer_norm_eps=1e-12,
      hidden_dropout=hf.get('dropout', 0.1),
      attention_dropout=hf.get('attention_dropout', 0.1),
      classifier_dropout=hf.get('seq_classif_dropout', 0.2),
      initializer_range=hf.get('initializer_range', 0.02),
      pooling='cls', head='distilbert', hidden_act=act)
  if hf.get('id2label'):
    fields['num_labels'] = len(hf['id2label'])
  return fields


def _distilbert_keys(config: bert.BertConfig, prefix: str) -> dict[str, str]:
  """Our path -> DistilBERT key (``prefix`` ``'distilbert.'`` or ``''``)."""
  names = {}

  def pair(ours, theirs, weight='kernel'):
    names[f'{ours}/{weight}'] = f'{theirs}.weight'
    names[f'{ours}/bias'] = f'{theirs}.bias'

  for table in ('word_embeddings', 'position_embeddings'):
    names[f'embeddings/{table}/embedding'] = (
        f'{prefix}embeddings.{table}.weight')
  pair('embeddings/ln', f'{prefix}embeddings.LayerNorm', 'scale')
  for i in range(config.num_layers):
    ours, theirs = f'encoder/layer_{i}', f'{prefix}transformer.layer.{i}'
    for proj, lin in (('query', 'q_lin'), ('key', 'k_lin'),
                      ('value', 'v_lin'), ('output', 'out_lin')):
      pair(f'{ours}/attention/{proj}', f'{theirs}.attention.{lin}')
    pair(f'{ours}/attention/output_ln', f'{theirs}.sa_layer_norm', 'scale')
    pair(f'{ours}/intermediate', f'{theirs}.ffn.lin1')
    pair(f'{ours}/output', f'{theirs}.ffn.lin2')
    pair(f'{ours}/output_ln', f'{theirs}.output_layer_norm', 'scale')
  pair('classifier/dense', 'pre_classifier')
  pair('classifier/out_proj', 'classifier')
  return names


def hf_keys(config: bert.BertConfig, prefix: str) -> dict[str, str]:
  """Our path -> Hugging Face key; ``prefix`` is ``'bert.'``,
  ``'roberta.'``, ``'distilbert.'`` or ``''`` (bare model) for the
  encoder's keys."""
  if config.head == 'distilbert':
    return _distilbert_keys(config, prefix)
  keys = {}
  for path, key in bert_loading.hf_key_map(config).items():
    if path.startswith(('pooler/', 'classifier/')):
      if config.head == 'roberta':
        continue
      keys[path] = key if path.startswith('classifier/') else prefix + key
    else:
      keys[path] = prefix + key
  if config.head == 'roberta':
    for part in ('dense', 'out_proj'):
      keys[f'classifier/{part}/kernel'] = f'classifier.{part}.weight'
      keys[f'classifier/{part}/bias'] = f'classifier.{part}.bias'
  return keys


def _canonical(key: str) -> str:
  """TF-era LayerNorm names ``gamma``/``beta`` as ``weight``/``bias``."""
  if key.endswith('.gamma'):
    return key[:-len('gamma')] + 'weight'
  if key.endswith('.beta'):
    return key[:-len('beta')] + 'bias'
  return key


def read_encoder(files: hf_files.CheckpointFiles, config: bert.BertConfig,
                 *, key: jax.Array | None = None,
                 drop_head: bool = False,
                 place: Callable[[str, np.ndarray], Any] = hf_files.host_copy
                 ) -> dict[str, Any]:
  """Reads every parameter of ``Bert(config)`` from ``files``.

  The pooler (BERT) and the classifier are initialized from ``key`` when
  the checkpoint has none (a bare model, or a task head of another kind).
  ``drop_head`` lets tensors outside the base model (another task's head,
  e.g. ``cls.predictions.*``) go unused; otherwise they are refused.
  ``place(path, host array)`` is called on each tensor as it is read.

  Returns:
    ``{path: place(path, array)}``, stored dtype, kernels ``[in, out]``.

  Raises:
    ValueError: a missing or misshaped tensor, or one with no place.
  """
  model_type = files.config.get('model_type', 'bert')
  base = ENCODER_TYPES[model_type] + '.'
  stored = {_canonical(k): k for k in files.keys()}
  prefix = base if any(k.startswith(base) for k in stored) else ''
  keys = hf_keys(config, prefix)
  shapes = bert_loading.expected_shapes(config)
  key = jax.random.key(0) if key is None else key
  init = bert.kernel_init(config)
  flat, used = {}, set()
  for path, hf_key in keys.items():
    shape = shapes[path]
    if hf_key not in stored:
      if not path.startswith(('pooler/', 'classifier/')):
        raise ValueError(f'{files.directory}: no tensor {hf_key!r} for '
                         f'{path} {shape}')
      logging.info('%s: no %s; %s %s freshly initialized', files.directory,
                   hf_key, path, shape)
      if path.endswith('/kernel'):
        key, sub = jax.random.split(key)
        flat[path] = place(path, init(sub, shape, config.param_dtype))
      else:
        flat[path] = place(path, np.zeros(shape, config.param_dtype))
      continue
    used.add(hf_key)
    value = files.get(stored[hf_key])
    if path.endswith('/kernel'):
      value = value.T
    if value.shape != shape:
      raise ValueError(
          f'{files.directory}: tensor {stored[hf_key]!r} has shape '
          f'{files.shape(stored[hf_key])}, expected {shape} (ours, for '
          f'{path}; num_labels={config.num_labels})')
    flat[path] = place(path, value)
  ignorable = _BUFFERS + (('pooler.',) if config.head == 'roberta' else ())
  unused = sorted(k for k in set(stored) - used
                  if not k.removeprefix(prefix).startswith(ignorable))
  heads = [k for k in unused if prefix and not k.startswith(prefix)]
  if drop_head and heads:
    logging.info('%s: head tensors not used: %s', files.directory, heads)
    unused = [k for k in unused if k not in heads]
  if unused:
    raise ValueError(f'{files.directory}: {len(unused)} tensors have no '
                     f'place in this {model_type} model, e.g. {unused[:4]}')
  return flat
