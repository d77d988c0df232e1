"""``export_peft``: lorajax adapters as a Hugging Face PEFT directory.

Writes ``adapter_config.json`` and ``adapter_model.safetensors`` in the form
``lorajax.io.peft_format`` describes (and ``import_peft`` reads back): LoRA
(with DoRA's magnitudes, rsLoRA and per-module rank/alpha patterns), IA3,
LoHa, LoKr, VeRA, OFT and AdaLoRA adapters, the modules a run trained whole
as ``modules_to_save``, and trained token rows. What a PEFT model would
compute differently is refused before anything is written.

Example:

  >>> out = export_peft('/tmp/peft', config, spec, adapters, params)
  ... # doctest: +SKIP
"""

from __future__ import annotations

import collections
import os
import pathlib
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax.io import hf_models
from lorajax.io import peft_codecs
from lorajax.io import peft_format
from lorajax.io import peft_moe
from lorajax.io import peft_tokens
from lorajax.methods import adalora as adalora_lib
from lorajax.methods import dora as dora_lib
from lorajax.methods import ia3 as ia3_lib
from lorajax.methods import loha as loha_lib
from lorajax.methods import lokr as lokr_lib
from lorajax.methods import low_rank as lora_lib
from lorajax.methods import oft as oft_lib
from lorajax.methods import pissa
from lorajax.methods import qlora
from lorajax.methods import vera as vera_lib
from lorajax.models import moe

PyTree = Any
CONFIG_FILE = peft_format.CONFIG_FILE
WEIGHTS_FILE = peft_format.WEIGHTS_FILE
PREFIX = peft_format.PREFIX
PeftFormatError = peft_format.PeftFormatError


