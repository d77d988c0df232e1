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
is neither an int nor a string) is recorded with its file and line;
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

import csv
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Iterator, NamedTuple, Sequence

from absl import logging
from array_record.python import array_record_data_source
from array_record.python import array_record_module
import numpy as np

from lorajax import assets
from lorajax import checksums

FORMATS = ('jsonl', 'csv', 'tsv', 'parquet', 'text')
EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.ndjson': 'jsonl',
              '.csv': 'csv', '.tsv': 'tsv', '.parquet': 'parquet',
              '.pq': 'parquet', '.txt': 'text', '.text': 'text'}
# Bump when the records or index change meaning: old conversions are unused.
_VERSION = 1
_MAX_LABELS = 10_000   # More distinct labels means the wrong label field.
_KEEP_BAD = 20         # Bad rows remembered (each kind is counted in full).


@dataclasses.dataclass(frozen=True)
class Fields:
  """The columns (keys) of a row that a run reads.

  Attributes:
    text: the text field (ignored by the ``text`` format: a line is a row).
    text_pair: a second text (sentence pairs); '' for none.
    label: the label field; '' for unlabeled rows (language modelling).
    group: rows sharing its value stay in one split; '' for none.
    chat: rows are conversations: ``messages`` (a list of ``{'role',
      'content'}``) or ``prompt`` and ``completion`` (instruction tuning);
      ``text`` is then not read.
  """
  text: str = 'text'
  text_pair: str = ''
  label: str = ''
  group: str = ''
  chat: bool = False

  def named(self) -> list[str]:
    if self.chat:
      return [f for f in (self.group,) if f]
    return [f for f in (self.text, self.text_pair, self.label, self.group)
            if f]


class BadRow(NamedTuple):
  """A row that was not converted: ``where`` is ``file:line``."""
  where: str
  reason: str


def resolve_paths(path: str) -> list[str]:
  """The files of ``path``: a file, a glob, or a directory's known files.

  Raises:
    ValueError: naming ``path`` when it matches no file.
  """
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    found = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if os.path.splitext(f)[1].lower() in EXTENSIONS)
    if not found:
      raise ValueError(f'data path {path!r} is a directory with no file of '
                       f'a known extension ({sorted(EXTENSIONS)})')
    return found
  if glob.has_magic(path):
    found = sorted(p for p in glob.glob(path, recursive=True)
                   if os.path.isfile(p))
    if not found:
      raise ValueError(f'data path {path!r} matches no file')
    return found
  if not os.path.isfile(path):
    raise ValueError(f'data path {path!r} does not exist')
  return [path]


def file_format(path: str, fmt: str = '') -> str:
  """``fmt`` if given, else the format of ``path``'s extension."""
  if fmt:
    if fmt not in FORMATS:
      raise ValueError(f'data format {fmt!r}; expected one of {FORMATS}')
    return fmt
  ext = os.path.splitext(path)[1].lower()
  if ext not in EXTENSIONS:
    raise ValueError(f'cannot tell the format of {path!r} from its extension '
                     f'{ext!r}; known: {sorted(EXTENSIONS)}, or set the '
                     f'format (one of {FORMATS})')
  return EXTENSIONS[ext]


# ---- reading rows ---------------------------------------------------------

_Raw = tuple[int, dict[str, Any] | None, str | None]   # (line, row, problem)


def _jsonl_rows(path: str) -> Iterator[_Raw]:
  with open(path, 'rb') as f:
    for line, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        yield line, None, f'undecodable bytes (not UTF-8: {e.reason})'
        continue
      except json.JSONDecodeError as e:
        yield line, None, f'not JSON ({e.msg})'
        continue
      if not isinstance(row, dict):
        yield line, None, f'not a JSON object but {type(row).__name__}'
        continue
      yield line, row, None


def _csv_rows(path: str, fields: Fields, delimiter: str) -> Iterator[_Raw]:
  undecodable: list[int] = []

  def lines(f):
    for n, raw in enumerate(f, 1):
      try:
        yield raw.decode('utf-8-sig' if n == 1 else 'utf-8')
      except UnicodeDecodeError:
        undecodable.append(n)
        yield raw.decode('utf-8', 'replace')

  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  with open(path, 'rb') as f:
    reader = csv.DictReader(lines(f), delimiter=delimiter)
    columns = reader.fieldnames or []
    missing = [c for c in fields.named() if c not in columns]
    if missing:
      raise ValueError(f'{path}:1: no column {missing[0]!r}; the header has '
                       f'{columns}')
    last = reader.line_num
    for row in reader:
      start, last = last + 1, reader.line_num
      if undecodable and undecodable[-1] >= start:
        yield start, None, 'undecodable bytes (not UTF-8)'
      else:
        yield start, row, None


