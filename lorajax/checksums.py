"""Sizes and sha256 digests of files, and what differs from a record of them.

The one place lorajax hashes files: checkpoints (``training/integrity``),
adapter and PEFT directories (``io/digests``), extracted model files
(``assets``) and prepared data caches (``data/builders``, ``data/files``)
all record ``{relative path: [bytes, sha256]}`` with ``record`` and compare
with ``problems``, which names each file that differs and how. A folder that
carries its record as ``lorajax_digest.json`` is written with ``seal_folder``
and checked with ``check_folder``.

Example:

  >>> import tempfile, pathlib
  >>> folder = pathlib.Path(tempfile.mkdtemp())
  >>> _ = (folder / 'rows.bin').write_bytes(b'abcd')
  >>> recorded = record(folder, ['rows.bin'])
  >>> problems(folder, recorded)
  []
  >>> _ = (folder / 'rows.bin').write_bytes(b'ab')
  >>> problems(folder, recorded)
  ['rows.bin has 2 bytes, 4 when it was written (truncated or emptied)']
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

DIGEST_FILE = 'lorajax_digest.json'


def file_sha256(path: str | os.PathLike[str]) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def record(folder: str | os.PathLike[str], names: Iterable[str]
           ) -> dict[str, list[Any]]:
  """``{name: [bytes, sha256]}`` of files in ``folder``.

  Args:
    folder: where the files are.
    names: their paths relative to ``folder`` (``/``-joined).

  Returns:
    The record, sorted by name; store it as JSON.
  """
  folder = os.fspath(folder)
  return {name: [os.path.getsize(os.path.join(folder, name)),
                 file_sha256(os.path.join(folder, name))]
          for name in sorted(names)}


def problems(folder: str | os.PathLike[str],
             recorded: dict[str, list[Any]]) -> list[str]:
  """What differs between the files in ``folder`` and ``recorded``.

  Args:
    folder: where the files are.
    recorded: a ``record`` of them.

  Returns:
    One sentence per damaged file, sorted by name: missing, of another size
    (truncated or emptied), or with another sha256 (a bit flip or an
    overwrite). Empty when every file is intact. Files not in the record are
    not looked at.
  """
  folder = os.fspath(folder)
  found = []
  for name, (size, digest) in sorted(recorded.items()):
    full = os.path.join(folder, name)
    if not os.path.isfile(full):
      found.append(f'{name} is missing')
    elif (have := os.path.getsize(full)) != size:
      found.append(f'{name} has {have} bytes, {size} when it was written'
                   + (' (truncated or emptied)' if have < size else ''))
    elif file_sha256(full) != digest:
      found.append(f'{name} has another sha256 than when it was written '
                   '(a bit flip or an overwrite)')
  return found


def summary(found: list[str], limit: int = 3) -> str:
  """The first ``limit`` problems joined with ``'; '``, and how many more."""
  more = f' (and {len(found) - limit} more)' if len(found) > limit else ''
  return '; '.join(found[:limit]) + more


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` through a synced temporary file and a
  rename: a reader sees the old file or the whole new one, never a part."""
  path = os.fspath(path)
  tmp = f'{path}.{os.getpid()}.manifest-tmp'   # Two writers: two names.
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def folder_files(folder: str | os.PathLike[str]) -> list[str]:
  """Every file under ``folder`` but its digest file, ``/``-joined, sorted."""
  folder = os.fspath(folder)
  out = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel != DIGEST_FILE and not name.endswith('.manifest-tmp'):
        out.append(rel.replace(os.sep, '/'))
  return sorted(out)


def seal_folder(folder: str | os.PathLike[str], *, sync: bool = True) -> None:
  """Writes ``folder/lorajax_digest.json``: the record of every file in it.

  Args:
    folder: a finished folder (nothing writes to it afterwards).
    sync: first flush each file to disk, so that a power loss after the
      digest is written cannot leave it describing files that are not there.
  """
  names = folder_files(folder)
  if sync:
    for name in names:
      with open(os.path.join(folder, name), 'rb') as f:
        os.fsync(f.fileno())
  write_json_atomic(os.path.join(folder, DIGEST_FILE),
                    {'format': 1, 'files': record(folder, names)})


def check_folder(folder: str | os.PathLike[str]) -> list[str] | None:
  """What is wrong with a sealed folder's files.

  Returns:
    None if the folder has no digest file (not sealed); else the
    ``problems`` (empty when intact), or one sentence saying the digest file
    cannot be read.
  """
  path = os.path.join(os.fspath(folder), DIGEST_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      files = json.load(f)['files']
    if not isinstance(files, dict):
      raise TypeError(f'files is a {type(files).__name__}')
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f'{DIGEST_FILE} cannot be read ({type(e).__name__}: {e})']
  return problems(folder, files)
