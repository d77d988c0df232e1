"""IA3 and LoHa in PEFT directories: their tensors, configs and imports.

``peft_format`` writes and reads the directories; this module knows the two
methods other than LoRA: IA3's ``ia3_l`` (``[out, 1]`` for a scaled output,
``[1, in]`` for a scaled input) and LoHa's ``hada_w{1,2}_{a,b}``
(``b·ᵀ`` ``[out, r]``, ``a·ᵀ`` ``[r, in]``), and PEFT's target matching.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax import spec_paths
from lorajax.io import hf_models
from lorajax.io import peft_codecs_adalora as ada
from lorajax.io import peft_codecs_kron as kron
from lorajax.io import peft_codecs_oft as oft
from lorajax.methods import ia3 as ia3_lib
from lorajax.methods import loha as loha_lib

PyTree = Any
PREFIX = 'base_model.model.'


class PeftFormatError(ValueError):
  """A PEFT directory lorajax cannot read, or an adapter it cannot write."""


def target_modules(chosen: list[str], universe: list[str]) -> Any:
  """PEFT ``target_modules``: name suffixes if exact, else a regex string."""
  chosen_set = set(chosen)
  for depth in (1, 2, 3):
    suffixes = sorted({'.'.join(m.split('.')[-depth:]) for m in chosen})
    hits = {m for m in universe
            if any(m == s or m.endswith('.' + s) for s in suffixes)}
    if hits == chosen_set:
      return suffixes
  return spec_paths.exact_regex(chosen, universe)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
  """A ``rank_pattern``/``alpha_pattern`` entry for ``module``, else
  ``default``."""
  for key, value in patterns.items():
    if re.fullmatch(rf'(?:.*\.)?(?:{key})', module):
      return value
  return default


def peft_type(provider: Any) -> str:
  if isinstance(provider, ia3_lib.Ia3):
    return 'IA3'
  if isinstance(provider, loha_lib.LoHa):
    return 'LOHA'
  if ada.peft_type(provider):
    return 'ADALORA'
  return kron.peft_type(provider) or oft.peft_type(provider) or 'LORA'


def check_config(cfg: dict[str, Any], path: Any) -> None:
  """Refuses the LoKr/VeRA/OFT options lorajax does not implement."""
  if cfg.get('peft_type') in ada.KINDS:
    try:
      ada.check_config(cfg, path)
    except ada.Error as e:
      raise PeftFormatError(str(e)) from None
  codec = {**dict.fromkeys(kron.KINDS, kron), 'OFT': oft}.get(
      cfg.get('peft_type'))
  if codec is not None:
    try:
      codec.check_config(cfg, path)
    except (kron.Error, oft.Error) as e:
      raise PeftFormatError(str(e)) from None


def bias_path(hf: hf_models.HfModel, module: str) -> str | None:
  """The Flax path of ``module``'s bias, if the model has one."""
  for path, key in hf.keys.items():
    if key == f'{module}.bias':
      return path
  return None


def check_no_bias(hf: hf_models.HfModel, params: PyTree, module: str) -> None:
  """PEFT's IA3 scales a module's whole output, ``(x·W + b)·l``; lorajax's
  ``Ia3`` scales ``x·W``. They agree only where the bias is zero."""
  path = bias_path(hf, module)
  if path is not None and np.any(np.asarray(spec_lib.get_by_path(params,
                                                                 path))):
    raise PeftFormatError(
        f'{module}: PEFT\'s IA3 scales the module\'s output with its bias, '
        f'(x·W + b)·l, and lorajax\'s Ia3 scales x·W only; with the non-zero '
        f'bias {path} the PEFT model would differ. Use Ia3(feedforward=True) '
        f'there, or export format \'merged\'')


