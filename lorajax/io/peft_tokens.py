"""PEFT's trainable tokens, both ways (``lorajax.methods.tokens``).

PEFT 0.21.2 trains chosen embedding rows in two ways, and lorajax reads and
writes both:

- next to LoRA: ``trainable_token_indices`` in the LoRA config, a list (rows
  of the input embedding; a tied ``lm_head`` follows it) or a dict of
  module name -> indices (``{'embed_tokens': [...], 'lm_head': [...]}`` for
  an untied head); tensors
  ``base_model.model.<module>.token_adapter.trainable_tokens_delta``;
- alone: ``peft_type: TRAINABLE_TOKENS`` with ``token_indices`` and
  ``target_modules``; tensors ``base_model.model.<module>.trainable_tokens_
  delta`` (for a tied model PEFT writes the ``lm_head`` copy too).

Each tensor is ``[n, d]``: the values of the ``n`` rows of the module's
``[V, d]`` weight (an ``lm_head`` Linear's weight is ``[V, d]`` too, the
transpose of lorajax's ``[d, V]`` kernel). Despite the name they replace the
rows, as lorajax's values do, so no conversion is needed.

Refused, naming the file or value: token rows with another PEFT method
than LoRA (IA3, LoHa, LoKr, VeRA configs have no such field), an MoE
decoder, modules to save next to tokens alone (``TRAINABLE_TOKENS`` has no
``modules_to_save``), a module lorajax has no table for, indices a tied
model cannot hold (other rows for the head than for the embedding), and
rows of another count or width than the indices and the table.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from lorajax import spec as spec_lib
from lorajax.io import hf_models
from lorajax.io import peft_codecs
from lorajax.methods import tokens as tokens_lib
from lorajax.models import moe

PyTree = Any
PREFIX = peft_codecs.PREFIX
PeftFormatError = peft_codecs.PeftFormatError
ALONE_TYPE = 'TRAINABLE_TOKENS'
# Tensor names after the module: next to LoRA, and alone.
WITH_LORA = 'token_adapter.trainable_tokens_delta'
ALONE = 'trainable_tokens_delta'
_TENSOR = re.compile(r'(.+?)\.(?:token_adapter\.)?trainable_tokens_delta'
                     r'(?:\.[^.]+)?')
_BASE_LAYER = re.compile(r'(.+?)\.(?:token_adapter\.)?base_layer\.weight')
Tokens = tuple[tokens_lib.TrainableTokens, dict[str, Any]]


def check_exportable(config: Any, peft_type: str) -> None:
  """Raises PeftFormatError where PEFT has no place for token rows."""
  if isinstance(config, moe.MoeConfig):
    raise PeftFormatError('trainable token rows of an MoE decoder are not '
                          'exported as PEFT (its LoRA goes through '
                          'target_parameters); export format \'merged\'')
  if peft_type != 'LORA':
    raise PeftFormatError(
        f'trainable token rows next to {peft_type} adapters: PEFT\'s '
        f'{peft_type} config has no trainable_token_indices (LoRA and DoRA '
        'have); export format \'merged\'')


def _module(hf: hf_models.HfModel, path: str) -> str:
  if path not in hf.keys:
    raise PeftFormatError(f'{path}: no Hugging Face module for this table in '
                          f'{hf.architecture}')
  return hf.module_of(path)


def export_parts(hf: hf_models.HfModel, tokens: Tokens, *, alone: bool,
                 saved: set[str]) -> tuple[dict[str, np.ndarray],
                                           dict[str, Any]]:
  """``(tensors, config fields)`` of token rows in PEFT's names.

  Next to LoRA the fields are ``{'trainable_token_indices': ...}``; alone
  they are the ``TRAINABLE_TOKENS`` config's own (to replace the LoRA one).

  Raises:
    PeftFormatError: a table without an HF module; alone: modules to save,
      or tables with other indices.
  """
  rows, values = tokens
  tensors, names = {}, {}
  suffix = ALONE if alone else WITH_LORA
  for name, table in rows.tables:
    module = _module(hf, table.path)
    tensors[f'{PREFIX}{module}.{suffix}'] = np.ascontiguousarray(
        np.asarray(values[name], np.float32))
    names[module.rsplit('.', 1)[-1]] = [int(i) for i in table.indices]
  if not alone:
    field = (next(iter(names.values())) if len(names) == 1
             and rows.tables[0][0] == 'embed' else names)
    return tensors, {'trainable_token_indices': field}
  if saved:
    raise PeftFormatError(
        f'token rows alone are written as PEFT\'s {ALONE_TYPE}, which has no '
        f'modules_to_save for {sorted(saved)}; add a LoRA adapter (then '
        'they go as trainable_token_indices next to it)')
  indices = {tuple(v) for v in names.values()}
  if len(indices) > 1:
    raise PeftFormatError(f'{ALONE_TYPE} has one token_indices for every '
                          f'module; these tables have {names}')
  if 'head' not in values and getattr(hf.config, 'tie_embeddings', False):
    # PEFT saves the tied head's copy too (and warns when it is missing).
    embed = _module(hf, rows.by_name['embed'].path)
    tensors[f'{PREFIX}lm_head.{ALONE}'] = tensors[f'{PREFIX}{embed}.{ALONE}']
  return tensors, {'peft_type': ALONE_TYPE, 'task_type': hf.task_type,
                   'token_indices': list(indices.pop()),
                   'target_modules': sorted(names), 'init_weights': True}


def pop_tensors(tensors: dict[str, np.ndarray], hf: hf_models.HfModel
                ) -> dict[str, np.ndarray]:
  """Takes the token-row tensors out of ``tensors``: ``{module: [n, d]}``.

  A whole table PEFT saved beside them (``<module>[.token_adapter].
  base_layer.weight``: it saves the embedding layers when the vocabulary
  was resized) is renamed ``<module>.weight`` in ``tensors``, a module
  saved whole; a tied head's copy is dropped once it equals the
  embedding's.

  Raises:
    PeftFormatError: a tied head's table that differs from the
      embedding's.
  """
  out, tables = {}, {}
  for key in list(tensors):
    name = key.removeprefix(PREFIX)
    m = _TENSOR.fullmatch(name)
    if m:
      out[m.group(1)] = np.asarray(tensors.pop(key), np.float32)
      continue
    m = _BASE_LAYER.fullmatch(name)
    if m:
      tables[m.group(1)] = tensors.pop(key)
  embed = next((m for m in tables if m.endswith(_embed_module(hf))), None)
  for module, value in tables.items():
    if module.split('.')[-1] == 'lm_head' and f'{module}.weight' not in set(
        hf.keys.values()) and getattr(hf.config, 'tie_embeddings', False):
      if embed is None or not np.array_equal(value, tables[embed]):
        raise PeftFormatError(f'{module}.base_layer.weight: the head is tied '
                              'to the embedding in this model, but PEFT saved '
                              'another table for it')
      continue
    tensors[f'{PREFIX}{module}.weight'] = value
  return out


def _embed_path(hf: hf_models.HfModel) -> str:
  embed = next((p for p in hf.keys if p.endswith('embed/embedding')
                or p.endswith('word_embeddings/embedding')), None)
  if embed is None:
    raise PeftFormatError(f'{hf.architecture}: lorajax knows no word '
                          'embedding of this model for token rows')
  return embed


def _embed_module(hf: hf_models.HfModel) -> str:
  return hf.module_of(_embed_path(hf))


def _tables(hf: hf_models.HfModel) -> dict[str, tuple[str, str | None, int]]:
  """``{HF module: (name, Flax path, vocabulary axis)}`` of the tables token
  rows can go in; a tied head is listed under its module with path None."""
  embed = _embed_path(hf)
  out = {hf.module_of(embed): ('embed', embed, 0)}
  heads = [p for p in hf.keys if hf.is_kernel(p)
           and hf.is_head_module(hf.module_of(p))
           and hf.module_of(p).split('.')[0] == 'lm_head']
  for p in heads:
    out[hf.module_of(p)] = ('head', p, 1)
  if not heads and getattr(hf.config, 'tie_embeddings', False):
    out['lm_head'] = ('head', None, 1)   # the embedding, through the tie
  return out


def _owner(tables: dict[str, tuple[str, str, int]], name: str, where: str
           ) -> str:
  hits = [m for m in tables if m.endswith(name)]
  if len(hits) != 1:
    raise PeftFormatError(f'{where}: module {name!r} names '
                          f'{"none" if not hits else hits} of the tables '
                          f'token rows can go in: {sorted(tables)}')
  return hits[0]


def import_tokens(cfg: dict[str, Any], found: dict[str, np.ndarray],
                  hf: hf_models.HfModel, rename, params: PyTree | None,
                  where: str) -> Tokens | None:
  """The ``(TrainableTokens, values)`` of a PEFT adapter, or None.

  Args:
    cfg: its ``adapter_config.json``.
    found: ``pop_tensors``' output.
    hf: the lorajax model's naming.
    rename: maps the adapter's module names onto ``hf``'s (a bare model's
      adapter on a model with a head).
    params: when given, the rows are checked against it.
    where: the directory, for messages.

  Raises:
    PeftFormatError: see the module docstring.
  """
  alone = cfg.get('peft_type') == ALONE_TYPE
  field = cfg.get('token_indices') if alone else cfg.get(
      'trainable_token_indices')
  if field is None and not found:
    return None
  if field is None or not found:
    raise PeftFormatError(
        f'{where}: {"token_indices" if alone else "trainable_token_indices"}'
        f'={field!r} but {len(found)} trainable_tokens_delta tensors')
  found = {rename(m): v for m, v in found.items()}
  tables = _tables(hf)
  embed_module = next(m for m, t in tables.items() if t[0] == 'embed')
  if alone:
    targets = cfg.get('target_modules') or [embed_module]
    targets = [targets] if isinstance(targets, str) else list(targets)
    wanted = {_owner(tables, t, where): list(field) for t in targets}
  elif isinstance(field, dict):
    wanted = {_owner(tables, k, where): list(v) for k, v in field.items()}
  else:
    wanted = {embed_module: list(field)}
  for module in found:
    if module not in tables:
      raise PeftFormatError(f'{where}: trainable tokens of {module!r}, which '
                            f'is not a table lorajax holds ({sorted(tables)})')
  out, values = {}, {}
  for module, indices in wanted.items():
    name, path, axis = tables[module]
    if path is None:   # A tied head: it must be the embedding's rows.
      continue
    if module not in found:
      raise PeftFormatError(f'{where}: no trainable_tokens_delta tensor for '
                            f'{module!r}, listed with indices {indices}')
    value = found[module]
    try:   # Ranges are checked against the params below.
      indices = tokens_lib.check_indices(indices, np.iinfo(np.int64).max,
                                         where)
    except ValueError as e:
      raise PeftFormatError(str(e)) from None
    if value.ndim != 2 or value.shape[0] != len(indices):
      raise PeftFormatError(f'{where}: {module} trainable_tokens_delta has '
                            f'shape {value.shape}; [{len(indices)}, d] '
                            'expected for its indices')
    out[name] = tokens_lib.TokenTable(path, indices, axis)
    values[name] = value
  tied = [m for m, (_, p, _) in tables.items() if p is None]
  for module in tied:
    embed = out.get('embed')
    if module in wanted and (embed is None or
                             list(embed.indices) != list(wanted[module])):
      raise PeftFormatError(
          f'{where}: the head {module!r} is tied to the embedding in this '
          f'model, but gets rows {wanted[module]} and the embedding '
          f'{None if embed is None else list(embed.indices)}; lorajax\'s '
          'tied head is the embedding itself')
    if module in found and not np.array_equal(found[module],
                                              values.get('embed')):
      raise PeftFormatError(f'{where}: the tied head {module!r} has other '
                            'token values than the embedding')
  rows = tokens_lib.TrainableTokens.of(out)
  if params is not None:
    try:
      rows.check(params, where)
    except ValueError as e:
      raise PeftFormatError(str(e)) from None
    leaves = dict(spec_lib.flatten_paths(params))
    for name, table in rows.tables:
      width = np.shape(leaves[table.path])[1 - table.axis]
      if values[name].shape[1] != width:
        raise PeftFormatError(f'{where}: {table.path} rows are '
                              f'{values[name].shape[1]} wide; the table\'s '
                              f'are {width}')
  return rows, values
