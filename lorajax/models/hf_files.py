"""The files of a local Hugging Face checkpoint directory, read lazily.

``CheckpointFiles(directory)`` parses ``config.json`` and finds the weights:
``model.safetensors``, or the shards a ``model.safetensors.index.json``
names. ``get(key)`` reads one tensor (``safetensors.safe_open``, memory
mapped) in its stored dtype — bfloat16 stays bfloat16 (``ml_dtypes``) — so a
loader holds at most the converted tree plus one tensor. The tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) are
read by ``tokenizer``, ``chat_template`` and ``eos_id``.

Example:

  >>> files = CheckpointFiles('/path/to/checkpoint')  # doctest: +SKIP
  >>> files.config['model_type'], files.get('model.norm.weight').dtype  # doctest: +SKIP
  ('qwen2', dtype('float32'))
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open
import tokenizers

from lorajax import checksums


class CheckpointFiles:
  """``config.json``, the safetensors tensors and the tokenizer of a folder.

  Attributes:
    directory: the folder.
    config: the parsed ``config.json``.
  """

  def __init__(self, directory: str | os.PathLike[str]):
    self.directory = pathlib.Path(directory)
    config_file = self.directory / 'config.json'
    if not config_file.is_file():
      raise FileNotFoundError(f'{self.directory} has no config.json; expected '
                              'a Hugging Face checkpoint directory')
    damaged = checksums.check_folder(self.directory)
    if damaged:  # A folder lorajax wrote (merged export) and sealed.
      raise ValueError(
          f'{self.directory} differs from its {checksums.DIGEST_FILE}: '
          f'{checksums.summary(damaged)}; export it again (or, if you '
          f'changed it on purpose, delete {checksums.DIGEST_FILE})')
    self.config: dict[str, Any] = json.loads(config_file.read_text())
    index = self.directory / 'model.safetensors.index.json'
    single = self.directory / 'model.safetensors'
    if index.is_file():
      weight_map = json.loads(index.read_text())['weight_map']
      self._file_of = {k: self.directory / f for k, f in weight_map.items()}
    elif single.is_file():
      with safe_open(str(single), framework='numpy') as f:
        self._file_of = {k: single for k in f.keys()}
    else:
      present = sorted(p.name for p in self.directory.iterdir())
      raise FileNotFoundError(
          f'{self.directory} has neither model.safetensors nor '
          f'model.safetensors.index.json (PyTorch .bin files are not read); '
          f'it holds {present[:10]}')
    self._handles: dict[pathlib.Path, Any] = {}

  def keys(self) -> list[str]:
    """Every tensor name, sorted."""
    return sorted(self._file_of)

  def __contains__(self, key: str) -> bool:
    return key in self._file_of

  def _handle(self, key: str):
    path = self._file_of[key]
    if path not in self._handles:
      if not path.is_file():
        raise FileNotFoundError(f'{path} (named by the index for {key!r}) '
                                'is missing')
      self._handles[path] = safe_open(str(path), framework='numpy')
    return self._handles[path]

  def shape(self, key: str) -> tuple[int, ...]:
    """The stored shape of ``key``, without reading its data."""
    return tuple(self._handle(key).get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    """Reads one tensor in its stored dtype.

    Raises:
      KeyError: naming the key and a few that exist.
    """
    if key not in self._file_of:
      raise KeyError(f'{self.directory}: no tensor {key!r}; it has '
                     f'{len(self._file_of)} tensors, e.g. {self.keys()[:4]}')
    self._handle(key)  # Names a missing shard file.
    # A handle of its own, closed at once: the file's pages that the read
    # touched leave the process with the mapping (a kept handle would hold
    # every shard's pages resident until the end, 1x the checkpoint).
    with safe_open(str(self._file_of[key]), framework='numpy') as f:
      return f.get_tensor(key)

  def _json(self, name: str) -> dict[str, Any]:
    path = self.directory / name
    return json.loads(path.read_text()) if path.is_file() else {}

  def tokenizer(self) -> tokenizers.Tokenizer | None:
    """``tokenizer.json`` as a ``tokenizers.Tokenizer`` (padding and
    truncation off), or None when the folder has none."""
    path = self.directory / 'tokenizer.json'
    if not path.is_file():
      return None
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok

  def chat_template(self) -> str | None:
    """``chat_template.jinja`` or ``tokenizer_config.json``'s template."""
    path = self.directory / 'chat_template.jinja'
    if path.is_file():
      return path.read_text()
    template = self._json('tokenizer_config.json').get('chat_template')
    return template if isinstance(template, str) else None

  def special_tokens(self) -> dict[str, str]:
    """``{'bos_token': ..., 'eos_token': ..., ...}`` of the tokenizer."""
    out = {}
    for name, value in self._json('tokenizer_config.json').items():
      if name.endswith('_token'):
        if isinstance(value, dict):
          value = value.get('content')
        if isinstance(value, str):
          out[name] = value
    return out

  def eos_ids(self) -> tuple[int, ...]:
    """Every end-of-sequence id of ``generation_config.json`` (else
    ``config.json``; ``eos_token_id`` may be a list), else the tokenizer's
    ``eos_token``'s id; ``()`` if none is named."""
    for source in (self._json('generation_config.json'), self.config):
      eos = source.get('eos_token_id')
      eos = eos if isinstance(eos, list) else [eos]
      if eos and all(isinstance(e, int) for e in eos):
        return tuple(eos)
    token = self.special_tokens().get('eos_token')
    tok = self.tokenizer()
    if token is not None and tok is not None:
      found = tok.token_to_id(token)
      if found is not None:
        return (found,)
    return ()

  def eos_id(self) -> int | None:
    """The first of ``eos_ids``, or None."""
    ids = self.eos_ids()
    return ids[0] if ids else None


def host_copy(path: str, value: np.ndarray) -> np.ndarray:
  """The readers' default ``place``: a C-contiguous host array.

  A reader hands every tensor to its ``place(path, value)`` as soon as it
  is read (kernels already ``[in, out]``), so that ``place`` can turn it
  into a device array at once (``lorajax.models.load`` does; on a mesh, onto
  its sharding) and host memory never holds the whole checkpoint twice.
  """
  del path
  return np.ascontiguousarray(value)
