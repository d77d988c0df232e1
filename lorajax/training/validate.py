"""Inputs checked before anything runs: the config, and a resumed run's.

``check_config(config)`` is one pass over the fields a run reads: ranges
(a learning rate > 0 and finite, intervals >= 1, ``max_to_keep >= 1``, a
rank >= 1, finite ``lora.alpha``), the enums each field accepts, and split
slices that select nothing. Every problem found is listed in one
``ConfigError`` (a ``ValueError``), each naming the field, its value and what is expected.

``check_resume(stored, config, where)`` compares the run-defining fields
of a checkpoint's stored config with this run's (everything but
``FREE_FIELDS``: how often to log, evaluate and save, what to show).
A change is refused with the differing fields listed, unless
``config.allow_config_change`` is True; then the changes are returned, for
the run to record.

Example:

  >>> from lorajax.training import config as config_lib
  >>> c = config_lib.base_config('classification')
  >>> c.optim.learning_rate = -1.0
  >>> c.eval_every = 0
  >>> check_config(c)
  Traceback (most recent call last):
  ...
  lorajax.training.validate.ConfigError: config has 2 invalid fields:
    config.eval_every=0: expected an integer >= 1
    config.optim.learning_rate=-1.0: expected a finite number > 0
"""

from __future__ import annotations

import json
import math
import numbers
import re
from typing import Any

from lorajax.methods import low_rank
from lorajax.methods import quant
from lorajax.models import bert
from lorajax.models import remat as remat_lib
from lorajax.training import config as config_lib
from lorajax.training import optim

# Fields a resumed run may change freely: they do not change what is
# computed, only how often it is logged, evaluated, saved or shown.
FREE_FIELDS = ('name', 'eval_every', 'log_every', 'checkpoint_every',
               'max_to_keep', 'async_checkpoint', 'progress_bar',
               'eval_batch_size', 'eval_at_start', 'data.max_eval_batches',
               'data.dir', 'allow_config_change', 'xla_options',
               # Memory layouts of the same step (losses equal to rounding).
               'remat', 'loss_chunk', 'attn_chunk',
               # Steps per compiled call (same steps, up to rounding).
               'steps_per_call')
_MISSING = object()
_ENUMS = {
    'task': config_lib.TASKS,
    'method': config_lib.METHODS,
    'mode': config_lib.MODES,
    'optim.decay': optim.DECAYS,
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.pooling': bert.POOLINGS,
    'lora.init': low_rank.INITS,
    'quant': quant.METHODS,
    'bottleneck.style': ('houlsby', 'pfeiffer'),
    'remat': remat_lib.POLICIES,
}
_INTS_AT_LEAST = {
    'num_train_steps': 1, 'batch_size': 1, 'eval_batch_size': 1,
    'eval_every': 1, 'log_every': 1, 'checkpoint_every': 1,
    'max_to_keep': 1, 'lora.rank': 1, 'optim.accum_steps': 1,
    'optim.warmup_steps': 0, 'loss_chunk': 0, 'attn_chunk': 0,
    'steps_per_call': 1,
}
# Methods a model.factory model cannot take: prompts and bottleneck
# adapters go into the shipped models' own layers.
FACTORY_REFUSED_METHODS = ('prompt', 'prefix', 'ptuning', 'bottleneck')
_SPLITS = ('data.train_split', 'data.validation_split', 'data.test_split')
_SLICE = re.compile(r'[\w/.-]+\[(-?\d*)(%?):(-?\d*)(%?)\]')


class ConfigError(ValueError):
  """A config field that makes no sense, or a resume with a changed one."""


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    try:
      if part not in node:
        return _MISSING
      node = node[part]
    except TypeError:
      return _MISSING
  return node


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _empty_slice(split: str) -> bool:
  """Whether a TFDS split slice such as ``'train[:0]'`` selects nothing."""
  m = _SLICE.fullmatch(split)
  if not m or not m.group(3):
    return False
  if m.group(1) and m.group(2) != m.group(4):
    return False
  start, stop = int(m.group(1) or 0), int(m.group(3))
  return start >= 0 and stop >= 0 and stop <= start


