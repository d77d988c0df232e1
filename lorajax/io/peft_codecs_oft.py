"""OFT in PEFT directories: its tensors, config and import.

``peft_codecs`` hands OFT over to this module. A PEFT 0.21.2 OFT module
holds one tensor, ``<module>.oft_R.weight`` ``[r, b(b-1)/2]`` (``[1, …]``
with ``block_share``): the upper-triangle entries of its skew-symmetric
blocks, which rotate the Linear's input side. lorajax's ``Oft`` keeps the
same array as ``skew`` (``methods.oft``); the input side does not depend on
the kernel's orientation, so nothing is transposed. The block size of each
module is read from its tensor (PEFT moves a ``oft_block_size`` or ``r``
that does not divide a layer's input to one that does, with a warning).

Options that change what a PEFT model computes and that lorajax does not
implement are refused by name (``check_config``). ``module_dropout`` is
accepted: PEFT 0.21.2 makes the layer but never applies it to a Linear.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax.methods import oft as oft_lib

PREFIX = 'base_model.model.'
KINDS = ('OFT',)
# The PEFT version whose OFT math lorajax reproduces, written on export
# (PEFT reads it to tell the Cayley–Neumann series of 0.18+ from the older).
PEFT_VERSION = '0.21.2'
_NEUMANN_SINCE = (0, 18)
# Config fields lorajax does not implement: (field, the value that is fine).
_MUST_BE = (('coft', False), ('bias', 'none'), ('fan_in_fan_out', False))


class Error(ValueError):
  """Raised as ``peft_codecs.PeftFormatError`` by the caller's wrapper."""


def peft_type(provider: Any) -> str | None:
  """``'OFT'`` or None for another provider."""
  return 'OFT' if isinstance(provider, oft_lib.Oft) else None


def _count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_config(cfg: dict[str, Any], path: Any) -> None:
  """Raises ``Error`` naming each unimplemented or malformed option."""
  for field, fine in _MUST_BE:
    value = cfg.get(field, fine)
    if value != fine:
      raise Error(f'{path}: {field}={value!r} is not supported (lorajax '
                  f'imports OFT with {field}={fine!r})')
  if 'oft_block_size' not in cfg:
    raise Error(f'{path}: no oft_block_size: an OFT adapter of PEFT < 0.14, '
                'whose format neither PEFT 0.21 nor lorajax reads')
  r, size = cfg.get('r', 0), cfg['oft_block_size']
  if not (_count(r) and _count(size)) or (r == 0) == (size == 0):
    raise Error(f'{path}: r={r!r}, oft_block_size={size!r}: exactly one '
                'must be a positive integer, the other 0')
  terms = cfg.get('num_cayley_neumann_terms', 5)
  if not _count(terms) or terms < 1:
    raise Error(f'{path}: num_cayley_neumann_terms={terms!r}: expected an '
                'integer >= 1')
  if cfg.get('use_cayley_neumann', True):
    made = cfg.get('peft_version')
    m = re.match(r'(\d+)\.(\d+)', str(made))
    if made is None or not m or (int(m[1]), int(m[2])) < _NEUMANN_SINCE:
      raise Error(
          f'{path}: use_cayley_neumann=True with peft_version={made!r}: PEFT '
          f'changed that series in 0.18.0, and an adapter of an older (or '
          f'unknown) version would compute differently; lorajax imports the '
          f'series of PEFT >= 0.18')


def method_tensors(provider: Any, module: str, layer_path: str,
                   flat_ad: dict[str, Any], kernel: tuple[int, int]
                   ) -> dict[str, np.ndarray]:
  """The PEFT tensor of one module's OFT adapter."""
  skew = np.asarray(flat_ad[f'{layer_path}/skew'], np.float32)
  try:
    r, b = provider.blocks(kernel[0], layer_path)
  except ValueError as e:
    raise Error(str(e)) from None
  want = (1 if provider.block_share else r, b * (b - 1) // 2)
  if skew.shape != want:
    raise Error(f'{layer_path}: OFT skew of shape {skew.shape}, but {want} '
                f'fits the [in, out] = {kernel} kernel')
  return {f'{PREFIX}{module}.oft_R.weight': np.ascontiguousarray(skew)}


def method_config(targets: dict[str, Any], target_modules: Any
                  ) -> dict[str, Any]:
  """``adapter_config.json`` fields of an OFT adapter.

  Args:
    targets: PEFT module name -> ``Oft``.
    target_modules: PEFT's ``target_modules`` value selecting them.
  """
  providers = set(targets.values())
  if len(providers) > 1:
    raise Error(f'PEFT has one OFT configuration per adapter (no per-module '
                f'patterns); this spec mixes {sorted(map(repr, providers))}')
  p = providers.pop()
  return {'peft_type': 'OFT', 'r': int(p.r),
          'oft_block_size': int(p.block_size),
          'target_modules': target_modules, 'module_dropout': 0.0,
          'fan_in_fan_out': False, 'bias': 'none', 'init_weights': True,
          'coft': False, 'eps': 6e-5, 'block_share': bool(p.block_share),
          'use_cayley_neumann': bool(p.cayley_neumann),
          'num_cayley_neumann_terms': int(p.neumann_terms),
          'exclude_modules': None, 'layers_to_transform': None,
          'layers_pattern': None, 'peft_version': PEFT_VERSION}


def import_method(cfg: dict[str, Any], found: dict[str, dict[str, Any]],
                  modules: dict[str, str], directory: Any,
                  shapes: dict[str, tuple[int, int]]
                  ) -> tuple[dict[str, Any], dict[Any, list[str]]]:
  """OFT blocks per module: ``(adapters, provider -> paths)``.

  Args:
    cfg: the adapter config (checked by ``check_config``).
    found: PEFT module -> {``'oft_R'``: array}.
    modules: PEFT module -> Flax kernel path.
    directory: for messages.
    shapes: Flax kernel path -> ``(in, out)``.
  """
  adapters, groups = {}, collections.defaultdict(list)
  share = bool(cfg.get('block_share', False))
  for module, parts in sorted(found.items()):
    if module not in modules:
      raise Error(f'{directory}: target module {module!r} is not a Linear '
                  f'kernel of this model; kernels: {sorted(modules)[:6]} ...')
    if set(parts) != {'oft_R'}:
      raise Error(f'{directory}: {module} has {sorted(parts)}; lorajax '
                  'imports OFT of Linear layers (oft_R)')
    skew = parts['oft_R']
    path = modules[module]
    n_in = shapes[path][0]
    n = skew.shape[-1] if skew.ndim == 2 else -1
    b = (1 + math.isqrt(1 + 8 * n)) // 2 if n > 0 else 0
    r = n_in // b if b else 0
    if (b * (b - 1) // 2 != n or b < 2 or r * b != n_in
        or skew.shape[0] != (1 if share else r)):
      raise Error(f'{directory}: {module}.oft_R has shape {skew.shape}, '
                  f'which is no set of blocks of its {n_in} inputs '
                  f'(block_share={share})')
    provider = oft_lib.Oft(
        block_size=0 if cfg.get('r') else b, r=r if cfg.get('r') else 0,
        block_share=share,
        cayley_neumann=bool(cfg.get('use_cayley_neumann', True)),
        neumann_terms=int(cfg.get('num_cayley_neumann_terms', 5)))
    spec_lib.set_by_path(adapters, path, {'skew': skew})
    groups[provider].append(path)
  return adapters, groups
