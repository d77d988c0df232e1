"""A user's own data files, converted once into random-access array_record.

``convert(paths, fmt, fields)`` reads JSONL, CSV/TSV, Parquet or plain-text
files row by row and writes the good rows into one ``array_record`` file (the
format ``tfds.data_source`` reads), under
``<lorajax cache>/files/<sha256 of the files' bytes and the fields>/``. A
second call with the same bytes finds that folder and reads only its small
``meta.json`` and ``index.npz``, so a large file is never held in memory and a
resumed run sees the rows in the same order. The folder carries the digest of
its three files (``lorajax_digest.json``), checked each time it is opened: a
damaged one (a truncated or bit-flipped ``rows.array_record``) is named in a
warning, moved aside to ``<folder>.damaged-<time>-<pid>`` and converted again
from the source files.

Each record is JSON: ``text`` (and ``text_pair`` when a second text field is
named). ``index.npz`` keeps, per row, the index of its raw label in
``meta['label_values']`` (-1 without a label field), a 64-bit hash of its
group key, and the file and line it came from; splits and label ids are
computed from those without reading a record.

A bad row (a missing field, an empty text, an undecodable line, a label that
is neither an int nor a string: ``lorajax.data.file_rows``) is recorded with
its file and line;
``Converted.check(skip_bad_rows)`` raises for the first or returns the counts.

Example:

  >>> import os, tempfile
  >>> d = tempfile.mkdtemp()
  >>> path = os.path.join(d, 'reviews.csv')
  >>> with open(path, 'w') as f:
  ...   _ = f.write('text,label\\na fine film,pos\\n,neg\\ndull,neg\\n')
  >>> data = convert([path], 'csv', Fields('text', label='label'),
  ...                cache_root=d)
  >>> len(data), data[1]['text'], data.label_values
  (2, 'dull', ['neg', 'pos'])
  >>> os.path.basename(data.bad_rows[0].where), data.bad_rows[0].reason
  ('reviews.csv:3', 'empty text')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Sequence

from absl import logging
from array_record.python import array_record_data_source
from array_record.python import array_record_module
import numpy as np

from lorajax import assets
from lorajax import checksums
# Reading rows lives in its own module; these names stay importable here.
from lorajax.data.file_rows import BadRow
from lorajax.data.file_rows import Fields
from lorajax.data.file_rows import file_format
from lorajax.data.file_rows import FORMATS  # pylint: disable=unused-import
from lorajax.data.file_rows import normalize
from lorajax.data.file_rows import read_rows
from lorajax.data.file_rows import resolve_paths  # pylint: disable=unused-import

# Bump when the records or index change meaning: old conversions are unused.
_VERSION = 1
_MAX_LABELS = 10_000   # More distinct labels means the wrong label field.
_KEEP_BAD = 20         # Bad rows remembered (each kind is counted in full).


def _group_hash(key: str) -> int:
  return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8],
                        'big')


def content_key(paths: Sequence[str], fmt: str, fields: Fields) -> str:
  """sha256 of every file's bytes, in order, with the format and fields."""
  h = hashlib.sha256(json.dumps(
      [_VERSION, fmt, dataclasses.asdict(fields)]).encode())
  for path in paths:
    h.update(bytes.fromhex(checksums.file_sha256(path)))
  return h.hexdigest()


class Converted:
  """The good rows of some files: ``len``, ``[i]`` and per-row arrays.

  Attributes:
    paths: the files, in the order their rows were read.
    folder: the cache folder of the conversion.
    label_values: the distinct raw labels, sorted (as strings).
    labels: int32 [N]: each row's index into ``label_values``; -1 unlabeled.
    groups: uint64 [N]: each row's group hash (0 without a group field).
    file_index, lines: int [N]: where each row came from.
    bad_counts: problem -> number of rows not converted for it.
    bad_rows: the first bad rows, as ``BadRow(file:line, problem)``.
  """

  def __init__(self, folder: str, paths: Sequence[str]):
    self.folder = folder
    self.paths = list(paths)
    with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
      self.meta = json.load(f)
    with np.load(os.path.join(folder, 'index.npz')) as index:
      self.labels = index['label']
      self.groups = index['group']
      self.file_index = index['file_index']
      self.lines = index['line']
    self.label_values = self.meta['label_values']
    self.bad_counts = self.meta['bad_counts']
    self.bad_rows = [BadRow(self.where(f, line), reason)
                     for f, line, reason in self.meta['bad_rows']]
    self._records = None

  def where(self, file_index: int, line: int) -> str:
    """``file:line`` of a row, naming the file as the caller passed it."""
    return f'{self.paths[file_index]}:{line}'

  @property
  def num_bad(self) -> int:
    return sum(self.bad_counts.values())

  def check(self, skip_bad_rows: bool) -> dict[str, int]:
    """Raises for the first bad row, or returns the counts when skipping.

    Raises:
      ValueError: ``file:line: problem`` of the first bad row, unless
        ``skip_bad_rows``.
    """
    if self.num_bad and not skip_bad_rows:
      first = self.bad_rows[0]
      raise ValueError(
          f'{first.where}: {first.reason} ({self.num_bad} bad rows in all: '
          f'{self.bad_counts}). Fix the file, or set data.skip_bad_rows=True '
          'to skip them and count them')
    return dict(self.bad_counts)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, str]:
    if self._records is None:
      self._records = array_record_data_source.ArrayRecordDataSource(
          [os.path.join(self.folder, 'rows.array_record')])
    return json.loads(self._records[int(index)])

  def __repr__(self) -> str:
    return (f'Converted({[os.path.basename(p) for p in self.paths]}, '
            f'rows={len(self)}, bad={self.num_bad})')


