"""Hugging Face PEFT adapter directories, both ways.

A PEFT LoRA directory holds ``adapter_config.json`` and
``adapter_model.safetensors``. Tensor keys are
``base_model.model.<HF module>.lora_A.weight`` (``a.T``, ``[r, in]``) and
``...lora_B.weight`` (``b.T``, ``[out, r]``); modules trained outright (a
classifier head) are stored whole as ``base_model.model.<HF module>.weight``
and listed in ``modules_to_save``. The config gives ``r``, ``lora_alpha``,
``use_rslora`` (scale ``alpha/sqrt(r)``), ``use_dora`` (then each module also
has ``lora_magnitude_vector``, DoRA's ``m`` ``[out]``), per-module
``rank_pattern`` / ``alpha_pattern`` and ``target_modules``.

``export_peft`` writes lorajax ``Lora`` (or ``Dora``) adapters of the shipped
BERT and Llama models in that form; ``import_peft`` reads such a directory
into a spec, adapters and trained leaves. What PEFT can say and lorajax
cannot (another method, LoRA on embeddings, LoRA biases) is an error that
names it, and so is what lorajax computes and a PEFT model would not (a
mean-pooling BERT, adapters trained on a quantized base, bottleneck
adapters); a refused export writes nothing.

Example:

  >>> export_peft('/tmp/peft', config, spec, adapters, params)   # doctest: +SKIP
  >>> imported = import_peft('/tmp/peft', config, params)        # doctest: +SKIP
  >>> fn = lorajax.lora(apply_fn, imported.spec)                 # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax import spec_paths
from lorajax.io import adapter_files
from lorajax.io import hf_models
from lorajax.methods import dora as dora_lib
from lorajax.methods import low_rank as lora_lib
from lorajax.methods import pissa
from lorajax.methods import qlora

PyTree = Any
CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
# Config fields that change what a LoRA adapter computes and that lorajax's
# Lora does not implement: (field, value that is fine).
_MUST_BE = (('fan_in_fan_out', False), ('bias', 'none'),
            ('lora_bias', False), ('layer_replication', None),
            ('target_parameters', None), ('trainable_token_indices', None),
            ('use_qalora', False), ('use_bdlora', None))


class PeftFormatError(ValueError):
  """A PEFT directory lorajax cannot read, or an adapter it cannot write."""


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  """A PEFT adapter in lorajax terms.

  Attributes:
    spec: one ``Lora`` rule per (rank, alpha) group, ``'train'`` for the
      modules to save, ``'freeze'`` for the rest.
    adapters: ``{'a': [in, r], 'b': [r, out]}`` per kernel path.
    trained: the saved modules' parameters, nested like the params.
    config: the ``adapter_config.json`` dict.
  """
  spec: spec_lib.LoraSpec
  adapters: PyTree
  trained: PyTree
  config: dict[str, Any]

  def params_for(self, params: PyTree) -> PyTree:
    """``params`` with the saved modules' parameters put in."""
    out = _copy_dicts(params)
    for path, value in spec_lib.flatten_paths(self.trained):
      spec_lib.set_by_path(out, path, value)
    return out


def _copy_dicts(tree: PyTree) -> PyTree:
  if isinstance(tree, dict):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _target_modules(chosen: list[str], universe: list[str]) -> Any:
  """PEFT ``target_modules``: name suffixes if exact, else a regex string."""
  chosen_set = set(chosen)
  for depth in (1, 2, 3):
    suffixes = sorted({'.'.join(m.split('.')[-depth:]) for m in chosen})
    hits = {m for m in universe
            if any(m == s or m.endswith('.' + s) for s in suffixes)}
    if hits == chosen_set:
      return suffixes
  return spec_paths.exact_regex(chosen, universe)


