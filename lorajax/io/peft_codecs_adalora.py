"""AdaLoRA in PEFT directories: tensors, ``adapter_config.json`` and imports.

``peft_codecs`` hands ``peft_type: ADALORA`` over to this module. A PEFT
AdaLoRA module holds ``<module>.lora_A`` ``[k, in]`` (``aᵀ``), ``lora_E``
``[k, 1]`` (``e``) and ``lora_B`` ``[out, k]`` (``bᵀ``), with no ``.weight``
suffix. ``k`` is ``init_r``, or, for a module in the config's
``rank_pattern`` (``{"<module>.lora_E": [bool] * init_r}``), the number of
triplets the pattern keeps: PEFT's ``save_pretrained`` drops the others and
``from_pretrained`` rebuilds the module at that rank, still scaling by
``lora_alpha / (init_r + 1e-5)``.

lorajax keeps ``init_r`` slots. An export writes as dropped every triplet
whose ``e`` is zero (the allocator's masked ones; a zero ``e`` adds nothing,
so the PEFT model computes what lorajax does), and an import puts each kept
triplet back in its slot, zeros in the dropped ones.

Options lorajax does not implement are refused by name (``check_config``).
PEFT's AdaLoRA ignores ``r``, ``alpha_pattern`` and ``use_rslora``; so does
the import.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax.methods import adalora

PREFIX = 'base_model.model.'
KINDS = ('ADALORA',)
# Config fields lorajax does not implement: (field, the value that is fine).
_MUST_BE = (('fan_in_fan_out', False), ('bias', 'none'), ('lora_bias', False),
            ('use_dora', False), ('layer_replication', None),
            ('target_parameters', None), ('trainable_token_indices', None),
            ('use_qalora', False), ('use_bdlora', None))
_NAMES = ('lora_A', 'lora_E', 'lora_B')
# Provider field <- adapter_config.json field.
_SCHEDULE = (('target_r', 'target_r'), ('tinit', 'tinit'),
             ('tfinal', 'tfinal'), ('delta_t', 'deltaT'), ('beta1', 'beta1'),
             ('beta2', 'beta2'), ('orth_reg_weight', 'orth_reg_weight'),
             ('total_step', 'total_step'))


class Error(ValueError):
  """Raised as ``peft_codecs.PeftFormatError`` by the caller's wrapper."""


def peft_type(provider: Any) -> str | None:
  return 'ADALORA' if isinstance(provider, adalora.AdaLora) else None


def check_config(cfg: dict[str, Any], path: Any) -> None:
  """Raises ``Error`` naming each unimplemented option or malformed field."""
  for field, fine in _MUST_BE:
    value = cfg.get(field, fine)
    if value != fine and not (fine is None and not value):
      raise Error(f'{path}: {field}={value!r} is not supported (lorajax '
                  f'imports ADALORA with {field}={fine!r})')
  init_r = cfg.get('init_r')
  if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 1:
    raise Error(f'{path}: init_r={init_r!r}: expected an integer >= 1')
  total = cfg.get('total_step')
  if not isinstance(total, int) or isinstance(total, bool) or total < 1:
    raise Error(f'{path}: total_step={total!r}: expected an integer >= 1 '
                '(PEFT\'s AdaLoraConfig refuses anything else)')
  alpha = cfg.get('lora_alpha', 8)
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or (
      alpha <= 0):
    raise Error(f'{path}: lora_alpha={alpha!r} is not supported: PEFT then '
                'scales each module by the rank it has after loading, which '
                'lorajax does not implement; expected a number > 0')
  pattern = cfg.get('rank_pattern') or {}
  if not isinstance(pattern, dict):
    raise Error(f'{path}: rank_pattern={pattern!r}: expected an object of '
                '"<module>.lora_E" -> [bool] * init_r')
  for key, value in pattern.items():
    if (not isinstance(value, list) or len(value) != init_r
        or not all(isinstance(v, bool) for v in value)):
      raise Error(f'{path}: rank_pattern[{key!r}]={value!r}: expected '
                  f'init_r={init_r} booleans')


def method_tensors(provider: adalora.AdaLora, module: str, layer_path: str,
                   flat_ad: dict[str, Any], kernel: tuple[int, int]
                   ) -> dict[str, np.ndarray]:
  """One module's ``lora_A``, ``lora_E``, ``lora_B``, all ``init_r`` slots
  (``method_config`` drops the unused ones)."""
  get = lambda k: np.asarray(flat_ad[f'{layer_path}/{k}'], np.float32)  # pylint: disable=unnecessary-lambda-assignment
  a, e, b = get('a'), get('e'), get('b')
  r = provider.init_r
  if a.shape != (kernel[0], r) or e.shape != (r,) or b.shape != (r, kernel[1]):
    raise Error(f'{layer_path}: AdaLoRA factors a {a.shape}, e {e.shape}, '
                f'b {b.shape} do not fit init_r={r} and the [in, out] = '
                f'{kernel} kernel of {module}')
  name = f'{PREFIX}{module}'
  return {f'{name}.lora_A': np.ascontiguousarray(a.T),
          f'{name}.lora_E': np.ascontiguousarray(e[:, None]),
          f'{name}.lora_B': np.ascontiguousarray(b.T)}