def export_peft(directory: str | pathlib.Path, config: Any,
                spec: spec_lib.LoraSpec, adapters: PyTree, params: PyTree, *,
                base_model_name_or_path: str | None = None,
                source: str | os.PathLike[str] | None = None,
                head: str | None = None,
                tokens: peft_tokens.Tokens | None = None) -> pathlib.Path:
  """Writes ``adapter_config.json`` + ``adapter_model.safetensors``.

  Args:
    directory: created if needed.
    config: the ``BertConfig`` or ``LlamaConfig`` of the model.
    spec: the spec the adapters were made with; its adapter rules must be
      ``Lora`` with one ``use_rslora`` setting.
    adapters: the adapters (unscanned or scanned layout).
    params: the params they run with; leaves the spec trains are saved whole
      as ``modules_to_save`` (every parameter of their HF module).
    base_model_name_or_path: recorded in the config for PEFT's loader;
      default ``source``.
    source: the Hugging Face checkpoint directory the model was loaded
      from (``lorajax.models.load``); None for the shipped models.
    head: the head whose transformers class PEFT will wrap (default: the
      source's own; see ``hf_models.hf_model``).
    tokens: trained token rows ``(TrainableTokens, values)``, written as
      LoRA's ``trainable_token_indices`` (or, without adapters, as PEFT's
      ``TRAINABLE_TOKENS``; ``io.peft_tokens``).

  Returns:
    The directory.

  Raises:
    PeftFormatError: before anything is written: a provider other than
      ``Lora`` or ``Dora``, mixed ``use_rslora``, a kernel with no HF
      module, a trained leaf in a LoRA-targeted module, a quantized base
      (``QLora``), factors or a head of shapes the model does not have, or
      a model config transformers cannot express (mean pooling).
  """
  if tokens is not None and isinstance(config, moe.MoeConfig):
    peft_tokens.check_exportable(config, 'LORA')
  if isinstance(config, moe.MoeConfig):  # experts: target_parameters
    return peft_moe.export_moe_lora(
        directory, config, spec, adapters, params,
        base_model_name_or_path=base_model_name_or_path)
  pissa.check_portable(spec, 'export_peft')
  hf = hf_models.hf_model(config, source=source, head=head)
  if base_model_name_or_path is None and source is not None:
    base_model_name_or_path = str(source)
  try:
    hf.check_expressible()
  except ValueError as e:
    raise PeftFormatError(str(e)) from None
  resolution = spec_lib.resolve(spec, params)
  providers = {}
  for path, provider in resolution.adapted.items():
    if isinstance(provider, (qlora.QLora, qlora.Quantized)):
      raise PeftFormatError(
          f'{path}: {type(provider).__name__} adapters cannot be written '
          f'as PEFT LoRA: they run on a quantized kernel, and PEFT puts a '
          f'LoRA adapter on the float base it loads, whose logits differ by '
          f'the quantization error. Export format \'merged\' (the adapter '
          f'folded into the dequantized kernels) instead')
    if not isinstance(provider, (lora_lib.Lora, dora_lib.Dora, ia3_lib.Ia3,
                                 adalora_lib.AdaLora,
                                 loha_lib.LoHa, lokr_lib.LoKr, vera_lib.Vera,
                                 oft_lib.Oft)):
      raise PeftFormatError(
          f'{path}: {type(provider).__name__} adapters have no PEFT format '
          f'lorajax writes; Lora, Dora, Ia3 and LoHa adapters are exported')
    providers[path] = provider
  kinds = {peft_codecs.peft_type(p) for p in providers.values()}
  if len(kinds) > 1:
    raise PeftFormatError(f'a PEFT directory holds one method; this spec '
                          f'mixes {sorted(kinds)}')
  peft_type = kinds.pop() if kinds else 'LORA'
  if tokens is not None:
    peft_tokens.check_exportable(config, peft_type)
  quantized = [p for p, leaf in spec_lib.flatten_paths(params)
               if isinstance(leaf, spec_lib.FrozenKernel)]
  if quantized:
    raise PeftFormatError(
        f'{len(quantized)} kernels of the base are quantized (e.g. '
        f'{quantized[0]}); PEFT would load the float base, so its logits '
        f'would differ. Export format \'merged\', or pass the float base')
  for what, values in (
      ('use_rslora', {getattr(p, 'use_rslora', False)
                      for p in providers.values()}),
      ('use_dora', {isinstance(p, dora_lib.Dora) for p in providers.values()})):
    if len(values) > 1:
      raise PeftFormatError(f'PEFT has one {what} setting per adapter; this '
                            f'spec mixes both')
  use_dora = any(isinstance(p, dora_lib.Dora) for p in providers.values())
  unscanned = hf.unscan(adapters)
  flat_ad = dict(spec_lib.flatten_paths(unscanned))
  shapes = hf.expected_shapes()
  trained = set(resolution.trained)
  tensors, targets = {}, {}
  for path, provider in providers.items():
    for layer_path in _unscanned_paths(hf, path):
      if layer_path not in hf.keys:
        raise PeftFormatError(f'{layer_path}: no Hugging Face module for this '
                              f'kernel in {hf.architecture}')
      module = hf.module_of(layer_path)
      layout = getattr(spec_lib.get_by_path(unscanned, layer_path),
                       'layout', None)
      if peft_type != 'LORA':
        if peft_type == 'IA3' and not provider.feedforward:
          peft_codecs.check_no_bias(hf, params, module)
        tensors.update(peft_codecs.method_tensors(
            peft_type, provider, module, layer_path, flat_ad, layout,
            shapes[layer_path]))
        targets[module] = provider
        continue
      a = np.asarray(flat_ad[f'{layer_path}/a'], np.float32)
      b = np.asarray(flat_ad[f'{layer_path}/b'], np.float32)
      if a.ndim != 2 or b.ndim != 2:
        raise PeftFormatError(f'{layer_path}: adapter factors {a.shape}, '
                              f'{b.shape} are not 2-D')
      if layout is not None and (layout.contract, layout.free,
                                 layout.batch) != ((0,), (1,), ()):
        raise PeftFormatError(
            f'{layer_path}: the adapter was made for the kernel used as '
            f'{layout.describe()}, but {module} is a Linear whose factors '
            f'PEFT applies as [in, out]; its logits would differ')
      kernel = shapes[layer_path]
      if (a.shape[0], b.shape[1]) != kernel or a.shape[1] != b.shape[0]:
        raise PeftFormatError(
            f'{layer_path}: factors a {a.shape}, b {b.shape} do not fit '
            f'the [in, out] = {kernel} kernel of {module}')
      tensors[f'{PREFIX}{module}.lora_A.weight'] = np.ascontiguousarray(a.T)
      tensors[f'{PREFIX}{module}.lora_B.weight'] = np.ascontiguousarray(b.T)
      if use_dora:
        tensors[f'{PREFIX}{module}.lora_magnitude_vector'] = np.asarray(
            flat_ad[f'{layer_path}/m'], np.float32).reshape(-1)
      alpha = provider.rank if provider.alpha is None else provider.alpha
      targets[module] = (provider.rank, alpha, provider.dropout)
  # PEFT's sequence-classification wrapper always saves (and expects) the
  # head, trained or not.
  saved = {hf.module_of(p) for p in hf.head_paths()}
  for path in trained:
    for layer_path in _unscanned_paths(hf, path):
      if hf.unused(layer_path):
        continue   # A bare model's spare classifier: not in its class.
      module = hf.module_of(layer_path)
      if module in targets:
        raise PeftFormatError(
            f'{layer_path} is trained outright but its module {module} also '
            f'has a LoRA adapter; PEFT cannot save both')
      saved.add(module)
  try:
    state = hf.state_dict(params)
  except ValueError as e:
    raise PeftFormatError(str(e)) from None
  for module in sorted(saved):
    for key, value in state.items():
      if key.rsplit('.', 1)[0] == module:
        tensors[f'{PREFIX}{key}'] = value
  # PEFT names a head by its top module (RoBERTa's ``classifier`` holds
  # ``dense`` and ``out_proj``).
  saved = {m.split('.')[0] if hf.is_head_module(m) else m for m in saved}
  # Target names must select these modules only, among all the class has.
  universe = sorted(set(hf.kernel_modules()) | hf.source_modules())
  common_cfg = {
      'task_type': hf.task_type,
      'base_model_name_or_path': base_model_name_or_path,
      'modules_to_save': sorted(saved) or None, 'inference_mode': True,
      'revision': None,
  }
  if peft_type != 'LORA':
    cfg = {**peft_codecs.method_config(peft_type, targets, universe,
                                       tensors), **common_cfg}
    hf_models.write_files(directory, {WEIGHTS_FILE: tensors, CONFIG_FILE: cfg})
    return pathlib.Path(directory)
  common = collections.Counter(
      (r, a) for r, a, _ in targets.values()).most_common(1)
  r, alpha = common[0][0] if common else (8, 8)
  cfg = {
      'peft_type': 'LORA', 'task_type': hf.task_type,
      'base_model_name_or_path': base_model_name_or_path,
      'r': int(r), 'lora_alpha': alpha,
      'lora_dropout': max((d for _, _, d in targets.values()), default=0.0),
      'target_modules': peft_codecs.target_modules(sorted(targets), universe),
      'rank_pattern': {m: int(t[0]) for m, t in targets.items() if t[0] != r},
      'alpha_pattern': {m: t[1] for m, t in targets.items() if t[1] != alpha},
      'use_rslora': bool(providers and next(iter(
          providers.values())).use_rslora),
      'use_dora': use_dora, 'fan_in_fan_out': False, 'bias': 'none',
      'modules_to_save': sorted(saved) or None, 'inference_mode': True,
      'init_lora_weights': True, 'layers_to_transform': None,
      'layers_pattern': None, 'revision': None,
  }
  if tokens is not None:   # trainable_token_indices, or TRAINABLE_TOKENS
    more, fields = peft_tokens.export_parts(hf, tokens, alone=not targets,
                                            saved=saved)
    tensors.update(more)
    cfg = ({**{k: v for k, v in common_cfg.items() if k != 'modules_to_save'},
            **fields} if not targets else {**cfg, **fields})
  hf_models.write_files(directory, {WEIGHTS_FILE: tensors, CONFIG_FILE: cfg})
  return pathlib.Path(directory)


def _unscanned_paths(hf: hf_models.HfModel, path: str) -> list[str]:
  """``layers/x`` of a scanned Llama -> ``layers_{i}/x`` for every layer."""
  if hf.scanned and path.startswith('layers/'):
    rest = path[len('layers/'):]
    return [f'layers_{i}/{rest}' for i in range(hf.config.num_layers)]
  return [path]
