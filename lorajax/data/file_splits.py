"""Train, validation and test splits of a user's files, with label ids.

``FileData`` describes where a run's rows are: a training path (a file, a
glob or a directory), and validation and test either from their own paths or
carved from the training rows by a seeded split — by row, or by group
(``Fields.group``) so that no group is in two splits. Files are converted once
(``lorajax.data.files.convert``); a split is a list of row indices into that
conversion, read record by record.

Labels: ``label_names`` fixes the order of the classes; without it, int
labels ``0..K-1`` keep their values (names ``'0'..'K-1'``) and string labels
are sorted. A row whose label is not a known class (a validation file with a
class the training file lacks) is a bad row like any other.

Example:

  >>> import os, tempfile
  >>> d = tempfile.mkdtemp()
  >>> path = os.path.join(d, 'rows.jsonl')
  >>> with open(path, 'w') as f:
  ...   for i in range(20):
  ...     _ = f.write(json.dumps({'text': f'row {i}', 'y': 'ab'[i % 2]}) + '\\n')
  >>> data = FileData(path, fields=files.Fields('text', label='y'),
  ...                 validation_fraction=0.2, test_fraction=0.2,
  ...                 cache_root=d)
  >>> data.labels(), len(data.source('train')), len(data.source('test[:2]'))
  (('a', 'b'), 12, 2)
  >>> data.source('train')[0]
  {'text': 'row 0', 'label': 0}
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import os
import re
from typing import Any

from absl import logging
import numpy as np

from lorajax.data import files

SPLITS = ('train', 'validation', 'test')
_SLICE = re.compile(r'^(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$')


def parse_split(spec: str, n: int) -> tuple[str, slice]:
  """``'train[:96]'`` -> ``('train', slice(0, 96))`` for a split of ``n``.

  Bounds are row counts or percents (``'test[:10%]'``), as TFDS writes them.

  Raises:
    ValueError: for another syntax or split name.
  """
  m = _SLICE.match(spec.strip())
  if not m or m.group(1) not in SPLITS:
    raise ValueError(f'split {spec!r}; expected one of {SPLITS}, optionally '
                     'sliced as in train[:96] or test[10%:]')

  def bound(text):
    if text is None:
      return None
    if text.endswith('%'):
      return int(round(n * int(text[:-1]) / 100))
    return int(text)
  return m.group(1), slice(bound(m.group(2)), bound(m.group(3)))


@functools.lru_cache(maxsize=16)
def _convert(paths: tuple[str, ...], stamps: tuple[Any, ...], fmt: str,
             fields: files.Fields, cache_root: str | None) -> files.Converted:
  del stamps  # Part of the cache key: a changed file is converted again.
  return files.convert(paths, fmt, fields, cache_root=cache_root)


def convert_path(path: str, fmt: str, fields: files.Fields,
                 cache_root: str | None = None) -> files.Converted:
  """``files.convert`` of ``path``'s files, hashed once per process while
  their size and mtime stay the same."""
  paths = tuple(files.resolve_paths(path))
  stamps = tuple((os.path.getsize(p), os.path.getmtime(p)) for p in paths)
  return _convert(paths, stamps, fmt, fields, cache_root)


def _mix(h: np.ndarray, seed: int) -> np.ndarray:
  """splitmix64 of ``h`` xor a seed: a seeded order of group hashes."""
  with np.errstate(over='ignore'):
    z = np.asarray(h, np.uint64) ^ np.uint64(
        (seed * 0x9E3779B97F4A7C15) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _count(n: int, fraction: float) -> int:
  return 0 if fraction <= 0 else max(1, int(round(n * fraction)))


def seeded_split(groups: np.ndarray | None, n: int, *, validation: float,
                 test: float, seed: int) -> np.ndarray:
  """Assigns ``n`` rows to splits: 0 train, 1 validation, 2 test.

  Args:
    groups: uint64 [n] group hashes, or None to split rows one by one.
    n: number of rows.
    validation, test: the fractions of rows (or of groups) held out.
    seed: the split's seed; the same seed gives the same split.

  Returns:
    int8 [n] split ids.

  Raises:
    ValueError: when there are too few rows (groups) for the fractions.
  """
  if groups is None:
    order = np.random.default_rng(seed).permutation(n)
    units, what = n, 'rows'
  else:
    uniq, inverse = np.unique(groups, return_inverse=True)
    units, what = len(uniq), 'groups'
  n_test, n_val = _count(units, test), _count(units, validation)
  if n_test + n_val >= units:
    raise ValueError(f'{units} {what} are too few for validation fraction '
                     f'{validation} and test fraction {test}')
  split_of_unit = np.zeros(units, np.int8)
  if groups is None:
    split_of_unit[order[:n_test]] = 2
    split_of_unit[order[n_test:n_test + n_val]] = 1
    return split_of_unit
  rank = np.argsort(_mix(uniq, seed), kind='stable')
  split_of_unit[rank[:n_test]] = 2
  split_of_unit[rank[n_test:n_test + n_val]] = 1
  return split_of_unit[inverse]


class FileSource(collections.abc.Sequence):
  """Rows of one split: dicts with ``text`` [``text_pair``] [``label``].

  Attributes:
    rows: int64 [N] row indices into the conversion.
    skipped: problem -> count of rows left out (skip mode).
  """

  def __init__(self, converted: files.Converted, rows: np.ndarray,
               label_ids: np.ndarray | None, name: str,
               skipped: dict[str, int]):
    self._converted = converted
    self.rows = rows
    self._label_ids = label_ids
    self.name = name
    self.skipped = skipped

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    row = int(self.rows[index])
    out = self._converted[row]
    if self._label_ids is not None:
      out['label'] = int(self._label_ids[self._converted.labels[row]])
    return out

  def __repr__(self) -> str:
    return f'FileSource({self.name!r}, len={len(self)})'


@dataclasses.dataclass(frozen=True)
class FileData:
  """A run's rows in files (see the module docstring).

  Attributes:
    path: training rows: a file, a glob or a directory.
    fmt: one of ``files.FORMATS``; '' takes it from each file's extension.
    fields: the fields read.
    validation_path, test_path: their own files; '' carves the split from
      the training rows.
    validation_fraction, test_fraction: the carved fractions.
    split_seed: the seed of the carved split.
    label_names: the classes in id order; () takes them from the training
      rows.
    skip_bad_rows: skip and count bad rows instead of raising.
    cache_root: where conversions live (None: the lorajax cache).
  """
  path: str
  fmt: str = ''
  fields: files.Fields = files.Fields()
  validation_path: str = ''
  test_path: str = ''
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  split_seed: int = 0
  label_names: tuple[str, ...] = ()
  skip_bad_rows: bool = False
  cache_root: str | None = None

  def _file(self, split: str) -> tuple[files.Converted, bool]:
    """The conversion holding ``split``, and whether it is carved."""
    own = {'validation': self.validation_path,
           'test': self.test_path}.get(split, '')
    converted = convert_path(own or self.path, self.fmt, self.fields,
                             self.cache_root)
    return converted, not own

  def labels(self) -> tuple[str, ...]:
    """The class names in id order; () for unlabeled rows."""
    if not self.fields.label:
      return ()
    if self.label_names:
      return tuple(self.label_names)
    values = self._file('train')[0].label_values
    if not values:
      raise ValueError(f'{self.path} has no labeled row')
    if all(v.isdigit() for v in values):
      return tuple(str(i) for i in range(max(int(v) for v in values) + 1))
    return tuple(values)

  def _label_ids(self, values: list[str], names: tuple[str, ...]
                 ) -> np.ndarray:
    """For each raw label value, its id (or -1), plus -1 for unlabeled."""
    index = {name: i for i, name in enumerate(names)}
    ids = [index.get(v, int(v) if v.isdigit() and int(v) < len(names)
                     else -1) for v in values]
    return np.asarray(ids + [-1], np.int32)

  def source(self, split: str) -> FileSource:
    """The rows of ``split`` (``'train'``, ``'validation[:24]'``, ...).

    Raises:
      ValueError: the first bad row (``file:line: problem``) unless
        ``skip_bad_rows``; a bad split name; too few rows to carve.
    """
    converted, carved = self._file(parse_split(split, 0)[0])
    skipped = converted.check(self.skip_bad_rows)
    rows = np.arange(len(converted), dtype=np.int64)
    label_ids = None
    if self.fields.label:
      names = self.labels()
      label_ids = self._label_ids(converted.label_values, names)
      unknown = label_ids[converted.labels] < 0
      if unknown.any():
        first = int(np.argmax(unknown))
        where = converted.where(int(converted.file_index[first]),
                                int(converted.lines[first]))
        value = converted.label_values[converted.labels[first]]
        if not self.skip_bad_rows:
          raise ValueError(
              f'{where}: unknown label {value!r}; known: {list(names)} '
              f'({int(unknown.sum())} such rows). Fix the file, list the '
              'classes in data.label_names, or set data.skip_bad_rows=True')
        skipped = dict(skipped, **{'unknown label': int(unknown.sum())})
        rows = rows[~unknown]
    name, cut = parse_split(split, 0)
    if carved and (self.validation_path == '' or self.test_path == ''):
      fractions = dict(
          validation=0.0 if self.validation_path else self.validation_fraction,
          test=0.0 if self.test_path else self.test_fraction)
      groups = converted.groups[rows] if self.fields.group else None
      assigned = seeded_split(groups, len(rows), seed=self.split_seed,
                              **fractions)
      rows = rows[assigned == SPLITS.index(name)]
    name, cut = parse_split(split, len(rows))
    rows = rows[cut]
    if skipped:
      logging.warning('%s: skipped bad rows %s', converted, skipped)
    return FileSource(converted, rows, label_ids, split, skipped)

