"""Save and load an adapter alone: its tensors, its spec and its base.

An adapter directory holds ``adapter.json`` (the spec, the shapes of every
stored tensor, a fingerprint of the base model and free-form metadata) and
the tensors, either as ``adapter.safetensors`` or as an Orbax checkpoint in
``orbax/``. Stored tensors are the adapters (``adapters/<path>/<name>``) and
the leaves the spec trains outright, such as a classifier head
(``trained/<path>``); never the frozen base. The directory is written whole
or not at all, with ``lorajax_digest.json`` (``io/digests``): loading
refuses a file that differs from it, naming the file. A directory saved by
a lorajax from before digests loads with a warning (only its safetensors
file's sha256 in ``adapter.json``, if any, is checked).

The base fingerprint records every parameter path with its shape and dtype,
and a digest of a fixed sample of the frozen weights (rounded to bfloat16, so
a bfloat16 copy of the same base matches). Loading against a base checks the
paths and shapes, then the weights, and names what differs.

Example:

  >>> import tempfile, jax, jax.numpy as jnp, lorajax
  >>> params = {'w': jnp.ones((3, 2)), 'head': jnp.zeros(2)}
  >>> spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=1)), ('head', 'train')])
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> directory = save_adapter(tempfile.mkdtemp(), spec, adapters, params)
  >>> bundle = load_adapter(directory, params)       # checks the base
  >>> bundle.spec == spec, bundle.adapters['w'].layout.describe()
  (True, '[in, out]')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any

from absl import logging
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from safetensors import numpy as st_numpy

from lorajax import checksums
from lorajax import kernels
from lorajax import rewrite
from lorajax import spec as spec_lib
from lorajax.partition import combine
from lorajax.partition import partition
from lorajax.io import digests
from lorajax.io import spec_json
from lorajax.methods import pissa

PyTree = Any
META_FILE = 'adapter.json'
TENSOR_FILE = 'adapter.safetensors'
ORBAX_DIR = 'orbax'
FORMATS = ('safetensors', 'orbax')
_SAMPLE = 256  # weights sampled per frozen leaf for the digest
# What to run for an intact copy of a damaged adapter directory.
REWRITE_HINT = ('write it again from its run: lorajax-export '
                '--workdir=<run> --format=lorajax --out=<this directory>')


class AdapterFileError(ValueError):
  """An adapter file is unreadable, corrupted or made for another base."""


def _flat(tree: PyTree) -> dict[str, Any]:
  return dict(spec_lib.flatten_paths(tree)) if tree else {}


def _shape(leaf: Any) -> list[int]:
  if isinstance(leaf, spec_lib.FrozenKernel):
    return list(leaf.aval().shape)
  return list(np.shape(leaf))


def _dtype(leaf: Any) -> str:
  if isinstance(leaf, spec_lib.FrozenKernel):
    return str(np.dtype(leaf.aval().dtype))
  return str(np.dtype(leaf.dtype))


def fingerprint(params: PyTree, spec: spec_lib.LoraSpec) -> dict[str, Any]:
  """Describes the base ``params`` an adapter of ``spec`` belongs to.

  Returns:
    ``{'shapes': {path: [shape, dtype]}, 'weights': hex digest}``. Leaves the
    spec trains are listed in ``shapes`` but left out of the digest (an
    adapter brings its own); quantized kernels enter by shape only.
  """
  resolution = spec_lib.resolve(spec, params)
  shapes, digest = {}, hashlib.sha256()
  for path, leaf in spec_lib.flatten_paths(params):
    shapes[path] = [_shape(leaf), _dtype(leaf)]
    if (resolution.actions[path] == spec_lib.TRAIN
        or isinstance(leaf, spec_lib.FrozenKernel)):
      continue
    flat = np.asarray(leaf).reshape(-1)
    idx = np.linspace(0, flat.size - 1, min(_SAMPLE, flat.size)).astype(int)
    sample = flat[idx].astype(np.float32).astype(ml_dtypes.bfloat16)
    digest.update(path.encode())
    digest.update(sample.tobytes())
  return {'shapes': shapes, 'weights': digest.hexdigest()}


def _action(spec: spec_lib.LoraSpec, path: str) -> spec_lib.Action:
  for pattern, action in spec.rules:
    if re.fullmatch(pattern, path):
      return action
  return spec_lib.FREEZE


def check_base(expected: dict[str, Any], params: PyTree,
               spec: spec_lib.LoraSpec, *, check_weights: bool = True,
               source: str = 'adapter') -> None:
  """Raises ``AdapterFileError`` unless ``params`` is the base of ``expected``.

  Args:
    expected: a ``fingerprint`` stored with the adapter.
    params: the base parameters it is about to be applied to.
    spec: the adapter's spec.
    check_weights: also compare the weight digest (turn off to apply an
      adapter to a base with the same shapes but other weights on purpose,
      e.g. a quantized copy).
    source: a name for messages (the file).
  """
  try:
    got = fingerprint(params, spec)
  except ValueError as e:
    raise AdapterFileError(f'{source}: its spec does not fit this base: {e}'
                           ) from None
  want, have = expected['shapes'], got['shapes']
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  differ = sorted((p for p in set(want) & set(have)
                   if want[p][0] != have[p][0]),
                  key=lambda p: (_action(spec, p) == spec_lib.FREEZE, p))
  if missing or extra or differ:
    parts = []
    if differ:
      parts.append('shapes differ: ' + ', '.join(
          f'{p} adapter base {tuple(want[p][0])} vs this base '
          f'{tuple(have[p][0])}' for p in differ[:4]))
    if missing:
      parts.append(f'{len(missing)} paths missing here, e.g. {missing[:4]}')
    if extra:
      parts.append(f'{len(extra)} paths this base has and the adapter base '
                   f'had not, e.g. {extra[:4]}')
    raise AdapterFileError(
        f'{source} was made for another base model ({len(want)} parameters) '
        f'than this one ({len(have)} parameters): ' + '; '.join(parts))
  if check_weights and expected['weights'] != got['weights']:
    raise AdapterFileError(
        f'{source} was made for a base with the same shapes but other '
        f'weights (weight digest {expected["weights"][:12]} vs '
        f'{got["weights"][:12]}); pass check_weights=False to apply it anyway')


@dataclasses.dataclass(frozen=True)
class AdapterBundle:
  """An adapter as loaded from a directory.

  Attributes:
    adapters: the adapter pytree (``{'a': .., 'b': ..}`` per kernel path).
    spec: the spec it was made with.
    trained: leaves the spec trains outright (e.g. a classifier head),
      nested like the params; ``{}`` if none.
    base: the fingerprint of the base it was made for.
    metadata: free-form JSON given at save time.
  """
  adapters: PyTree
  spec: spec_lib.LoraSpec
  trained: PyTree
  base: dict[str, Any]
  metadata: dict[str, Any]

  def params_for(self, params: PyTree) -> PyTree:
    """``params`` with the trained leaves of this adapter put in."""
    if not self.trained:
      return params
    _, frozen = partition(params, self.spec)
    return combine(self.trained, frozen)


def _tensor_dict(adapters: PyTree, trained: PyTree) -> dict[str, np.ndarray]:
  out = {}
  for prefix, tree in (('adapters', adapters), ('trained', trained)):
    for path, leaf in _flat(tree).items():
      out[f'{prefix}/{path}'] = np.ascontiguousarray(np.asarray(leaf))
  return out


def save_adapter(directory: str | pathlib.Path, spec: spec_lib.LoraSpec,
                 adapters: PyTree, params: PyTree, *,
                 format: str = 'safetensors',  # pylint: disable=redefined-builtin
                 metadata: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes ``adapters``, the trained leaves of ``params`` and ``spec``.

  Args:
    directory: created if needed; an existing adapter there is replaced.
    spec: the spec the adapters were made with.
    adapters: the adapter pytree.
    params: the parameters the adapters run with: the base, with the leaves
      ``spec`` marks ``'train'`` (say a classifier head) as trained. Those
      leaves are stored; the rest only enter the base fingerprint.
    format: ``'safetensors'`` or ``'orbax'``.
    metadata: JSON-serializable notes (e.g. the model name, the step).

  Returns:
    The directory.
  """
  if format not in FORMATS:
    raise ValueError(f'format={format!r}; expected one of {FORMATS}')
  pissa.check_portable(spec, 'save_adapter')
  directory = pathlib.Path(directory)
  resolution = spec_lib.resolve(spec, params)
  rewrite.check_adapter_paths(adapters, resolution.adapted)
  layouts = {}
  for path, provider in resolution.adapted.items():
    if provider.has_params:
      layouts[path] = kernels.layout_of(spec_lib.get_by_path(adapters, path),
                                        path).to_json()
  trained, _ = partition(params, spec)
  tensors = _tensor_dict(adapters, trained)
  meta = {'lorajax_adapter': 1, 'storage': format,
          'spec': spec_json.spec_to_json(spec), 'layouts': layouts,
          'tensors': {k: [list(v.shape), str(v.dtype)]
                      for k, v in tensors.items()},
          'base': fingerprint(params, spec), 'metadata': metadata or {}}
  # Written beside the target, then swapped in whole with a digest file.
  with digests.writing(directory) as staging:
    if format == 'safetensors':
      st_numpy.save_file(tensors, str(staging / TENSOR_FILE))
      meta['sha256'] = checksums.file_sha256(staging / TENSOR_FILE)
    else:
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(staging / ORBAX_DIR, tensors, force=True)
        checkpointer.wait_until_finished()
    (staging / META_FILE).write_text(json.dumps(meta, indent=1))
  return directory