def _parquet_rows(path: str, fields: Fields) -> Iterator[_Raw]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  f = pq.ParquetFile(path)
  columns = f.schema_arrow.names
  missing = [c for c in fields.named() if c not in columns]
  if missing:
    raise ValueError(f'{path}: no column {missing[0]!r}; the file has '
                     f'{columns}')
  line = 0
  for batch in f.iter_batches(batch_size=4096, columns=fields.named()):
    for row in batch.to_pylist():
      line += 1
      yield line, row, None


def _text_rows(path: str, fields: Fields) -> Iterator[_Raw]:
  with open(path, 'rb') as f:
    for line, raw in enumerate(f, 1):
      try:
        text = raw.decode('utf-8').rstrip('\r\n')
      except UnicodeDecodeError as e:
        yield line, None, f'undecodable bytes (not UTF-8: {e.reason})'
        continue
      if text.strip():
        yield line, {fields.text: text}, None


def read_rows(path: str, fmt: str, fields: Fields) -> Iterator[_Raw]:
  """``(line, row or None, problem or None)`` for each row of one file.

  Raises:
    ValueError: a CSV header or Parquet schema without a named field.
  """
  if fmt == 'jsonl':
    return _jsonl_rows(path)
  if fmt in ('csv', 'tsv'):
    return _csv_rows(path, fields, ',' if fmt == 'csv' else '\t')
  if fmt == 'parquet':
    return _parquet_rows(path, fields)
  if fields.label or fields.text_pair or fields.group:
    raise ValueError(f'{path}: a plain-text file has one text per line and '
                     'no label, pair or group fields')
  return _text_rows(path, fields)


def _string(row: dict[str, Any], field: str, what: str
            ) -> tuple[str | None, str | None]:
  value = row.get(field)
  if value is None:
    return None, f'missing field {field!r}'
  if isinstance(value, bytes):
    try:
      value = value.decode('utf-8')
    except UnicodeDecodeError:
      return None, f'undecodable bytes in {field!r} (not UTF-8)'
  if not isinstance(value, str):
    return None, f'{what} field {field!r} is {type(value).__name__}, not text'
  if not value.strip():
    return None, f'empty {what}'
  return value, None


def _label(value: Any, field: str) -> tuple[str | None, str | None]:
  """A raw label as a string (an int label as its decimal digits)."""
  if value is None:
    return None, f'missing field {field!r}'
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    if value < 0:
      return None, f'negative label {value}'
    return str(int(value)), None
  if isinstance(value, bytes):
    try:
      value = value.decode('utf-8')
    except UnicodeDecodeError:
      return None, f'undecodable bytes in {field!r} (not UTF-8)'
  if isinstance(value, str) and value.strip():
    return value.strip(), None
  if isinstance(value, str):
    return None, 'empty label'
  return None, f'label {value!r} is neither an int nor a string'


def _chat(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
  """A conversation row: ``messages`` or ``prompt``/``completion``."""
  if 'messages' in row:
    messages = row['messages']
    if not isinstance(messages, list) or not messages:
      return None, "'messages' is not a non-empty list"
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or not isinstance(m.get('role'), str):
        return None, f'message {i} has no role'
      if not isinstance(m.get('content'), str):
        return None, f'message {i} ({m["role"]}) has no text content'
    if not any(m['role'] == 'assistant' for m in messages):
      return None, 'no assistant message to train on'
    return {'messages': [{'role': m['role'], 'content': m['content']}
                         for m in messages]}, None
  out = {}
  for field in ('prompt', 'completion'):
    out[field], problem = _string(row, field, 'text')
    if problem:
      return None, (f'{problem} (a chat row needs messages, or prompt and '
                    f'completion)')
  return out, None


def normalize(row: dict[str, Any], fields: Fields
              ) -> tuple[dict[str, Any] | None, str | None]:
  """``({'text', ['text_pair'], ['label'], ['group']}, None)`` or
  ``(None, problem)``; a label is kept as a string. A chat row gives
  ``{'messages'}`` or ``{'prompt', 'completion'}`` (and ``group``)."""
  if fields.chat:
    out, problem = _chat(row)
    if problem:
      return None, problem
    if fields.group:
      if row.get(fields.group) is None:
        return None, f'missing field {fields.group!r}'
      out['group'] = str(row[fields.group])
    return out, None
  out = {}
  for key, field, what in (('text', fields.text, 'text'),
                           ('text_pair', fields.text_pair, 'text')):
    if field:
      out[key], problem = _string(row, field, what)
      if problem:
        return None, problem
  if fields.label:
    out['label'], problem = _label(row.get(fields.label), fields.label)
    if problem:
      return None, problem
  if fields.group:
    if row.get(fields.group) is None:
      return None, f'missing field {fields.group!r}'
    out['group'] = str(row[fields.group])
  return out, None


# ---- conversion -----------------------------------------------------------


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
