"""Adapter and export directories that prove themselves, written all at once.

Every directory lorajax writes for others to load (``save_adapter``'s
adapter, ``export_peft``'s PEFT adapter, ``export_merged``'s checkpoint) is
built in a hidden sibling folder, gets ``lorajax_digest.json`` (the size and
sha256 of each of its files, ``checksums.record``) and is then swapped into
place with two renames (a target that is a symlink, a mount point or the
working directory is filled file by file instead, the digest first). A
process killed at any point (SIGKILL, a full disk) leaves the target as it
was, or absent between the two renames with
the previous version kept beside it as ``.<name>.previous-*``; never a mix
of old and new files, and never a half-written file under the target's name.
A killed writer's staging folder (``.<name>.partial-<pid>@<host>~*``, which
may hold gigabytes of a merged checkpoint) is removed by the next write of
the same directory on the same host, once that pid is no longer running.

``verify`` is called by the loaders: a file that differs from the digest (a
bit flip, a truncation, a file replaced by hand) is refused, naming it. A
directory without the digest file (written by PEFT itself, or by a lorajax
from before digests) is not an error; the caller decides what to say.
PEFT and transformers read only the files they know and ignore the digest.

Example:

  >>> import tempfile, pathlib
  >>> target = pathlib.Path(tempfile.mkdtemp()) / 'adapter'
  >>> with writing(target) as staging:
  ...   _ = (staging / 'weights.bin').write_bytes(b'1234')
  >>> verify(target)
  True
  >>> _ = (target / 'weights.bin').write_bytes(b'1243')
  >>> verify(target)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  lorajax.io.digests.DigestError: .../adapter/weights.bin has another sha256 than when it was written (a bit flip or an overwrite). If you changed it on purpose, delete .../adapter/lorajax_digest.json
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import sys
import tempfile
from typing import Iterator

from lorajax import checksums

DIGEST_FILE = checksums.DIGEST_FILE
_STAGING = '.partial-'     # .<name>.partial-XXXX: a write in progress
_PREVIOUS = '.previous-'   # .<name>.previous-XXXX: the version being replaced


class DigestError(ValueError):
  """A file of a directory lorajax wrote is not what was written."""


def staging_dir(directory: str | os.PathLike[str]) -> pathlib.Path:
  """A fresh hidden folder beside ``directory`` to write its new version in
  (same file system, so ``publish`` can rename it); its name carries this
  process's pid and host. Staging folders of ``directory`` that a dead
  process of this host left are removed first (``stale_staging``)."""
  directory = pathlib.Path(directory).absolute()
  directory.parent.mkdir(parents=True, exist_ok=True)
  for stale in stale_staging(directory):
    shutil.rmtree(stale, ignore_errors=True)
  return pathlib.Path(tempfile.mkdtemp(
      prefix=f'.{directory.name}{_STAGING}{os.getpid()}@{_host()}~',
      dir=directory.parent))


def _host() -> str:
  return socket.gethostname().replace('/', '_') or 'localhost'


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:   # Another user's process: it exists.
    return True
  return True


def stale_staging(directory: str | os.PathLike[str]) -> list[pathlib.Path]:
  """Staging folders of ``directory`` whose writer was killed: written by a
  process of this host that no longer runs. Folders of another host, of a
  running process, or without a pid in their name (an older lorajax) are
  never listed."""
  directory = pathlib.Path(directory).absolute()
  prefix = f'.{directory.name}{_STAGING}'
  found = []
  for p in directory.parent.iterdir():   # not glob: a name may hold [ or *
    if not p.name.startswith(prefix):
      continue
    writer = p.name[len(prefix):].rpartition('~')[0]
    pid, _, host = writer.partition('@')
    if (p.is_dir() and pid.isdigit() and host == _host()
        and int(pid) != os.getpid() and not _running(int(pid))):
      found.append(p)
  return sorted(found)


@contextlib.contextmanager
def writing(directory: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
  """Yields a staging folder to write the new version of ``directory`` in;
  on a normal exit seals it and swaps it into place (``publish``).

  Raises:
    OSError: a failed write (a full disk, no permission) naming
      ``directory``; it is left as it was and the staging folder removed.
  """
  staging = staging_dir(directory)
  try:
    yield staging
  except OSError as e:
    raise _named(e, directory) from e
  finally:
    if sys.exc_info()[0] is not None:
      shutil.rmtree(staging, ignore_errors=True)
  publish(staging, directory)


def _named(e: OSError, directory) -> OSError:
  return OSError(e.errno, f'cannot write {directory}: {e.strerror or e} '
                 f'({e.filename or directory}); it was left as it was')


def _carry_over(old: pathlib.Path, staging: pathlib.Path) -> None:
  """Hard-links (or copies) the entries of ``old`` the new version does not
  write, such as a person's README, into ``staging``."""
  for entry in os.listdir(old):
    if entry == DIGEST_FILE or (staging / entry).exists():
      continue
    source = old / entry
    if source.is_dir() and not source.is_symlink():
      shutil.copytree(source, staging / entry, symlinks=True,
                      copy_function=_link_or_copy)
    else:
      _link_or_copy(source, staging / entry)


