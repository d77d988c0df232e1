"""Checkpoints that prove themselves: a digest of every file, written last.

A finished save is *sealed*: ``seal(step_dir)`` hashes every file of its
items (``trainable/``, ``opt/``, ``meta/``) and writes ``MANIFEST``
(``{'files': {relative path: [bytes, sha256]}}``) into the step folder,
last, through a temporary file and a rename. ``verify(step_dir)`` reads it
back and says what is wrong, by file: a file missing (a deleted ``opt/``, a
lost ``manifest.ocdbt``), of another size (truncated, emptied by a power
loss) or with another sha256 (a bit flip), or no manifest at all (an empty
folder a copy tool left, a save killed before it was sealed).

Orbax's own ``_CHECKPOINT_METADATA`` beside the items is left out: Orbax
rewrites it after the rename that finishes a save.

A damaged checkpoint is never deleted: ``quarantine`` moves it out of the
checkpoints folder, to ``<workdir>/damaged_checkpoints/<step>-<time>``,
where a person can look at it.

Example:

  >>> import tempfile, pathlib
  >>> step = pathlib.Path(tempfile.mkdtemp()) / '3'
  >>> (step / 'meta').mkdir(parents=True)
  >>> _ = (step / 'meta' / 'metadata').write_text('{"step": 3}')
  >>> seal(step)
  >>> verify(step) is None
  True
  >>> _ = (step / 'meta' / 'metadata').write_text('{"step": 4}')
  >>> print(verify(step))
  meta/metadata has another sha256 than when it was written (a bit flip or an overwrite)
"""

from __future__ import annotations

import json
import os
import re
import time

from lorajax import checksums

MANIFEST = 'lorajax_manifest.json'
DAMAGED_DIR = 'damaged_checkpoints'   # <workdir>/damaged_checkpoints/
# Written by Orbax after a save is renamed into place; not ours to hash.
_UNHASHED = ('_CHECKPOINT_METADATA', MANIFEST)
_STEP = re.compile(r'\d+')
_ORBAX_TMP = '.orbax-checkpoint-tmp'
file_digest = checksums.file_sha256
write_json_atomic = checksums.write_json_atomic


def _files(step_dir: str) -> list[str]:
  """Relative paths of the files a manifest covers, sorted."""
  out = []
  for folder, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in files:
      rel = os.path.relpath(os.path.join(folder, name), step_dir)
      if rel not in _UNHASHED and not name.endswith('.manifest-tmp'):
        out.append(rel)
  return sorted(out)


def seal(step_dir: str | os.PathLike[str]) -> None:
  """Writes the manifest of a finished save: every file's size and sha256."""
  step_dir = os.fspath(step_dir)
  files = checksums.record(step_dir, _files(step_dir))
  write_json_atomic(os.path.join(step_dir, MANIFEST),
                    {'format': 1, 'files': files})


def is_sealed(step_dir: str | os.PathLike[str]) -> bool:
  return os.path.isfile(os.path.join(os.fspath(step_dir), MANIFEST))


def verify(step_dir: str | os.PathLike[str]) -> str | None:
  """What is wrong with a checkpoint folder, or None if its files are intact.

  Returns:
    A sentence naming the damaged files (up to three) and how each differs,
    or saying the folder has no (readable) manifest.
  """
  step_dir = os.fspath(step_dir)
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(path):
    present = _files(step_dir)
    return (f'it has no {MANIFEST}: '
            + ('the folder is empty (left by a copy tool?)' if not present
               else f'the save was not sealed ({len(present)} files; killed '
                    'before it finished, or written by an older lorajax)'))
  try:
    with open(path, encoding='utf-8') as f:
      files = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'its {MANIFEST} cannot be read ({type(e).__name__}: {e})'
  problems = checksums.problems(step_dir, files)
  return checksums.summary(problems) if problems else None


class WriteFailed(OSError):
  """A checkpoint could not be written (a full disk, a file-size limit)."""


_FAILED_FILE = re.compile(r'Failed writing: "([^"]+)"')
_OS_CODE = re.compile(r"os_error_code='?(\d+)")


def write_failure(error: BaseException, directory: str | os.PathLike[str],
                  step: int | None) -> WriteFailed | None:
  """A clear error for a checkpoint save that failed writing its files.

  Args:
    error: what the save raised (an ``OSError``, or Orbax's ``ValueError``
      carrying TensorStore's ``os_error_code``).
    directory: the checkpoints folder.
    step: the step being saved (None: an earlier asynchronous save).

  Returns:
    A ``WriteFailed`` naming the file, the reason and what to do, or None
    if ``error`` is not a failed write.
  """
  text = str(error)
  code = getattr(error, 'errno', None)
  if code is None and (m := _OS_CODE.search(text)):
    code = int(m.group(1))
  if not isinstance(error, OSError) and code is None:
    return None
  m = _FAILED_FILE.search(text)
  path = m.group(1) if m else getattr(error, 'filename', None) or directory
  reason = os.strerror(code) if code else (
      getattr(error, 'strerror', None) or text[:200])
  which = f'checkpoint step {step}' if step is not None else 'a checkpoint'
  return WriteFailed(code, (
      f'cannot write {which} in {os.fspath(directory)}: {reason} ({path}). '
      'The checkpoints written before it are intact and a rerun resumes '
      'from the newest of them; free space and run the same command again'))


def scan(directory: str | os.PathLike[str]) -> tuple[list[int], list[str]]:
  """``(steps, unknown)`` of a checkpoints folder: the step folders, newest
  first, and the names of entries that are neither a step nor an Orbax
  temporary folder."""
  steps, unknown = [], []
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return [], []
  for name in sorted(os.listdir(directory)):
    full = os.path.join(directory, name)
    if _STEP.fullmatch(name) and os.path.isdir(full):
      steps.append(int(name))
    elif _ORBAX_TMP not in name:
      unknown.append(name)
  return sorted(steps, reverse=True), unknown


def quarantine(step_dir: str | os.PathLike[str]) -> str:
  """Moves a damaged step folder to ``<workdir>/damaged_checkpoints/``
  (beside the checkpoints folder); returns where it went."""
  step_dir = os.path.abspath(os.fspath(step_dir))
  checkpoints = os.path.dirname(step_dir)
  target_dir = os.path.join(os.path.dirname(checkpoints), DAMAGED_DIR)
  os.makedirs(target_dir, exist_ok=True)
  stamp = time.strftime('%Y%m%d-%H%M%S')
  target = os.path.join(target_dir,
                        f'{os.path.basename(checkpoints)}-'
                        f'{os.path.basename(step_dir)}-{stamp}')
  n = 0
  while os.path.exists(target + (f'.{n}' if n else '')):
    n += 1
  target += f'.{n}' if n else ''
  os.replace(step_dir, target)
  return target
