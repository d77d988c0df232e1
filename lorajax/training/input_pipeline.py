"""A run's data: each split of ``config.data`` tokenized for its model.

Splits load one at a time and only on request, so evaluation tokenizes just
the split it scores and export none. Classification examples become padded
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

from lorajax.data import sources
from lorajax.data import text
from lorajax.training import model_loading

Arrays = dict[str, np.ndarray]
SPLITS = ('train', 'validation', 'test')


def load_split(config, model: model_loading.Model, split: str) -> Arrays:
  """``split`` (``'train'``, ``'validation'`` or ``'test'``) of
  ``config.data``, tokenized by ``model.tokenizer``: ``[N, ...]`` arrays.

  Raises:
    ValueError: an unknown split or task.
  """
  if split not in SPLITS:
    raise ValueError(f'split {split!r}; expected one of {SPLITS}')
  d = config.data
  src = sources.get_source(d.name, d[f'{split}_split'], d.dir)
  if config.task == 'classification':
    return text.encode_source(src, model.tokenizer, max_len=d.max_len)
  if config.task == 'lm':
    texts = [src[i]['text'] for i in range(len(src))]
    return text.pack_lm(texts, model.tokenizer, seq_len=d.max_len,
                        eos_id=model.eos_id)
  raise ValueError(f"config.task={config.task!r}; expected 'classification' "
                   "or 'lm'")


def load_splits(config, model: model_loading.Model,
                splits: Iterable[str] = SPLITS) -> dict[str, Arrays]:
  """``{split: arrays}`` of ``splits`` (see ``load_split``)."""
  start = time.perf_counter()
  data = {split: load_split(config, model, split) for split in splits}
  if data:
    logging.info('%s data: %s rows ready in %.1f s', config.data.name,
                 {s: len(next(iter(a.values()))) for s, a in data.items()},
                 time.perf_counter() - start)
  return data