def _link_or_copy(source, target) -> None:
  try:
    os.link(source, target, follow_symlinks=False)
  except OSError:
    shutil.copy2(source, target, follow_symlinks=False)


def publish(staging: str | os.PathLike[str],
            directory: str | os.PathLike[str]) -> None:
  """Seals ``staging`` and puts it in place of ``directory``.

  Args:
    staging: a folder from ``staging_dir(directory)`` holding the complete
      new version; it is gone afterwards.
    directory: the target. An existing one is replaced; entries of it the
      new version does not write are kept.

  Raises:
    OSError: a failed write (say a full disk), naming the target; the
      target is left as it was and the staging folder is removed.
  """
  staging, directory = pathlib.Path(staging), pathlib.Path(directory).absolute()
  try:
    if directory.exists():
      if not directory.is_dir():
        raise NotADirectoryError(f'{directory} exists and is not a directory')
      _carry_over(directory, staging)
    checksums.seal_folder(staging)
    if not directory.exists():
      os.rename(staging, directory)
      return
    if not _swappable(directory):
      _move_in(staging, directory)
      return
    previous = pathlib.Path(tempfile.mkdtemp(
        prefix=f'.{directory.name}{_PREVIOUS}', dir=directory.parent))
    os.rename(directory, previous / 'version')
    try:
      os.rename(staging, directory)
    except BaseException:
      os.rename(previous / 'version', directory)
      raise
    shutil.rmtree(previous, ignore_errors=True)
  except OSError as e:
    raise _named(e, directory) from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _swappable(directory: pathlib.Path) -> bool:
  """Whether ``directory`` itself may be renamed: not a symlink (it would
  become a folder), a mount point, or the working directory or above it."""
  if directory.is_symlink() or os.path.ismount(directory):
    return False
  real, cwd = os.path.realpath(directory), os.path.realpath(os.getcwd())
  return os.path.commonpath([real, cwd]) != real


def _move_in(staging: pathlib.Path, directory: pathlib.Path) -> None:
  """Moves the entries of ``staging`` into ``directory`` one by one, the
  digest first: a process killed midway leaves files the digest refuses."""
  names = sorted(os.listdir(staging), key=lambda n: n != DIGEST_FILE)
  for name in names:
    target = directory / name
    if (staging / name).is_dir() and target.is_dir():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f'.{name}{_PREVIOUS}',
                                          dir=directory))
      os.rename(target, old / name)
      os.rename(staging / name, target)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(staging / name, target)


def leftovers(directory: str | os.PathLike[str]) -> list[pathlib.Path]:
  """Folders an interrupted ``publish`` left beside ``directory``: previous
  versions (``.<name>.previous-*/version``), newest first."""
  directory = pathlib.Path(directory).absolute()
  found = [p / 'version' for p in directory.parent.glob(
      f'.{directory.name}{_PREVIOUS}*') if (p / 'version').is_dir()]
  return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def verify(directory: str | os.PathLike[str], *, fix: str = '') -> bool:
  """Checks the files of ``directory`` against its digest file.

  Args:
    directory: a directory ``publish`` wrote (or any other).
    fix: appended to the error: what to run to get an intact copy.

  Returns:
    True if it has a digest and every file in it is intact; False if it has
    no digest file (made by another tool or an older lorajax).

  Raises:
    DigestError: naming each damaged file (up to three) and how it differs,
      or a digest file that cannot be read.
  """
  directory = pathlib.Path(directory)
  found = checksums.check_folder(directory)
  if found is None:
    return False
  if found:
    raise DigestError(
        '; '.join(f'{directory}/{p}' for p in found[:3])
        + (f' (and {len(found) - 3} more)' if len(found) > 3 else '')
        + '. If you changed it on purpose, delete '
        f'{directory / DIGEST_FILE}' + _then(fix))
  return True


def _then(fix: str) -> str:
  return f'; {fix}' if fix else ''
