"""LoKr and VeRA in PEFT directories: their tensors, configs and imports.

``peft_codecs`` hands these two methods over to this module. A PEFT LoKr
module holds ``lokr_w1`` ``[out₁, in₁]`` (or ``lokr_w1_a`` ``[out₁, r]`` and
``lokr_w1_b`` ``[r, in₁]`` under ``decompose_both``) and ``lokr_w2`` or
``lokr_w2_a``/``lokr_w2_b``; lorajax keeps their transposes in ``[in, out]``
orientation (``methods.lokr``). A PEFT VeRA directory holds, per module,
``vera_lambda_d`` ``[r]`` and ``vera_lambda_b`` ``[out]``, and once, the
shared projections ``base_model.vera_A`` ``[r, max_in]`` and
``base_model.vera_B`` ``[max_out, r]`` (``save_projection=True``).

Options that change what a PEFT model computes and that lorajax does not
implement are refused by name (``check_config``).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax.methods import lokr as lokr_lib
from lorajax.methods import vera as vera_lib

PREFIX = 'base_model.model.'
# The shared VeRA projections' keys in adapter_model.safetensors.
SHARED_KEYS = {'a': 'base_model.vera_A', 'b': 'base_model.vera_B'}
KINDS = ('LOKR', 'VERA')
# Config fields lorajax does not implement: (field, the value that is fine).
_MUST_BE = {
    'LOKR': (('rank_dropout', 0.0), ('module_dropout', 0.0),
             ('use_effective_conv2d', False)),
    'VERA': (('vera_dropout', 0.0), ('fan_in_fan_out', False),
             ('bias', 'none'), ('save_projection', True)),
}
_LOKR_NAMES = ('w1', 'w1_a', 'w1_b', 'w2', 'w2_a', 'w2_b')


class Error(ValueError):
  """Raised as ``peft_codecs.PeftFormatError`` by the caller's wrapper."""


def peft_type(provider: Any) -> str | None:
  """``'LOKR'``, ``'VERA'`` or None for another provider."""
  if isinstance(provider, lokr_lib.LoKr):
    return 'LOKR'
  if isinstance(provider, vera_lib.Vera):
    return 'VERA'
  return None


def check_config(cfg: dict[str, Any], path: Any) -> None:
  """Raises ``Error`` naming each unimplemented option ``cfg`` sets."""
  for field, fine in _MUST_BE[cfg['peft_type']]:
    value = cfg.get(field, fine)
    if value != fine:
      raise Error(f'{path}: {field}={value!r} is not supported (lorajax '
                  f'imports {cfg["peft_type"]} with {field}={fine!r})')


