"""The rows of a user's data files: which files, which format, which fields.

``resolve_paths`` turns a file, a glob or a folder into the files to read;
``file_format`` names each one's format (JSONL, CSV/TSV, Parquet, plain
text); ``read_rows`` yields ``(line, row, problem)`` for every row, and
``normalize`` keeps the ``Fields`` a run reads or says why a row is bad (a
missing field, an empty text, a label that is neither an int nor a string,
a malformed conversation). ``lorajax.data.files`` converts the good rows
once into an ``array_record`` file.

Example:

  >>> normalize({'review': 'a fine film', 'stars': 5},
  ...           Fields('review', label='stars'))
  ({'text': 'a fine film', 'label': '5'}, None)
  >>> normalize({'review': ''}, Fields('review'))
  (None, 'empty text')
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import sys
from typing import Any, Iterator, NamedTuple

import numpy as np

FORMATS = ('jsonl', 'csv', 'tsv', 'parquet', 'text')
EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.ndjson': 'jsonl',
              '.csv': 'csv', '.tsv': 'tsv', '.parquet': 'parquet',
              '.pq': 'parquet', '.txt': 'text', '.text': 'text'}


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
  out, problem = _chat(row) if fields.chat else _fields(row, fields)
  if problem:
    return None, problem
  if fields.group:
    if row.get(fields.group) is None:
      return None, f'missing field {fields.group!r}'
    out['group'] = str(row[fields.group])
  return out, None


def _fields(row: dict[str, Any], fields: Fields
            ) -> tuple[dict[str, Any] | None, str | None]:
  """The texts and the label of a row that is not a conversation."""
  out = {}
  for key, field in (('text', fields.text), ('text_pair', fields.text_pair)):
    if field:
      out[key], problem = _string(row, field, 'text')
      if problem:
        return None, problem
  if fields.label:
    out['label'], problem = _label(row.get(fields.label), fields.label)
    if problem:
      return None, problem
  return out, None
