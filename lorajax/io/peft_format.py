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

IA3 directories (``peft_type: IA3``) hold ``<module>.ia3_l``, ``[out, 1]``
for a scaled output and ``[1, in]`` for a scaled input (the modules listed in
``feedforward_modules``). LoHa directories (``LOHA``) hold
``<module>.hada_w1_a`` (``b₁ᵀ``, ``[out, r]``), ``hada_w1_b`` (``a₁ᵀ``,
``[r, in]``) and the same for 2, with ``r``/``alpha`` (scale alpha/r) and
their patterns.

``lorajax.io.peft_export.export_peft`` writes lorajax ``Lora`` (or
``Dora``), ``Ia3`` or ``LoHa`` adapters in that form, of the shipped BERT
and Llama models and of every family ``lorajax.models.load`` reads
(``source=`` its directory, recorded as ``base_model_name_or_path``);
``import_peft`` reads such a directory into a
spec, adapters and trained leaves. An adapter made on a family's bare model
(``BertModel``, keys ``encoder.layer.0...``) fits the model with a head
(``bert.encoder.layer.0...``) and the other way round: only the base
model's key prefix differs. What PEFT can say and lorajax
cannot (another method, LoRA on embeddings, LoRA biases) is an error that
names it, and so is what lorajax computes and a PEFT model would not (a
mean-pooling BERT, adapters trained on a quantized base, bottleneck
adapters); a refused export writes nothing.

Example:

  >>> imported = import_peft('/tmp/peft', config, params)        # doctest: +SKIP
  >>> fn = lorajax.lora(apply_fn, imported.spec)                 # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax import spec_paths
from lorajax.io import adapter_files
from lorajax.io import digests
from lorajax.io import hf_models
from lorajax.io import peft_codecs
from lorajax.io import peft_codecs_adalora
from lorajax.io import peft_codecs_kron
from lorajax.io import peft_codecs_oft
from lorajax.io import peft_moe
from lorajax.io import peft_tokens
from lorajax.methods import dora as dora_lib
from lorajax.methods import low_rank as lora_lib
from lorajax.models import moe

PyTree = Any
CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = peft_codecs.PREFIX
PeftFormatError = peft_codecs.PeftFormatError
PEFT_TYPES = ('LORA', 'IA3', 'LOHA', *peft_codecs_adalora.KINDS,
              *peft_codecs_kron.KINDS,
              *peft_codecs_oft.KINDS)
# Tensor names of each method's factors (after the module name).
_FACTOR = re.compile(r'(.+)\.(lora_[ABE]|ia3_l|hada_w[12]_[ab]|hada_t[12]'
                     r'|lokr_w[12](?:_[ab])?|lokr_t2|vera_lambda_[bd]|oft_R)'
                     r'(?:\.[^.]+)?(?:\.weight)?')
# Config fields that change what a LoRA adapter computes and that lorajax's
# Lora does not implement: (field, value that is fine).
_MUST_BE = (('fan_in_fan_out', False), ('bias', 'none'),
            ('lora_bias', False), ('layer_replication', None),
            ('target_parameters', None),
            ('use_qalora', False), ('use_bdlora', None))


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  """A PEFT adapter in lorajax terms.

  Attributes:
    spec: one ``Lora`` rule per (rank, alpha) group, ``'train'`` for the
      modules to save, ``'freeze'`` for the rest.
    adapters: ``{'a': [in, r], 'b': [r, out]}`` per kernel path.
    trained: the saved modules' parameters, nested like the params.
    config: the ``adapter_config.json`` dict.
    tokens: trained token rows (``trainable_token_indices``, or the
      ``TRAINABLE_TOKENS`` method): ``(TrainableTokens, values)``
      (``io.peft_tokens``), or None.
  """
  spec: spec_lib.LoraSpec
  adapters: PyTree
  trained: PyTree
  config: dict[str, Any]
  tokens: peft_tokens.Tokens | None = None

  def params_for(self, params: PyTree) -> PyTree:
    """``params`` with the saved modules' parameters and the token rows
    put in."""
    out = _copy_dicts(params)
    for path, value in spec_lib.flatten_paths(self.trained):
      spec_lib.set_by_path(out, path, value)
    if self.tokens is not None:
      out = self.tokens[0].merge(out, self.tokens[1])
    return out


