"""PEFT LoRA adapters of mixture-of-experts decoders (Mixtral, Qwen3-MoE).

transformers 5 keeps a layer's experts as two 3-D parameters of one module,
``mlp.experts.gate_up_proj`` ``[E, 2f, d]`` and ``mlp.experts.down_proj``
``[E, d, f]``, and its router as the 2-D parameter ``mlp.gate.weight``;
none of them is a ``Linear``, so PEFT 0.21 reaches them only through
``target_parameters`` (its ``ParamWrapper``), while the attention
projections stay ``target_modules``. ``ParamWrapper`` stores a rank-``r``
LoRA of ``E`` experts as one pair of Linear weights:

- ``lora_A.weight`` ``[E·r, in]``, expert-major: rows ``e·r .. e·r+r-1``
  are expert ``e``'s ``Aₑ`` — lorajax's ``a[e]`` ``[in, r]`` transposed;
- ``lora_B.weight`` ``[out, r·E]``, expert-minor: column ``j·E + e`` is
  column ``j`` of expert ``e``'s ``Bₑ`` — lorajax's ``b[e]`` ``[r, out]``
  transposed;

and ``ΔWₑ = (α/r)·Bₑ·Aₑ`` (``[out, in]``), the same update as lorajax's
``(α/r)·a[e]·b[e]`` on the ``[E, in, out]`` kernel. When both expert
parameters of a module are targeted PEFT nests the wrappers in the order
the module defines them (``gate_up_proj`` first), so ``down_proj``'s
factors are ``mlp.experts.lora_A.weight`` and ``gate_up_proj``'s
``mlp.experts.base_layer.lora_A.weight``.

What ``ParamWrapper`` refuses (dropout, DoRA, LoRA biases) and what one
adapter config cannot say here (several ranks or alphas, modules saved
whole) is refused by name before anything is written.

Example:

  >>> export_moe_lora('/tmp/peft', config, spec, adapters, params)  # doctest: +SKIP
  >>> spec, adapters, cfg = import_moe_lora('/tmp/peft', config)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax import spec_paths
from lorajax.io import adapter_files
from lorajax.io import hf_models
from lorajax.io import peft_codecs
from lorajax.methods import low_rank as lora_lib
from lorajax.models import hf_moe
from lorajax.models import llama_layout
from lorajax.models import moe

PyTree = Any
PREFIX = peft_codecs.PREFIX
PeftFormatError = peft_codecs.PeftFormatError
CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
# The experts module's 3-D parameters, in the order transformers defines
# them (PEFT wraps the first targeted one innermost).
EXPERT_PARAMS = ('gate_up_proj', 'down_proj')
_EXPERT_LAYOUT = spec_lib.KernelLayout(0, (1,), (2,), (0,))
_DENSE_LAYOUT = spec_lib.KernelLayout(0, (0,), (1,))
_FACTOR = re.compile(r'(.+?)\.((?:base_layer\.)*)(lora_A|lora_B)\.weight')
# adapter_config.json fields this codec does not implement: (field, fine).
_MUST_BE = (('peft_type', 'LORA'), ('use_dora', False),
            ('fan_in_fan_out', False), ('bias', 'none'), ('lora_bias', False),
            ('layer_replication', None), ('modules_to_save', None),
            ('rank_pattern', {}), ('alpha_pattern', {}),
            ('trainable_token_indices', None), ('use_qalora', False),
            ('layers_to_transform', None))


def _is_expert(path: str) -> bool:
  return '/mlp/experts/' in path


def _unscanned(config: moe.MoeConfig, tree: PyTree) -> PyTree:
  if config.scan_layers and isinstance(tree, dict) and 'layers' in tree:
    return llama_layout.unscan_params(tree)
  return tree


def _peft_name(key: str) -> tuple[str, str]:
  """transformers key -> (module, parameter name)."""
  module, name = key.rsplit('.', 1)
  return module, name


def export_moe_lora(directory: str | pathlib.Path, config: moe.MoeConfig,
                    spec: spec_lib.LoraSpec, adapters: PyTree,
                    params: PyTree, *,
                    base_model_name_or_path: str | None = None
                    ) -> pathlib.Path:
  """Writes a PEFT LoRA directory for ``*ForCausalLM`` of ``config``.

  Args:
    directory: created if needed.
    config: the ``MoeConfig`` (``lorajax.models.load(...).config``).
    spec: ``Lora`` rules only, one rank, alpha and ``use_rslora``, no
      dropout; nothing trained outright.
    adapters: the adapters (unscanned or scanned layout).
    params: the params they run with.
    base_model_name_or_path: recorded for PEFT's loader.

  Returns:
    The directory; ``PeftModel.from_pretrained(<transformers model>,
    directory)`` computes lorajax's logits.

  Raises:
    PeftFormatError: naming the path and value of what PEFT's
      ``ParamWrapper`` / one adapter config cannot hold.
  """
  resolution = spec_lib.resolve(spec, params)
  if resolution.trained:
    raise PeftFormatError(
        f'{resolution.trained[0]} is trained outright; this export writes '
        'LoRA factors only (modules_to_save is not implemented for MoE '
        'decoders)')
  settings = set()
  for path, provider in resolution.adapted.items():
    if type(provider) is not lora_lib.Lora:  # pylint: disable=unidiomatic-typecheck
      raise PeftFormatError(
          f'{path}: {type(provider).__name__} adapters are not exported for '
          "MoE decoders (PEFT's ParamWrapper takes plain LoRA only)")
    if provider.dropout:
      raise PeftFormatError(
          f'{path}: dropout={provider.dropout}; PEFT refuses lora_dropout '
          'on target_parameters (expert and router weights), and one '
          'adapter config has one lora_dropout')
    alpha = provider.rank if provider.alpha is None else provider.alpha
    settings.add((provider.rank, alpha, provider.use_rslora))
  if len(settings) != 1:
    raise PeftFormatError(
        f'the spec uses {len(settings)} (rank, alpha, use_rslora) settings '
        f'{sorted(settings)}; this export writes one (no rank_pattern for '
        'target_parameters)')
  (rank, alpha, rslora), = settings
  keys = hf_moe.hf_keys(config.replace(scan_layers=False), 'model.')
  flat = dict(spec_lib.flatten_paths(_unscanned(config, adapters)))
  layer_paths = [p for p in resolution.adapted]
  if config.scan_layers:
    layer_paths = [re.sub(r'^layers/', f'layers_{i}/', p)
                   for p in layer_paths for i in range(config.num_layers)]
  tensors, modules, parameters = {}, [], []
  for path in layer_paths:
    if path not in keys or not path.endswith('/kernel'):
      raise PeftFormatError(f'{path}: no Linear or expert weight of '
                            f'{type(config).__name__} in transformers')
    a = np.asarray(flat[f'{path}/a'], np.float32)
    b = np.asarray(flat[f'{path}/b'], np.float32)
    key = keys[path]
    if _is_expert(path):
      e, d_in, r = a.shape
      tensors[key] = (a.transpose(0, 2, 1).reshape(e * r, d_in),
                      b.transpose(2, 1, 0).reshape(b.shape[2], r * e))
      parameters.append(key)
    elif path.endswith('/mlp/gate/kernel'):
      tensors[key] = (a.T, b.T)
      parameters.append(key)
    else:
      tensors[key] = (a.T, b.T)
      modules.append(_peft_name(key)[0])
  out = {}
  for key, (lora_a, lora_b) in tensors.items():
    module, name = _peft_name(key)
    nest = ''
    if name in EXPERT_PARAMS:
      targeted = [p for p in EXPERT_PARAMS if f'{module}.{p}' in tensors]
      nest = 'base_layer.' * (len(targeted) - 1 - targeted.index(name))
    for factor, value in (('lora_A', lora_a), ('lora_B', lora_b)):
      out[f'{PREFIX}{module}.{nest}{factor}.weight'] = np.ascontiguousarray(
          value)
  linear = sorted(_peft_name(k)[0] for p, k in keys.items()
                  if p.endswith('/kernel') and '/attn/' in p)
  cfg = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': base_model_name_or_path,
      'r': int(rank), 'lora_alpha': alpha, 'lora_dropout': 0.0,
      'use_rslora': bool(rslora), 'use_dora': False,
      'target_modules': (peft_codecs.target_modules(sorted(modules), linear)
                         if modules else None),
      'target_parameters': sorted(parameters) or None,
      'rank_pattern': {}, 'alpha_pattern': {}, 'fan_in_fan_out': False,
      'bias': 'none', 'modules_to_save': None, 'inference_mode': True,
      'init_lora_weights': True, 'layers_to_transform': None,
      'layers_pattern': None, 'revision': None,
  }
  hf_models.write_files(directory, {WEIGHTS_FILE: out, CONFIG_FILE: cfg})
  return pathlib.Path(directory)


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{directory} has no {CONFIG_FILE}')
  cfg = json.loads(path.read_text())
  for field, fine in _MUST_BE:
    value = cfg.get(field, fine)
    if value != fine and not (not fine and not value):
      raise PeftFormatError(f'{path}: {field}={value!r} is not supported '
                            f'for MoE decoders ({field} must be {fine!r})')
  return cfg


def _targeted(module: str, patterns: list[str]) -> list[str]:
  """The expert parameters of ``module`` that ``target_parameters``
  names, in definition order (PEFT's nesting order)."""
  return [p for p in EXPERT_PARAMS
          if any(f'{module}.{p}' == t or f'{module}.{p}'.endswith(f'.{t}')
                 for t in patterns)]


def import_moe_lora(directory: str | pathlib.Path, config: moe.MoeConfig
                    ) -> tuple[spec_lib.LoraSpec, PyTree, dict[str, Any]]:
  """Reads a PEFT LoRA directory made on a Mixtral / Qwen3-MoE model.

  Args:
    directory: ``adapter_config.json`` + ``adapter_model.safetensors``,
      made on ``*ForCausalLM`` or the bare ``*Model``.
    config: the lorajax ``MoeConfig`` (unscanned).

  Returns:
    ``(spec, adapters, adapter_config)``: run with
    ``lorajax.lora(apply_fn, spec)(params, adapters, ...)``.

  Raises:
    PeftFormatError: an unsupported option (named with its value), a
      tensor of no module the model has, factors of the wrong shape.
  """
  directory = pathlib.Path(directory)
  cfg = _read_config(directory)
  tensors = adapter_files.read_safetensors(directory / WEIGHTS_FILE)
  keys = hf_moe.hf_keys(config.replace(scan_layers=False), 'model.')
  by_key = {k: p for p, k in keys.items() if p.endswith('/kernel')}
  shapes = hf_moe.expected_shapes(config.replace(scan_layers=False))
  patterns = list(cfg.get('target_parameters') or [])
  r = int(cfg['r'])
  factors: dict[str, dict[str, np.ndarray]] = {}
  for name, value in tensors.items():
    m = _FACTOR.fullmatch(name.removeprefix(PREFIX))
    if not m:
      raise PeftFormatError(f'{directory / WEIGHTS_FILE}: {name!r} is not a '
                            'LoRA factor')
    module, nest, factor = m.groups()
    if module.startswith('layers.'):  # made on the bare *Model
      module = 'model.' + module
    if module.endswith('.mlp.experts'):
      targeted = _targeted(module, patterns)
      depth = nest.count('base_layer.')
      if depth >= len(targeted):
        raise PeftFormatError(f'{name!r}: target_parameters={patterns} '
                              f'names no parameter for this nesting')
      key = f'{module}.{targeted[len(targeted) - 1 - depth]}'
    else:
      key = f'{module}.weight'
    if key not in by_key:
      raise PeftFormatError(f'{directory / WEIGHTS_FILE}: {name!r}: '
                            f'{type(config).__name__} has no kernel {key!r}')
    factors.setdefault(by_key[key], {})[factor] = np.asarray(value,
                                                             np.float32)
  adapters: dict = {}
  for path, pair in factors.items():
    lora_a, lora_b = pair['lora_A'], pair['lora_B']
    want = shapes[path]
    if _is_expert(path):
      e, d_in, d_out = want
      if lora_a.shape != (e * r, d_in) or lora_b.shape != (d_out, r * e):
        raise PeftFormatError(f'{path}: factors {lora_a.shape}, '
                              f'{lora_b.shape} do not fit {e} experts '
                              f'[{d_in}, {d_out}] at r={r}')
      a = lora_a.reshape(e, r, d_in).transpose(0, 2, 1)
      b = lora_b.reshape(d_out, r, e).transpose(2, 1, 0)
      layout = _EXPERT_LAYOUT
    else:
      if lora_a.shape != (r, want[0]) or lora_b.shape != (want[1], r):
        raise PeftFormatError(f'{path}: factors {lora_a.shape}, '
                              f'{lora_b.shape} do not fit {want} at r={r}')
      a, b, layout = lora_a.T, lora_b.T, _DENSE_LAYOUT
    spec_lib.set_by_path(adapters, path, spec_lib.AdapterParams(
        {'a': np.ascontiguousarray(a), 'b': np.ascontiguousarray(b)},
        layout=layout))
  if not adapters:
    raise PeftFormatError(f'{directory / WEIGHTS_FILE} holds no factors')
  provider = lora_lib.Lora(rank=r, alpha=cfg.get('lora_alpha', r),
                           use_rslora=bool(cfg.get('use_rslora', False)))
  spec = spec_paths.spec_from_actions({p: provider for p in factors},
                                      list(shapes))
  return spec, adapters, cfg