def export_peft(directory: str | pathlib.Path, config: Any,
                spec: spec_lib.LoraSpec, adapters: PyTree, params: PyTree, *,
                base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes ``adapter_config.json`` + ``adapter_model.safetensors``.

  Args:
    directory: created if needed.
    config: the ``BertConfig`` or ``LlamaConfig`` of the model.
    spec: the spec the adapters were made with; its adapter rules must be
      ``Lora`` with one ``use_rslora`` setting.
    adapters: the adapters (unscanned or scanned layout).
    params: the params they run with; leaves the spec trains are saved whole
      as ``modules_to_save`` (every parameter of their HF module).
    base_model_name_or_path: recorded in the config for PEFT's loader.

  Returns:
    The directory.

  Raises:
    PeftFormatError: before anything is written: a provider other than
      ``Lora`` or ``Dora``, mixed ``use_rslora``, a kernel with no HF
      module, a trained leaf in a LoRA-targeted module, a quantized base
      (``QLora``), factors or a head of shapes the model does not have, or
      a model config transformers cannot express (mean pooling).
  """
  pissa.check_portable(spec, 'export_peft')
  hf = hf_models.hf_model(config)
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
    if not isinstance(provider, (lora_lib.Lora, dora_lib.Dora)):
      raise PeftFormatError(
          f'{path}: {type(provider).__name__} adapters cannot be written as '
          f'PEFT LoRA; only Lora and Dora adapters are exported')
    providers[path] = provider
  quantized = [p for p, leaf in spec_lib.flatten_paths(params)
               if isinstance(leaf, spec_lib.FrozenKernel)]
  if quantized:
    raise PeftFormatError(
        f'{len(quantized)} kernels of the base are quantized (e.g. '
        f'{quantized[0]}); PEFT would load the float base, so its logits '
        f'would differ. Export format \'merged\', or pass the float base')
  for what, values in (
      ('use_rslora', {p.use_rslora for p in providers.values()}),
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
      a = np.asarray(flat_ad[f'{layer_path}/a'], np.float32)
      b = np.asarray(flat_ad[f'{layer_path}/b'], np.float32)
      if a.ndim != 2 or b.ndim != 2:
        raise PeftFormatError(f'{layer_path}: adapter factors {a.shape}, '
                              f'{b.shape} are not 2-D')
      layout = getattr(spec_lib.get_by_path(unscanned, layer_path),
                       'layout', None)
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
  common = collections.Counter(
      (r, a) for r, a, _ in targets.values()).most_common(1)
  r, alpha = common[0][0] if common else (8, 8)
  universe = sorted(hf.kernel_modules())
  cfg = {
      'peft_type': 'LORA', 'task_type': hf.task_type,
      'base_model_name_or_path': base_model_name_or_path,
      'r': int(r), 'lora_alpha': alpha,
      'lora_dropout': max((d for _, _, d in targets.values()), default=0.0),
      'target_modules': _target_modules(sorted(targets), universe),
      'rank_pattern': {m: int(t[0]) for m, t in targets.items() if t[0] != r},
      'alpha_pattern': {m: t[1] for m, t in targets.items() if t[1] != alpha},
      'use_rslora': bool(providers and next(iter(
          providers.values())).use_rslora),
      'use_dora': use_dora, 'fan_in_fan_out': False, 'bias': 'none',
      'modules_to_save': sorted(saved) or None, 'inference_mode': True,
      'init_lora_weights': True, 'layers_to_transform': None,
      'layers_pattern': None, 'revision': None,
  }
  hf_models.write_files(directory, {WEIGHTS_FILE: tensors, CONFIG_FILE: cfg})
  return pathlib.Path(directory)


def _unscanned_paths(hf: hf_models.HfModel, path: str) -> list[str]:
  """``layers/x`` of a scanned Llama -> ``layers_{i}/x`` for every layer."""
  if hf.scanned and path.startswith('layers/'):
    rest = path[len('layers/'):]
    return [f'layers_{i}/{rest}' for i in range(hf.config.num_layers)]
  return [path]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
  for key, value in patterns.items():
    if re.fullmatch(rf'(?:.*\.)?(?:{key})', module):
      return value
  return default


def _with_dense_layouts(adapters: PyTree) -> PyTree:
  """Marks imported factors with their layout: lorajax's own models keep
  every Linear as a Flax ``Dense`` kernel ``[in, out]`` (stacked ``[L, in,
  out]`` when the layers are scanned), and PEFT's factors were transposed
  into that orientation above."""
  def wrap(node):
    if isinstance(node, dict) and 'a' in node and 'b' in node:
      stack = np.ndim(node['a']) - 2
      return spec_lib.AdapterParams(
          node, layout=spec_lib.KernelLayout(stack, (0,), (1,)))
    return {k: wrap(v) for k, v in node.items()}
  return wrap(adapters)


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{directory} has no {CONFIG_FILE}')
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise PeftFormatError(f'{path} is not JSON: {e}') from None
  kind = cfg.get('peft_type')
  if kind != 'LORA':
    raise PeftFormatError(
        f'{path}: peft_type {kind!r} is not supported; lorajax imports LORA '
        f'adapters only')
  for field, fine in _MUST_BE:
    value = cfg.get(field, fine)
    if value != fine and not (fine is None and not value):
      raise PeftFormatError(
          f'{path}: {field}={value!r} is not supported (lorajax imports '
          f'plain LoRA: {field} must be {fine!r})')
  return cfg


def import_peft(directory: str | pathlib.Path, config: Any,
                params: PyTree | None = None) -> PeftAdapter:
  """Reads a PEFT LoRA directory into lorajax adapters.

  Args:
    directory: holds ``adapter_config.json`` and
      ``adapter_model.safetensors``.
    config: the ``BertConfig`` or ``LlamaConfig`` of the lorajax model.
    params: if given, the spec is checked against it (every kernel found).

  Returns:
    A ``PeftAdapter``; run it with ``lorajax.lora(apply_fn, spec)(
    imported.params_for(params), imported.adapters, ...)``.

  Raises:
    PeftFormatError: an unsupported method or option, a target module the
      lorajax model does not have as a kernel (e.g. an embedding), a
      corrupted weights file, inconsistent shapes.
  """
  directory = pathlib.Path(directory)
  cfg = _read_config(directory)
  hf = hf_models.hf_model(config)
  try:
    tensors = adapter_files.read_safetensors(directory / WEIGHTS_FILE)
  except adapter_files.AdapterFileError as e:
    raise PeftFormatError(str(e)) from None
  modules = hf.kernel_modules()
  by_key = {key: path for path, key in hf.keys.items()}
  lora, saved = collections.defaultdict(dict), {}
  for key, value in tensors.items():
    name = key.removeprefix(PREFIX)
    m = (re.fullmatch(r'(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight', name)
         or re.fullmatch(r'(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?'
                         r'(?:\.weight)?', name))
    if m:
      lora[m.group(1)][m.group(2)] = np.asarray(value, np.float32)
    elif re.search(r'lora_embedding_|\.lora_', name):
      raise PeftFormatError(
          f'{directory / WEIGHTS_FILE}: tensor {key!r} is not a LoRA factor '
          f'of a Linear layer (embedding LoRA and others are not '
          f'supported)')
    elif name in by_key:
      saved[by_key[name]] = np.asarray(value, np.float32)
    else:
      raise PeftFormatError(
          f'{directory / WEIGHTS_FILE}: tensor {key!r} is neither a LoRA '
          f'factor nor a parameter of {hf.architecture}')
  adapters, groups = {}, collections.defaultdict(list)
  use_rslora = bool(cfg.get('use_rslora', False))
  use_dora = bool(cfg.get('use_dora', False))
  want = {'lora_A', 'lora_B'} | ({'lora_magnitude_vector'} if use_dora
                                 else set())
  for module, pair in sorted(lora.items()):
    if module not in modules:
      raise PeftFormatError(
          f'target module {module!r} is not a Linear kernel of lorajax\'s '
          f'{hf.architecture} (LoRA on embeddings or tied heads is not '
          f'supported); kernels: {sorted(modules)[:6]} ...')
    if set(pair) != want:
      raise PeftFormatError(f'{module}: has {sorted(pair)} but needs '
                            f'{sorted(want)} (use_dora={use_dora})')
    a, b = pair['lora_A'].T, pair['lora_B'].T
    path = modules[module]
    r = a.shape[1]
    if b.shape[0] != r:
      raise PeftFormatError(f'{module}: lora_A {pair["lora_A"].shape} and '
                            f'lora_B {pair["lora_B"].shape} disagree on r')
    r_cfg = _pattern_value(cfg.get('rank_pattern') or {}, module, cfg.get('r'))
    if r_cfg is not None and int(r_cfg) != r:
      raise PeftFormatError(f'{module}: factors have rank {r} but the config '
                            f'says r={r_cfg}')
    alpha = _pattern_value(cfg.get('alpha_pattern') or {}, module,
                           cfg.get('lora_alpha', r))
    ad = {'a': a, 'b': b}
    if use_dora:
      ad['m'] = pair['lora_magnitude_vector'].reshape(b.shape[1:])
    spec_lib.set_by_path(adapters, path, ad)
    groups[(r, float(alpha))].append(path)
  if not adapters:
    raise PeftFormatError(f'{directory / WEIGHTS_FILE} holds no LoRA factors')
  trained = {}
  for path, value in saved.items():
    spec_lib.set_by_path(trained, path, value.T if hf.is_kernel(path)
                         else value)
  universe = sorted(hf.keys)
  method = dora_lib.Dora if use_dora else lora_lib.Lora
  rules = [(spec_paths.exact_regex(paths, universe),
            method(rank=r, alpha=alpha, use_rslora=use_rslora,
                   dropout=float(cfg.get('lora_dropout') or 0.0)))
           for (r, alpha), paths in sorted(groups.items())]
  if saved:
    rules.append((spec_paths.exact_regex(saved, universe), spec_lib.TRAIN))
  rules.append(('.*', spec_lib.FREEZE))
  if hf.scanned:
    try:
      adapters, trained = hf.rescan(adapters), hf.rescan(trained)
    except ValueError as e:
      raise PeftFormatError(f'{directory}: adapters of some layers only '
                            f'cannot be stacked for scan_layers=True: {e}'
                            ) from None
    rules = [(p.replace(r'layers_\d+', 'layers'), a) for p, a in rules]
  adapters = _with_dense_layouts(adapters)
  spec = spec_lib.LoraSpec(rules)
  if params is not None:
    try:
      spec_lib.resolve(spec, params)
    except ValueError as e:
      raise PeftFormatError(f'{directory}: the adapter does not fit these '
                            f'params: {e}') from None
  return PeftAdapter(spec, adapters, trained, cfg)