def _copy_dicts(tree: PyTree) -> PyTree:
  if isinstance(tree, dict):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree

def _with_dense_layouts(adapters: PyTree) -> PyTree:
  """Marks imported factors with their layout: lorajax's own models keep
  every Linear as a Flax ``Dense`` kernel ``[in, out]`` (stacked ``[L, in,
  out]`` when the layers are scanned), and PEFT's factors were transposed
  into that orientation above."""
  def wrap(node):
    if node and not any(isinstance(v, dict) for v in node.values()):
      # a [.., in, r] (LoRA, LoHa's a1) or IA3's l [.., n]: count the stack.
      probe = next((node[k] for k in ('a', 'a1', 'w1', 'w1_a', 'skew')
                   if k in node), None)   # LoKr's w1 [.., in1, out1], OFT's
      # skew [.., r, n]; VeRA's lambda_d [.., r]
      stack = (np.ndim(node.get('l', node.get('lambda_d'))) - 1 if probe is None
               else np.ndim(probe) - 2)
      return spec_lib.AdapterParams(
          node, layout=spec_lib.KernelLayout(stack, (0,), (1,)))
    return {k: wrap(v) for k, v in node.items()}
  return wrap(adapters)


def _check_numbers(cfg: Any, path: pathlib.Path) -> None:
  """Raises PeftFormatError naming the file and field of a malformed rank or
  alpha (``lora_alpha: null``, ``r: "eight"``), before anything uses it."""
  if not isinstance(cfg, dict):
    raise PeftFormatError(f'{path}: expected a JSON object, got '
                          f'{type(cfg).__name__}')

  def rank_ok(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1

  def alpha_ok(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))

  checks = ((('r', rank_ok, 'an integer >= 1 (the rank)'),)
            if cfg.get('peft_type') != 'OFT' else ()) + (   # OFT: r may be 0
            ('lora_alpha', alpha_ok, 'a finite number (the scale numerator)'),
            ('alpha', alpha_ok, 'a finite number (the scale numerator)'))
  for field, ok, expected in checks:
    if field in cfg and not ok(cfg[field]):
      raise PeftFormatError(f'{path}: {field}={cfg[field]!r}: expected '
                            f'{expected}')
  for field, ok in (('rank_pattern', rank_ok), ('alpha_pattern', alpha_ok)):
    if field == 'rank_pattern' and cfg.get('peft_type') == 'ADALORA':
      continue   # [bool] * init_r, checked by peft_codecs_adalora
    pattern = cfg.get(field) or {}
    if not isinstance(pattern, dict):
      raise PeftFormatError(f'{path}: {field}={pattern!r}: expected an '
                            'object of module pattern -> value')
    for key, value in pattern.items():
      if not ok(value):
        raise PeftFormatError(f'{path}: {field}[{key!r}]={value!r}: expected '
                              f'{"an integer >= 1" if ok is rank_ok else "a finite number"}')


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{directory} has no {CONFIG_FILE}')
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise PeftFormatError(f'{path} is not JSON: {e}') from None
  _check_numbers(cfg, path)
  kind = cfg.get('peft_type')
  if kind == peft_tokens.ALONE_TYPE:   # token rows alone (io.peft_tokens)
    return cfg
  if kind not in PEFT_TYPES:
    raise PeftFormatError(
        f'{path}: peft_type {kind!r} is not supported; lorajax imports '
        f'{", ".join(PEFT_TYPES)} adapters')
  if kind == 'IA3' and cfg.get('fan_in_fan_out'):
    raise PeftFormatError(f'{path}: fan_in_fan_out=True is not supported')
  peft_codecs.check_config(cfg, path)
  if kind != 'LORA':
    return cfg
  for field, fine in _MUST_BE:
    value = cfg.get(field, fine)
    if value != fine and not (fine is None and not value):
      raise PeftFormatError(
          f'{path}: {field}={value!r} is not supported (lorajax imports '
          f'plain LoRA: {field} must be {fine!r})')
  return cfg