def _write(folder: str, paths: Sequence[str], fmts: Sequence[str],
           fields: Fields) -> None:
  """Reads every file once and writes ``folder``'s three files."""
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(folder, 'rows.array_record'), 'group_size:1')
  label_ids: dict[str, int] = {}
  labels, groups, files, lines = [], [], [], []
  bad_counts: dict[str, int] = {}
  bad_rows = []
  try:
    for file_index, (path, fmt) in enumerate(zip(paths, fmts)):
      for line, raw, problem in read_rows(path, fmt, fields):
        row = None
        if problem is None:
          row, problem = normalize(raw, fields)
        if problem is not None:
          kind = problem.split(' (')[0]
          bad_counts[kind] = bad_counts.get(kind, 0) + 1
          if len(bad_rows) < _KEEP_BAD:
            bad_rows.append((file_index, line, problem))
          continue
        label = row.pop('label', None)
        group = row.pop('group', None)
        if label is not None and label not in label_ids:
          if len(label_ids) >= _MAX_LABELS:
            raise ValueError(
                f'{path}:{line}: more than {_MAX_LABELS} distinct labels in '
                f'field {fields.label!r}; is it the label field?')
          label_ids[label] = len(label_ids)
        labels.append(-1 if label is None else label_ids[label])
        groups.append(0 if group is None else _group_hash(group))
        files.append(file_index)
        lines.append(line)
        writer.write(json.dumps(row, ensure_ascii=False).encode('utf-8'))
  finally:
    writer.close()
  values = sorted(label_ids)
  remap = np.array([values.index(v) for v in label_ids] + [-1], np.int32)
  np.savez(os.path.join(folder, 'index.npz'),
           label=remap[np.asarray(labels, np.int64)].astype(np.int32),
           group=np.asarray(groups, np.uint64),
           file_index=np.asarray(files, np.int32), line=np.asarray(lines, np.int64))
  with open(os.path.join(folder, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump({'files': [os.path.basename(p) for p in paths],
               'formats': list(fmts), 'fields': dataclasses.asdict(fields),
               'rows': len(labels), 'label_values': values,
               'bad_counts': bad_counts, 'bad_rows': bad_rows}, f, indent=1)


def convert(paths: Sequence[str], fmt: str, fields: Fields, *,
            cache_root: str | os.PathLike | None = None) -> Converted:
  """Converts ``paths`` into one array_record file once; opens it.

  Args:
    paths: the files, read in this order (``resolve_paths`` sorts a glob).
    fmt: one of ``FORMATS``, or '' to take each file's from its extension.
    fields: the fields to keep.
    cache_root: where conversions live; ``<lorajax cache>/files`` when None.

  Returns:
    The ``Converted`` rows; bad rows are counted, not raised (see
    ``Converted.check``).

  Raises:
    ValueError: an unknown format, a file without a named column, or a label
      field with more than 10,000 distinct values.
  """
  paths = [os.fspath(p) for p in paths]
  fmts = [file_format(p, fmt) for p in paths]
  key = content_key(paths, ','.join(fmts), fields)
  root = os.fspath(cache_root or os.path.join(assets.cache_dir(), 'files'))
  folder = os.path.join(root, key[:32])
  if os.path.exists(os.path.join(folder, 'meta.json')):
    found = checksums.check_folder(folder)
    if found is None:   # Converted by a lorajax from before digests.
      checksums.seal_folder(folder)
    elif found:
      aside = f'{folder}.damaged-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}'
      os.replace(folder, aside)
      logging.warning('converted data %s is damaged: %s; moved it to %s and '
                      'converting %s again', folder, checksums.summary(found),
                      aside, paths)
  if not os.path.exists(os.path.join(folder, 'meta.json')):
    tmp = f'{folder}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      _write(tmp, paths, fmts, fields)
      checksums.seal_folder(tmp)
      try:
        os.rename(tmp, folder)
      except OSError:   # Another process finished the same conversion.
        if not os.path.exists(os.path.join(folder, 'meta.json')):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    logging.info('converted %s into %s', paths, folder)
  return Converted(folder, paths)