def _read_tensors(directory: pathlib.Path, meta: dict[str, Any]
                  ) -> dict[str, np.ndarray]:
  shapes = meta['tensors']
  if meta['storage'] == 'safetensors':
    target = directory / TENSOR_FILE
    if not target.exists():
      raise AdapterFileError(f'{directory}: {META_FILE} names safetensors '
                             f'storage but {TENSOR_FILE} is missing')
    if meta.get('sha256') and checksums.file_sha256(target) != meta['sha256']:
      raise AdapterFileError(
          f'{target}: contents do not match the sha256 recorded in '
          f'{META_FILE}; the file is corrupted or was replaced')
    tensors = read_safetensors(target)
  elif meta['storage'] == 'orbax':
    abstract = {k: jax.ShapeDtypeStruct(tuple(s), np.dtype(d))
                for k, (s, d) in shapes.items()}
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory.absolute() / ORBAX_DIR,
                                        abstract)
    except Exception as e:  # pylint: disable=broad-except
      raise AdapterFileError(f'{directory / ORBAX_DIR}: Orbax restore failed:'
                             f' {type(e).__name__}: {str(e)[:300]}') from None
    tensors = {k: np.asarray(v) for k, v in restored.items()}
  else:
    raise AdapterFileError(f'{directory}: unknown storage '
                           f'{meta["storage"]!r}; expected one of {FORMATS}')
  if set(tensors) != set(shapes):
    raise AdapterFileError(
        f'{directory}: tensors {sorted(set(tensors) ^ set(shapes))[:4]} are '
        f'in one of {META_FILE} and the tensor file but not the other')
  for key, (shape, _) in shapes.items():
    if list(tensors[key].shape) != list(shape):
      raise AdapterFileError(f'{directory}: tensor {key!r} has shape '
                             f'{tensors[key].shape}, {META_FILE} says {shape}')
  return tensors


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """``safetensors.numpy.load_file`` with a clear error on a bad file."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist')
  try:
    return st_numpy.load_file(str(path))
  except Exception as e:  # pylint: disable=broad-except
    raise AdapterFileError(
        f'{path} is not a readable safetensors file ({type(e).__name__}: '
        f'{str(e)[:200]}); it is truncated, corrupted or of another '
        f'format') from None


def load_adapter(directory: str | pathlib.Path, params: PyTree | None = None,
                 *, check_weights: bool = True) -> AdapterBundle:
  """Reads an adapter directory written by ``save_adapter``.

  Args:
    directory: the adapter directory.
    params: the base to check the adapter against (strongly advised); None
      skips the check.
    check_weights: see ``check_base``.

  Returns:
    An ``AdapterBundle``; its arrays are numpy.

  Raises:
    AdapterFileError: a missing, corrupted or inconsistent file, or a base
      that is not the one the adapter was made for.
  """
  directory = pathlib.Path(directory)
  meta_path = directory / META_FILE
  if not meta_path.exists():
    hint = (' (it looks like a Hugging Face PEFT adapter: use '
            'lorajax.io.peft_format.import_peft)'
            if (directory / 'adapter_config.json').exists() else '')
    previous = digests.leftovers(directory)
    if previous and not directory.exists():
      hint = (f' (a save into it was interrupted; the version it replaced '
              f'is {previous[0]})')
    raise AdapterFileError(f'{directory} has no {META_FILE}{hint}')
  try:
    if not digests.verify(directory, fix=REWRITE_HINT):
      logging.warning(
          '%s has no %s (saved by a lorajax from before digests): only the '
          'tensor file\'s sha256 in %s, if any, is checked; save it again to '
          'add a digest', directory, digests.DIGEST_FILE, META_FILE)
  except digests.DigestError as e:
    raise AdapterFileError(str(e)) from None
  try:
    meta = json.loads(meta_path.read_text())
    spec = spec_json.spec_from_json(meta['spec'])
    missing = {'storage', 'tensors', 'base'} - set(meta)
    if missing:
      raise KeyError(', '.join(sorted(missing)))
  except (json.JSONDecodeError, KeyError, ValueError) as e:
    raise AdapterFileError(f'{meta_path} is not a lorajax adapter '
                           f'description: {type(e).__name__}: {e}') from None
  tensors = _read_tensors(directory, meta)
  adapters, trained = {}, {}
  for key, value in tensors.items():
    prefix, path = key.split('/', 1)
    spec_lib.set_by_path(adapters if prefix == 'adapters' else trained, path,
                         value)
  try:
    layouts = {p: kernels.KernelLayout.from_json(d)
               for p, d in meta.get('layouts', {}).items()}
    for path, layout in layouts.items():
      spec_lib.set_by_path(adapters, path, spec_lib.AdapterParams(
          spec_lib.get_by_path(adapters, path), layout=layout))
  except (KeyError, ValueError, TypeError) as e:
    raise AdapterFileError(f'{meta_path}: bad kernel layouts: {e}') from None
  if params is not None:
    check_base(meta['base'], params, spec, check_weights=check_weights,
               source=str(directory))
  return AdapterBundle(adapters, spec, trained, meta['base'],
                       meta.get('metadata', {}))