def problems(config) -> list[str]:
  """Every invalid field of ``config``, one line each (empty if none)."""
  out = []

  def bad(field, value, expected):
    out.append(f'config.{field}={value!r}: expected {expected}')

  for field, low in _INTS_AT_LEAST.items():
    value = _get(config, field)
    if value is not _MISSING and (not _is_int(value) or value < low):
      bad(field, value, f'an integer >= {low}')
  lr = _get(config, 'optim.learning_rate')
  if lr is not _MISSING and (not _is_real(lr) or not math.isfinite(lr)
                             or lr <= 0):
    bad('optim.learning_rate', lr, 'a finite number > 0')
  for field in ('lora.alpha', 'optim.clip_norm', 'optim.weight_decay',
                'optim.end_factor', 'optim.eps'):
    value = _get(config, field)
    if value is not _MISSING and (not _is_real(value)
                                  or not math.isfinite(value)):
      bad(field, value, 'a finite number')
    elif field != 'lora.alpha' and value is not _MISSING and value < 0:
      bad(field, value, 'a finite number >= 0')
  for field in ('lora.dropout', 'model.dropout', 'optim.b1', 'optim.b2'):
    value = _get(config, field)
    if value is not _MISSING and (not _is_real(value)
                                  or not 0 <= value < 1):
      bad(field, value, 'a number in [0, 1)')
  for field, allowed in _ENUMS.items():
    value = _get(config, field)
    if value is not _MISSING and value not in allowed:
      bad(field, value, f'one of {allowed}')
  factory = _get(config, 'model.factory')
  if factory not in (_MISSING, '', None):
    if not isinstance(factory, str) or factory.count(':') != 1:
      bad('model.factory', factory, "'pkg.module:function'")
    if _get(config, 'model.path') not in (_MISSING, '', None):
      bad('model.factory', factory, "'' when model.path is set (one model)")
    method = _get(config, 'method')
    if method in FACTORY_REFUSED_METHODS:
      bad('method', method, f'none of {FACTORY_REFUSED_METHODS} with '
          f'model.factory={factory!r} (they insert into the shipped '
          "models' own layers)")
    dtype = _get(config, 'model.dtype')
    if dtype not in (_MISSING, 'float32'):
      bad('model.dtype', dtype, "'float32' with model.factory: your model "
          'sets its own dtypes (pass one through model.factory_kwargs)')
    if _get(config, 'task') not in ('classification', 'lm'):
      bad('task', _get(config, 'task'), "'classification' or 'lm' with "
          f'model.factory={factory!r}')
    if _get(config, 'remat') not in (_MISSING, 'none'):
      bad('remat', _get(config, 'remat'), f"'none' with model.factory="
          f"{factory!r}: lorajax does not know your model's layers (wrap "
          'them in nn.remat / jax.checkpoint in your factory)')
    if _get(config, 'loss_chunk') not in (_MISSING, 0):
      bad('loss_chunk', _get(config, 'loss_chunk'), '0 with model.factory='
          f'{factory!r}: your apply gives logits, not hidden states and a '
          'head lorajax can run in chunks')
    if _get(config, 'attn_chunk') not in (_MISSING, 0):
      bad('attn_chunk', _get(config, 'attn_chunk'), '0 with model.factory='
          f"{factory!r}: lorajax does not know your model's attention")
  per_call, mode = _get(config, 'steps_per_call'), _get(config, 'mode')
  if (_is_int(per_call) and per_call > 1 and mode is not _MISSING
      and mode != 'jit'):
    bad('steps_per_call', per_call, f"1 with mode={mode!r} (several steps "
        "in one call run on mode 'jit' only)")
  if (_get(config, 'task') == 'classification'
      and _get(config, 'attn_chunk') not in (_MISSING, 0)):
    bad('attn_chunk', _get(config, 'attn_chunk'), "0 for task "
        "'classification' (only the decoders' attention runs in blocks)")
  if (_get(config, 'task') == 'classification'
      and _get(config, 'loss_chunk') not in (_MISSING, 0)):
    bad('loss_chunk', _get(config, 'loss_chunk'), "0 for task "
        "'classification' (it has no vocabulary logits to chunk)")
  for field in _SPLITS:
    value = _get(config, field)
    if value is _MISSING:
      continue
    if not isinstance(value, str) or not value.strip():
      bad(field, value, 'a split name such as "train" or "train[:256]"')
    elif _empty_slice(value.replace(' ', '')):
      bad(field, value, 'a split slice that selects at least one row')
  return out


def check_config(config) -> None:
  """Raises ValueError listing every invalid field of ``config``."""
  found = problems(config)
  if found:
    raise ConfigError(f'config has {len(found)} invalid field'
                     f'{"s" if len(found) > 1 else ""}:\n  '
                     + '\n  '.join(found))


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """``{'optim.learning_rate': 1e-3, ...}`` of a nested dict."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, f'{prefix}.{key}' if prefix else str(key)))
  return out


def config_changes(stored: dict[str, Any], config) -> list[str]:
  """The run-defining fields that differ, as ``field: stored -> now``.

  A field only one side has (added or removed by another lorajax) is not
  a change.
  """
  have = flatten(stored or {})
  want = flatten(json.loads(config.to_json_best_effort()))
  return [f'{field}: {have[field]!r} -> {want[field]!r}'
          for field in sorted(set(have) & set(want))
          if field not in FREE_FIELDS and have[field] != want[field]]


def check_resume(stored: dict[str, Any], config, where: str) -> list[str]:
  """The changes accepted, or ValueError when they are not allowed.

  Args:
    stored: the checkpoint's ``meta['config']``.
    config: this run's config.
    where: the checkpoint folder, for the message.
  """
  changes = config_changes(stored, config)
  if changes and not bool(_get(config, 'allow_config_change') is True):
    raise ConfigError(
        f'checkpoint {where} was written with another config; '
        f'{len(changes)} run-defining field{"s differ" if len(changes) > 1 else " differs"}'
        ' (checkpoint -> this run):\n  ' + '\n  '.join(changes[:20])
        + '\nResume with the config that wrote it, use a fresh --workdir, '
        'or pass --config.allow_config_change=True to continue with these '
        'changes (they are recorded in the run).')
  return changes