def _renamer(names: set[str], hf: hf_models.HfModel):
  """The map of an adapter's module names onto ``hf``'s: the identity, or,
  for an adapter made on the family's model with another head (a bare
  ``BertModel``'s ``encoder.layer.0...`` for ``bert.encoder.layer.0...``),
  the swap of the base model's key prefix. The identity when none fits
  every name (the caller then names what does not)."""
  known = {k.rsplit('.', 1)[0] for k in hf.keys.values()}

  def swap(theirs):
    def rename(name):
      if hf.is_head_module(name) or not name.startswith(theirs):
        return name
      return hf.prefix + name[len(theirs):]
    return rename

  others = sorted(set(hf.naming.prefixes.values()) - {hf.prefix}, key=len,
                  reverse=True)
  candidates = [lambda name: name] + [swap(p) for p in others]
  for rename in candidates:
    if all(rename(n) in known for n in names):
      return rename
  return candidates[0]


def import_peft(directory: str | pathlib.Path, config: Any,
                params: PyTree | None = None, *,
                source: str | os.PathLike[str] | None = None,
                head: str | None = None) -> PeftAdapter:
  """Reads a PEFT LoRA directory into lorajax adapters.

  Args:
    directory: holds ``adapter_config.json`` and
      ``adapter_model.safetensors``.
    config: the config of the lorajax model.
    params: if given, the spec is checked against it (every kernel found).
    source: the Hugging Face checkpoint directory the model was loaded
      from (``lorajax.models.load``); None for the shipped models.
    head: the model's head (default: the source's own); an adapter made
      on the family's model with the other head is renamed onto it.

  Returns:
    A ``PeftAdapter``; run it with ``lorajax.lora(apply_fn, spec)(
    imported.params_for(params), imported.adapters, ...)``.

  Raises:
    PeftFormatError: an unsupported method or option, a target module the
      lorajax model does not have as a kernel (e.g. an embedding), a
      corrupted weights file, inconsistent shapes.
  """
  if isinstance(config, moe.MoeConfig):  # experts: target_parameters
    spec, adapters, cfg = peft_moe.import_moe_lora(directory, config)
    return PeftAdapter(spec, adapters, {}, cfg)
  directory = pathlib.Path(directory)
  try:   # A directory lorajax wrote carries a digest; PEFT's own do not.
    digests.verify(directory, fix='export it again from its run: '
                   'lorajax-export --workdir=<run> --format=peft '
                   '--out=<this directory>')
  except digests.DigestError as e:
    raise PeftFormatError(str(e)) from None
  cfg = _read_config(directory)
  hf = hf_models.hf_model(config, source=source, head=head)
  try:
    tensors = adapter_files.read_safetensors(directory / WEIGHTS_FILE)
  except adapter_files.AdapterFileError as e:
    raise PeftFormatError(str(e)) from None
  modules = hf.kernel_modules()
  by_key = {key: path for path, key in hf.keys.items()}
  shared = peft_codecs_kron.pop_shared(tensors)
  token_tensors = peft_tokens.pop_tensors(tensors, hf)
  rename = _renamer({_module_name(k.removeprefix(PREFIX)) for k in tensors}
                    | set(token_tensors), hf)
  tokens = peft_tokens.import_tokens(cfg, token_tensors, hf, rename, params,
                                     str(directory))
  if cfg['peft_type'] == peft_tokens.ALONE_TYPE:
    return PeftAdapter(spec_lib.LoraSpec([('.*', spec_lib.FREEZE)]), {}, {},
                       cfg, tokens)
  lora, saved = collections.defaultdict(dict), {}
  for key, value in tensors.items():
    module = _module_name(key.removeprefix(PREFIX))
    name = rename(module) + key.removeprefix(PREFIX)[len(module):]
    m = (_FACTOR.fullmatch(name)
         or re.fullmatch(r'(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?'
                         r'(?:\.weight)?', name))
    if m and m.group(2).startswith('hada_t'):
      raise PeftFormatError(
          f'{directory / WEIGHTS_FILE}: {key!r} is a LoHa CP-decomposition '
          f'core (convolutions); lorajax imports LoHa of Linear layers only')
    if m:
      lora[m.group(1)][m.group(2)] = np.asarray(value, np.float32)
    elif re.search(r'lora_embedding_|\.lora_', name):
      raise PeftFormatError(
          f'{directory / WEIGHTS_FILE}: tensor {key!r} is not a LoRA factor '
          f'of a Linear layer (embedding LoRA and others are not '
          f'supported)')
    elif name in by_key:
      saved[by_key[name]] = np.asarray(value, np.float32)
    elif hf.is_head_module(name):
      raise PeftFormatError(
          f'{directory / WEIGHTS_FILE}: tensor {key!r} belongs to a task '
          f'head {hf.architecture} does not have; import it into the '
          f'model with that head')
    else:
      raise PeftFormatError(
          f'{directory / WEIGHTS_FILE}: tensor {key!r} is neither a LoRA '
          f'factor nor a parameter of {hf.architecture}')
  if cfg['peft_type'] != 'LORA':
    adapters, groups, folded = peft_codecs.import_method(cfg, lora, modules, directory,
                                              hf, params, shared)
    saved.update(folded)
  else:
    adapters, groups = _import_lora(cfg, lora, modules, hf)
  if not adapters:
    raise PeftFormatError(f'{directory / WEIGHTS_FILE} holds no adapter '
                          f'factors')
  trained = {}
  for path, value in saved.items():
    spec_lib.set_by_path(trained, path, value.T if hf.is_kernel(path)
                         else value)
  universe = sorted(hf.keys)
  rules = [(spec_paths.exact_regex(paths, universe), provider)
           for provider, paths in sorted(groups.items(), key=repr)]
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
  return PeftAdapter(spec, adapters, trained, cfg, tokens)