def pop_shared(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
  """Removes VeRA's shared projections from ``tensors``; returns them as
  ``{'a', 'b'}`` (empty when absent)."""
  return {k: np.asarray(tensors.pop(key), np.float32)
          for k, key in SHARED_KEYS.items() if key in tensors}


def method_tensors(kind: str, provider: Any, module: str, layer_path: str,
                   flat_ad: dict[str, Any], kernel: tuple[int, int]
                   ) -> dict[str, np.ndarray]:
  """The PEFT tensors of one module's LoKr or VeRA adapter (for VeRA also
  the shared projections, the same for every module)."""
  name = f'{PREFIX}{module}'
  get = lambda k: np.asarray(flat_ad[f'{layer_path}/{k}'], np.float32)  # pylint: disable=unnecessary-lambda-assignment
  if kind == 'VERA':
    proj = provider.projections
    if proj is None or kernel[0] > proj.max_in or kernel[1] > proj.max_out:
      raise Error(f'{layer_path}: its Vera projections {proj!r} do not '
                  f'cover the [in, out] = {kernel} kernel')
    ld, lb = get('lambda_d'), get('lambda_b')
    if ld.shape != (provider.rank,) or lb.shape != (kernel[1],):
      raise Error(f'{layer_path}: lambda_d {ld.shape}, lambda_b {lb.shape} '
                  f'do not fit rank {provider.rank} and the kernel {kernel}')
    return {f'{name}.vera_lambda_d': ld, f'{name}.vera_lambda_b': lb,
            SHARED_KEYS['a']: np.ascontiguousarray(proj.a),
            SHARED_KEYS['b']: np.ascontiguousarray(proj.b)}
  want = provider.factor_shapes(*kernel)
  out = {}
  for k, shape in want.items():
    value = get(k)
    if value.shape != shape:
      raise Error(f'{layer_path}: LoKr factor {k} has shape {value.shape}, '
                  f'but {shape} fits the [in, out] = {kernel} kernel')
    # [in, out]-side factors are PEFT's transposes; a/b swap with the
    # orientation (lorajax w2_a = PEFT lokr_w2_bᵀ).
    peft_name = {'w1': 'w1', 'w2': 'w2', 'w1_a': 'w1_b', 'w1_b': 'w1_a',
                 'w2_a': 'w2_b', 'w2_b': 'w2_a'}[k]
    out[f'{name}.lokr_{peft_name}'] = np.ascontiguousarray(value.T)
  return out


def _one(values: set[Any], what: str) -> Any:
  if len(values) > 1:
    raise Error(f'PEFT has one {what} per adapter; this spec mixes '
                f'{sorted(map(repr, values))}')
  return values.pop()


def method_config(kind: str, targets: dict[str, Any],
                  target_modules: Any) -> dict[str, Any]:
  """``adapter_config.json`` fields of a LoKr or VeRA adapter.

  Args:
    kind: ``'LOKR'`` or ``'VERA'``.
    targets: PEFT module name -> provider.
    target_modules: PEFT's ``target_modules`` value selecting them.
  """
  providers = list(targets.values())
  if kind == 'VERA':
    proj = _one({p.projections for p in providers}, 'set of VeRA projections')
    return {'peft_type': 'VERA', 'r': proj.rank,
            'target_modules': target_modules,
            'projection_prng_key': int(proj.seed or 0),
            'save_projection': True, 'vera_dropout': 0.0,
            'd_initial': float(providers[0].d_initial),
            'fan_in_fan_out': False, 'bias': 'none', 'init_weights': True}
  both = _one({p.decompose_both for p in providers}, 'decompose_both')
  factor = _one({p.decompose_factor for p in providers}, 'decompose_factor')
  alpha_of = lambda p: float(p.rank if p.alpha is None else p.alpha)  # pylint: disable=unnecessary-lambda-assignment
  groups = collections.Counter((p.rank, alpha_of(p)) for p in providers)
  r, alpha = groups.most_common(1)[0][0]
  return {'peft_type': 'LOKR', 'r': int(r), 'alpha': alpha,
          'target_modules': target_modules,
          'rank_pattern': {m: int(p.rank) for m, p in targets.items()
                           if p.rank != r},
          'alpha_pattern': {m: alpha_of(p) for m, p in targets.items()
                            if alpha_of(p) != alpha},
          'decompose_both': bool(both), 'decompose_factor': int(factor),
          'rank_dropout': 0.0, 'module_dropout': 0.0,
          'rank_dropout_scale': False, 'use_effective_conv2d': False,
          'init_weights': True}


def import_method(cfg: dict[str, Any], found: dict[str, dict[str, Any]],
                  modules: dict[str, str], directory: Any,
                  shapes: dict[str, tuple[int, int]],
                  shared: dict[str, np.ndarray], pattern_value: Any
                  ) -> tuple[dict[str, Any], dict[Any, list[str]]]:
  """LoKr or VeRA factors per module: ``(adapters, provider -> paths)``.

  Args:
    cfg: the adapter config (checked by ``check_config``).
    found: PEFT module -> {tensor suffix (``lokr_w1``...): array}.
    modules: PEFT module -> Flax kernel path.
    directory: for messages.
    shapes: Flax kernel path -> ``(in, out)``.
    shared: ``pop_shared``'s projections.
    pattern_value: ``peft_codecs.pattern_value``.
  """
  kind = cfg['peft_type']
  adapters, groups = {}, collections.defaultdict(list)
  proj = None
  if kind == 'VERA':
    if set(shared) != {'a', 'b'}:
      raise Error(f'{directory}: a VeRA adapter without its projections '
                  f'({sorted(SHARED_KEYS.values())}); lorajax does not '
                  f'redraw them from projection_prng_key')
    proj = vera_lib.VeraProjections(shared['a'], shared['b'])
    if cfg.get('r') is not None and int(cfg['r']) != proj.rank:
      raise Error(f'{directory}: vera_A has rank {proj.rank} but the config '
                  f'says r={cfg["r"]}')
  elif shared:
    raise Error(f'{directory}: {sorted(SHARED_KEYS.values())} in a '
                f'{kind} adapter')
  for module, parts in sorted(found.items()):
    if module not in modules:
      raise Error(f'{directory}: target module {module!r} is not a Linear '
                  f'kernel of this model; kernels: {sorted(modules)[:6]} ...')
    path = modules[module]
    n_in, n_out = shapes[path]
    if kind == 'VERA':
      if set(parts) != {'vera_lambda_d', 'vera_lambda_b'}:
        raise Error(f'{directory}: {module} has {sorted(parts)}; VeRA needs '
                    'vera_lambda_d and vera_lambda_b')
      ld, lb = parts['vera_lambda_d'], parts['vera_lambda_b']
      if ld.shape != (proj.rank,) or lb.shape != (n_out,):
        raise Error(f'{directory}: {module} vera_lambda_d {ld.shape}, '
                    f'vera_lambda_b {lb.shape} do not fit r={proj.rank} and '
                    f'out={n_out}')
      if n_in > proj.max_in or n_out > proj.max_out:
        raise Error(f'{directory}: {module} [in, out] = [{n_in}, {n_out}] '
                    f'exceeds the projections {proj!r}')
      spec_lib.set_by_path(adapters, path, {'lambda_d': ld, 'lambda_b': lb})
      groups[vera_lib.Vera(rank=proj.rank, seed=int(cfg.get(
          'projection_prng_key') or 0), d_initial=float(
          cfg.get('d_initial', 0.1)), projections=proj)].append(path)
      continue
    unknown = sorted(k for k in parts if not k.startswith('lokr_')
                     or k[5:] not in _LOKR_NAMES)
    if unknown:
      raise Error(f'{directory}: {module} has {unknown}; lorajax imports '
                  f'LoKr of Linear layers (lokr_w1[_a|_b], lokr_w2[_a|_b])')
    rank = int(pattern_value(cfg.get('rank_pattern') or {}, module,
                             cfg.get('r', 8)))
    alpha = pattern_value(cfg.get('alpha_pattern') or {}, module,
                          cfg.get('alpha', rank))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
      raise Error(f'{directory}: alpha={alpha!r} for {module} is not a '
                  'number')
    provider = lokr_lib.LoKr(
        rank=rank, alpha=float(alpha),
        decompose_both=bool(cfg.get('decompose_both', False)),
        decompose_factor=int(cfg.get('decompose_factor', -1)))
    want = provider.factor_shapes(n_in, n_out)
    swap = {'w1_a': 'w1_b', 'w1_b': 'w1_a', 'w2_a': 'w2_b', 'w2_b': 'w2_a'}
    got = {swap.get(k[5:], k[5:]): v.T for k, v in parts.items()}
    if {k: v.shape for k, v in got.items()} != want:
      raise Error(
          f'{directory}: {module} has LoKr factors '
          f'{ {k: v.shape for k, v in parts.items()} }, but r={rank} on the '
          f'[out, in] = [{n_out}, {n_in}] Linear needs (in lorajax\'s '
          f'[in, out] orientation) {want}')
    spec_lib.set_by_path(adapters, path, got)
    groups[provider].append(path)
  return adapters, groups