def method_config(targets: dict[str, adalora.AdaLora], target_modules: Any,
                  tensors: dict[str, np.ndarray]) -> dict[str, Any]:
  """``adapter_config.json`` of an AdaLoRA adapter, PEFT's ``rank_pattern``
  of the triplets in use (``e != 0``); the dropped triplets are removed from
  ``tensors`` (in place), as PEFT's ``save_pretrained`` removes them.

  Raises:
    Error: rules that differ (PEFT has one ``AdaLoraConfig``), or a
      provider without ``total_step`` (PEFT refuses that config).
  """
  providers = set(targets.values())
  if len(providers) > 1:
    raise Error(f'PEFT has one AdaLoraConfig per adapter; this spec has '
                f'{len(providers)} different AdaLora rules: '
                f'{sorted(map(repr, providers))}')
  p = providers.pop()
  if p.total_step is None:
    raise Error('AdaLora total_step is None; PEFT\'s AdaLoraConfig refuses '
                'that. Give the provider the total_step it was trained with')
  pattern = {}
  for module in sorted(targets):
    name = f'{PREFIX}{module}'
    keep = tensors[f'{name}.lora_E'][:, 0] != 0
    pattern[f'{module}.lora_E'] = [bool(k) for k in keep]
    if not keep.all():
      for suffix, axis in (('lora_A', 0), ('lora_E', 0), ('lora_B', 1)):
        tensors[f'{name}.{suffix}'] = np.ascontiguousarray(
            np.compress(keep, tensors[f'{name}.{suffix}'], axis=axis))
  trimmed = any(not all(v) for v in pattern.values())
  return {'peft_type': 'ADALORA', 'init_r': p.init_r,
          **{peft: getattr(p, ours) for ours, peft in _SCHEDULE},
          'rank_pattern': pattern if trimmed else None,
          'r': 8,   # PEFT's default; AdaLoRA ignores it (and warns if not 8).
          'lora_alpha': float(p.init_r if p.alpha is None else p.alpha),
          'lora_dropout': float(p.dropout), 'target_modules': target_modules,
          'fan_in_fan_out': False, 'bias': 'none', 'use_rslora': False,
          'use_dora': False, 'init_lora_weights': True,
          'layers_to_transform': None, 'layers_pattern': None}


def _pattern_of(pattern: dict[str, list[bool]], module: str, directory: Any
                ) -> list[bool] | None:
  """``module``'s ``rank_pattern`` entry, None without one; keys may carry
  another head's prefix (``bert.`` or not) and PEFT's adapter name."""
  hits = []
  for key, value in pattern.items():
    name = re.sub(r'\.lora_E(?:\.[^.]+)?$', '', key)
    if name == module or module.endswith('.' + name) or name.endswith(
        '.' + module):
      hits.append(value)
  if len(hits) > 1:
    raise Error(f'{directory}: rank_pattern has {len(hits)} entries for '
                f'{module}')
  return hits[0] if hits else None


def import_method(cfg: dict[str, Any], found: dict[str, dict[str, Any]],
                  modules: dict[str, str], directory: Any,
                  shapes: dict[str, tuple[int, int]]
                  ) -> tuple[dict[str, Any], dict[Any, list[str]]]:
  """AdaLoRA factors per module: ``(adapters, provider -> paths)``.

  Args:
    cfg: the adapter config (checked by ``check_config``).
    found: PEFT module -> {``lora_A``/``lora_E``/``lora_B``: array}.
    modules: PEFT module -> Flax kernel path.
    directory: for messages.
    shapes: Flax kernel path -> ``(in, out)``.
  """
  init_r = int(cfg['init_r'])
  try:
    provider = adalora.AdaLora(
        init_r=init_r, alpha=float(cfg.get('lora_alpha', 8)),
        dropout=float(cfg.get('lora_dropout') or 0.0),
        **{ours: cfg[peft] for ours, peft in _SCHEDULE if peft in cfg})
  except ValueError as e:
    raise Error(f'{directory}: {e}') from None
  pattern = cfg.get('rank_pattern') or {}
  adapters, groups = {}, collections.defaultdict(list)
  for module, parts in sorted(found.items()):
    if module not in modules:
      raise Error(f'{directory}: target module {module!r} is not a Linear '
                  f'kernel of this model; kernels: {sorted(modules)[:6]} ...')
    if set(parts) != set(_NAMES):
      raise Error(f'{directory}: {module} has {sorted(parts)}; AdaLoRA needs '
                  f'{list(_NAMES)}')
    path = modules[module]
    n_in, n_out = shapes[path]
    big_a, big_e, big_b = (parts[n] for n in _NAMES)
    k = big_e.shape[0]
    if (big_a.shape != (k, n_in) or big_e.shape != (k, 1)
        or big_b.shape != (n_out, k)):
      raise Error(f'{directory}: {module} lora_A {big_a.shape}, lora_E '
                  f'{big_e.shape}, lora_B {big_b.shape} do not fit one rank '
                  f'and the [out, in] = [{n_out}, {n_in}] Linear')
    entry = _pattern_of(pattern, module, directory)
    keep = np.ones(init_r, bool) if entry is None else np.asarray(entry, bool)
    if int(keep.sum()) != k:
      said = 'init_r is' if entry is None else 'its rank_pattern keeps'
      raise Error(f'{directory}: {module} holds {k} triplets, but {said} '
                  f'{int(keep.sum())}')
    a = np.zeros((n_in, init_r), np.float32)
    e = np.zeros((init_r,), np.float32)
    b = np.zeros((init_r, n_out), np.float32)
    a[:, keep], e[keep], b[keep] = big_a.T, big_e[:, 0], big_b.T
    spec_lib.set_by_path(adapters, path, {'a': a, 'e': e, 'b': b})
    groups[provider].append(path)
  return adapters, groups