def _module_name(name: str) -> str:
  """The module of a PEFT tensor name (before its factor or parameter)."""
  m = (_FACTOR.fullmatch(name)
       or re.fullmatch(r'(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?'
                       r'(?:\.weight)?', name))
  return m.group(1) if m else name.rsplit('.', 1)[0]


def _import_lora(cfg, lora, modules, hf):
  """LoRA/DoRA factors per module: ``(adapters, provider -> paths)``."""
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
    r_cfg = peft_codecs.pattern_value(cfg.get('rank_pattern') or {}, module, cfg.get('r'))
    if r_cfg is not None and int(r_cfg) != r:
      raise PeftFormatError(f'{module}: factors have rank {r} but the config '
                            f'says r={r_cfg}')
    alpha = peft_codecs.pattern_value(cfg.get('alpha_pattern') or {}, module,
                           cfg.get('lora_alpha', r))
    ad = {'a': a, 'b': b}
    if use_dora:
      ad['m'] = pair['lora_magnitude_vector'].reshape(b.shape[1:])
    spec_lib.set_by_path(adapters, path, ad)
    method = dora_lib.Dora if use_dora else lora_lib.Lora
    groups[method(rank=r, alpha=float(alpha), use_rslora=use_rslora,
                  dropout=float(cfg.get('lora_dropout') or 0.0))].append(path)
  return adapters, groups