def method_tensors(peft_type: str, provider: Any, module: str,
                    layer_path: str, flat_ad: dict[str, Any], layout: Any,
                    kernel: tuple[int, int]) -> dict[str, np.ndarray]:
  """The PEFT tensors of one module's IA3 or LoHa adapter."""
  if layout is not None and (layout.contract, layout.free,
                             layout.batch) != ((0,), (1,), ()):
    raise PeftFormatError(
        f'{layer_path}: the adapter was made for the kernel used as '
        f'{layout.describe()}, but {module} is a Linear that PEFT adapts as '
        f'[in, out]; its logits would differ')
  if peft_type in kron.KINDS:
    try:
      return kron.method_tensors(peft_type, provider, module, layer_path,
                                 flat_ad, kernel)
    except kron.Error as e:
      raise PeftFormatError(str(e)) from None
  if peft_type in oft.KINDS:
    try:
      return oft.method_tensors(provider, module, layer_path, flat_ad, kernel)
    except oft.Error as e:
      raise PeftFormatError(str(e)) from None
  if peft_type in ada.KINDS:
    try:
      return ada.method_tensors(provider, module, layer_path, flat_ad,
                                kernel)
    except ada.Error as e:
      raise PeftFormatError(str(e)) from None
  get = lambda name: np.asarray(flat_ad[f'{layer_path}/{name}'], np.float32)  # pylint: disable=unnecessary-lambda-assignment
  if peft_type == 'IA3':
    l = get('l')
    want = kernel[0] if provider.feedforward else kernel[1]
    if l.shape != (want,):
      raise PeftFormatError(f'{layer_path}: IA3 scale of shape {l.shape} '
                            f'does not fit the [in, out] = {kernel} kernel')
    shape = (1, want) if provider.feedforward else (want, 1)
    return {f'{PREFIX}{module}.ia3_l': np.ascontiguousarray(l.reshape(shape))}
  out = {}
  for i in (1, 2):
    a, b = get(f'a{i}'), get(f'b{i}')
    if (a.shape[0], b.shape[1]) != kernel:
      raise PeftFormatError(f'{layer_path}: LoHa factors a{i} {a.shape}, '
                            f'b{i} {b.shape} do not fit the kernel {kernel}')
    out[f'{PREFIX}{module}.hada_w{i}_a'] = np.ascontiguousarray(b.T)
    out[f'{PREFIX}{module}.hada_w{i}_b'] = np.ascontiguousarray(a.T)
  return out


def method_config(peft_type: str, targets: dict[str, Any],
                   universe: list[str],
                   tensors: dict[str, np.ndarray] | None = None
                   ) -> dict[str, Any]:
  """``adapter_config.json`` fields of an IA3 or LoHa adapter (AdaLoRA:
  also drops its unused triplets from ``tensors``)."""
  if peft_type in ada.KINDS:
    try:
      return ada.method_config(
          targets, target_modules(sorted(targets), universe), tensors)
    except ada.Error as e:
      raise PeftFormatError(str(e)) from None
  modules = sorted(targets)
  if peft_type in kron.KINDS:
    try:
      return kron.method_config(peft_type, targets,
                                target_modules(modules, universe))
    except kron.Error as e:
      raise PeftFormatError(str(e)) from None
  if peft_type in oft.KINDS:
    try:
      return oft.method_config(targets, target_modules(modules, universe))
    except oft.Error as e:
      raise PeftFormatError(str(e)) from None
  if peft_type == 'IA3':
    ff = sorted(m for m, p in targets.items() if p.feedforward)
    return {'peft_type': 'IA3', 'target_modules': target_modules(
        modules, universe), 'feedforward_modules': (
            target_modules(ff, universe) if ff else []),
            'fan_in_fan_out': False, 'init_ia3_weights': True}
  groups = collections.Counter(
      (p.rank, p.rank if p.alpha is None else p.alpha)
      for p in targets.values())
  r, alpha = groups.most_common(1)[0][0]
  return {'peft_type': 'LOHA', 'r': int(r), 'alpha': float(alpha),
          'target_modules': target_modules(modules, universe),
          'rank_pattern': {m: int(p.rank) for m, p in targets.items()
                           if p.rank != r},
          'alpha_pattern': {m: float(p.alpha or p.rank)
                            for m, p in targets.items()
                            if (p.alpha or p.rank) != alpha},
          'rank_dropout': 0.0, 'module_dropout': 0.0,
          'use_effective_conv2d': False, 'init_weights': True}


