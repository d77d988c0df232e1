"""A run's data: each split of ``config.data`` tokenized for its model.

Splits load one at a time and only on request, so evaluation tokenizes just
the split it scores and export none. ``config.data.path`` reads the user's
own files (``lorajax.data.file_splits``) instead of a named dataset; for
classification, ``label_names(config)`` are the classes the model's head
predicts. Classification examples become padded
``input_ids``/``attention_mask``/``token_type_ids``/``label`` rows; LM text
becomes packed ``inputs``/``targets``/``mask`` windows of
``config.data.max_len`` tokens.

Example:

  >>> from lorajax.training import config as config_lib
  >>> config = config_lib.base_config('classification')
  >>> config.model.pretrained, config.model.size = False, 'tiny'
  >>> config.data.validation_split = 'validation[:8]'
  >>> model = model_loading.load_model(config)
  >>> data = load_splits(config, model, ('validation',))
  >>> sorted(data), data['validation']['input_ids'].shape
  (['validation'], (8, 64))
"""

from __future__ import annotations

import time
from typing import Iterable

from absl import logging
import numpy as np

from lorajax.data import file_splits
from lorajax.data import files
from lorajax.data import sources
from lorajax.data import text
from lorajax.training import model_loading
from lorajax.training import sft

Arrays = dict[str, np.ndarray]
SPLITS = ('train', 'validation', 'test')
_CHUNK = 4096   # Rows tokenized at a time from a file source.


def file_data(config) -> file_splits.FileData:
  """The ``FileData`` of ``config.data.path`` and its fields."""
  d = config.data
  labeled = config.task == 'classification'
  fields = files.Fields(text=d.text_field, text_pair=d.text_pair_field,
                        label=d.label_field if labeled else '',
                        group=d.group_field, chat=config.task == 'sft')
  names = tuple(n.strip() for n in d.label_names.split(',') if n.strip())
  return file_splits.FileData(
      d.path, d.format, fields, d.validation_path, d.test_path,
      float(d.validation_fraction), float(d.test_fraction),
      int(d.split_seed), names, bool(d.skip_bad_rows))


def label_names(config) -> tuple[str, ...]:
  """The classes of a classification run's data, in id order; () for LM.

  From ``config.data.label_names`` or the training file's labels for
  ``data.path``; from the registry (``DatasetSpec``) for ``data.name``.
  """
  if config.task != 'classification':
    return ()
  if config.data.path:
    names = file_data(config).labels()
    if len(names) < 2:
      raise ValueError(f'{config.data.path}: field '
                       f'{config.data.label_field!r} has {len(names)} '
                       f'class ({list(names)}); a classifier needs two or '
                       'more')
    return names
  spec = sources.get_spec(config.data.name)
  return spec.label_names or tuple(str(i) for i in range(spec.num_classes))


def _encode_file_rows(src: file_splits.FileSource, tokenizer,
                      max_len: int) -> Arrays:
  """``text.encode_classification`` of a file split, a chunk at a time
  (the texts of a large split are never all in memory at once)."""
  parts = []
  for start in range(0, max(len(src), 1), _CHUNK):
    rows = src[start:start + _CHUNK]
    texts = [(r['text'], r['text_pair']) if 'text_pair' in r else r['text']
             for r in rows]
    parts.append(text.encode_classification(
        texts, [r['label'] for r in rows], tokenizer, max_len=max_len))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def load_split(config, model: model_loading.Model, split: str) -> Arrays:
  """``split`` (``'train'``, ``'validation'`` or ``'test'``) of
  ``config.data``, tokenized by ``model.tokenizer``: ``[N, ...]`` arrays.

  Raises:
    ValueError: an unknown split or task.
  """
  if split not in SPLITS:
    raise ValueError(f'split {split!r}; expected one of {SPLITS}')
  d = config.data
  if d.path:
    src = file_data(config).source(d[f'{split}_split'])
    if config.task == 'classification':
      return _encode_file_rows(src, model.tokenizer, d.max_len)
  else:
    src = sources.get_source(d.name, d[f'{split}_split'], d.dir)
  if config.task == 'sft':   # Conversations, chat template, packing.
    return sft.encode_rows(config, model, [src[i] for i in range(len(src))],
                           train=split == 'train')
  if config.task == 'classification':
    return text.encode_source(src, model.tokenizer, max_len=d.max_len)
  if config.task == 'lm':
    texts = [src[i]['text'] for i in range(len(src))]
    return text.pack_lm(texts, model.tokenizer, seq_len=d.max_len,
                        eos_id=model.eos_id)
  raise ValueError(f"config.task={config.task!r}; expected 'classification' "
                   "'lm' or 'sft'")


def load_splits(config, model: model_loading.Model,
                splits: Iterable[str] = SPLITS) -> dict[str, Arrays]:
  """``{split: arrays}`` of ``splits`` (see ``load_split``)."""
  start = time.perf_counter()
  data = {split: load_split(config, model, split) for split in splits}
  if data:
    logging.info('%s data: %s rows ready in %.1f s',
                 config.data.path or config.data.name,
                 {s: len(next(iter(a.values()))) for s, a in data.items()},
                 time.perf_counter() - start)
  return data