def matches(patterns: Any, module: str) -> bool:
  """PEFT's target matching: a regex string (full match) or name suffixes."""
  if not patterns:
    return False
  if isinstance(patterns, str):
    return re.fullmatch(patterns, module) is not None
  return any(module == p or module.endswith('.' + p) for p in patterns)


def import_method(cfg, found, modules, directory, hf, params, shared=None):
  """IA3 or LoHa factors per module: ``(adapters, provider -> paths,
  folded biases)``.

  PEFT's IA3 scales a non-feed-forward module's output with its bias,
  ``(x·W + b)·l``; lorajax's ``Ia3`` scales ``x·W``, so the scaled bias
  ``b·l`` is returned as a trained leaf (exact, and it needs ``params``).
  """
  kind = cfg['peft_type']
  if kind in kron.KINDS:   # shared: VeRA's projections (kron.pop_shared).
    try:
      return (*kron.import_method(cfg, found, modules, directory,
                                  hf.expected_shapes(), shared or {},
                                  pattern_value), {})
    except kron.Error as e:
      raise PeftFormatError(str(e)) from None
  if kind in oft.KINDS:
    try:
      return (*oft.import_method(cfg, found, modules, directory,
                                 hf.expected_shapes()), {})
    except oft.Error as e:
      raise PeftFormatError(str(e)) from None
  if kind in ada.KINDS:
    try:
      return (*ada.import_method(cfg, found, modules, directory,
                                 hf.expected_shapes()), {})
    except ada.Error as e:
      raise PeftFormatError(str(e)) from None
  adapters, groups, folded = {}, collections.defaultdict(list), {}
  want = {'ia3_l'} if kind == 'IA3' else {'hada_w1_a', 'hada_w1_b',
                                         'hada_w2_a', 'hada_w2_b'}
  for module, parts in sorted(found.items()):
    if module not in modules:
      raise PeftFormatError(
          f'{directory}: target module {module!r} is not a Linear kernel of '
          f'this model; kernels: {sorted(modules)[:6]} ...')
    if set(parts) != want:
      raise PeftFormatError(f'{directory}: {module} has {sorted(parts)} but '
                            f'a {kind} adapter needs {sorted(want)}')
    path = modules[module]
    if kind == 'IA3':
      l = parts['ia3_l']
      feedforward = matches(cfg.get('feedforward_modules'), module)
      if l.ndim != 2 or l.shape[0 if feedforward else 1] != 1:
        raise PeftFormatError(
            f'{directory}: {module}.ia3_l has shape {l.shape}, but the '
            f'config says the module is '
            f'{"" if feedforward else "not "}a feed-forward module '
            f'({"[1, in]" if feedforward else "[out, 1]"})')
      spec_lib.set_by_path(adapters, path, {'l': l.reshape(-1)})
      groups[ia3_lib.Ia3(feedforward=feedforward)].append(path)
      bias = None if feedforward else bias_path(hf, module)
      if bias is not None:
        if params is None:
          raise PeftFormatError(
              f'{directory}: IA3 scales {module} with its bias; pass the '
              f'base params to import_peft so the scaled bias can be kept')
        folded[bias] = np.asarray(spec_lib.get_by_path(params, bias),
                                  np.float32) * l.reshape(-1)
      continue
    r = parts['hada_w1_a'].shape[1]
    r_cfg = pattern_value(cfg.get('rank_pattern') or {}, module, cfg.get('r'))
    if r_cfg is not None and int(r_cfg) != r:
      raise PeftFormatError(f'{directory}: {module} has LoHa rank {r} but '
                            f'the config says r={r_cfg}')
    alpha = pattern_value(cfg.get('alpha_pattern') or {}, module,
                           cfg.get('alpha', r))
    if alpha is None or not isinstance(alpha, (int, float)):
      raise PeftFormatError(f'{directory}: alpha={alpha!r} for {module} is '
                            f'not a number')
    spec_lib.set_by_path(adapters, path, {
        'a1': parts['hada_w1_b'].T, 'b1': parts['hada_w1_a'].T,
        'a2': parts['hada_w2_b'].T, 'b2': parts['hada_w2_a'].T})
    groups[loha_lib.LoHa(rank=int(r), alpha=float(alpha))].append(path)
  return adapters, groups, folded
