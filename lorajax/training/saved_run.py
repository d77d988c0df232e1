"""A run read back from its workdir: the config it ran with, its classes.

Every checkpoint's ``meta`` holds the run's whole config (as JSON) and the
model's description (``model``, with a classifier's ``labels``), so
evaluation and export need only ``--workdir``: no override is typed again,
and no data is read to learn how many classes the head has.

Example:

  >>> config = run_config('/tmp/run')  # doctest: +SKIP
  >>> evaluate_checkpoint(config, '/tmp/run', 'test')  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from ml_collections import config_dict

from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib


def parse_step(text: str | None) -> int | str | None:
  """``None``, ``'best'`` or an int, from a ``--step`` flag.

  Raises:
    ValueError: for anything else.
  """
  if text is None or text == 'best':
    return text
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'step {text!r}; expected a step number or "best"'
                     ) from None


def checkpoint_folder(workdir: str, step: int | str | None = None
                      ) -> tuple[str, int | None]:
  """``(folder, step)`` of a workdir's checkpoint: ``step='best'`` is the
  best validation step's, None the latest, an int that step."""
  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  if step == 'best':
    return os.path.join(workdir, ckpt_lib.BEST_DIR), None
  return os.path.join(workdir, 'checkpoints'), (None if step is None
                                                 else int(step))


def read_meta(workdir: str, step: int | str | None = None
              ) -> tuple[int, dict[str, Any]]:
  """``(step, meta)`` of a workdir's checkpoint (see ``checkpoint_folder``).

  Raises:
    FileNotFoundError: naming the folder, when it holds no checkpoint.
  """
  folder, step = checkpoint_folder(workdir, step)
  try:
    return ckpt_lib.read_meta(folder, step)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f'no complete checkpoint in {folder}: is {workdir!r} the workdir of '
        'a lorajax run that saved one?') from e


def _update(target: config_dict.ConfigDict, saved: dict[str, Any]) -> None:
  for key, value in saved.items():
    if (key in target and isinstance(target[key], config_dict.ConfigDict)
        and isinstance(value, dict)):
      _update(target[key], value)
      continue
    try:
      target[key] = value
    except TypeError:   # e.g. a tuple field saved as a JSON list
      with target.ignore_type():
        target[key] = value


def config_from_meta(meta: dict[str, Any]) -> config_dict.ConfigDict:
  """The locked config a checkpoint's ``meta['config']`` was written from.

  Fields are set on ``base_config(task)``, so a field the run left at its
  default keeps that default's type (placeholders stay overridable).

  Raises:
    ValueError: a meta without a config (a checkpoint of another writer).
  """
  saved = meta.get('config')
  if not isinstance(saved, dict) or 'task' not in saved:
    raise ValueError('the checkpoint meta has no run config; pass the '
                     "run's --config")
  config = config_lib.base_config(saved['task'])
  _update(config, saved)
  config.lock()
  return config


def run_config(workdir: str, step: int | str | None = None
               ) -> config_dict.ConfigDict:
  """The config of the run in ``workdir`` (from its checkpoint's meta)."""
  return config_from_meta(read_meta(workdir, step)[1])


def labels(workdir: str, step: int | str | None = None
           ) -> tuple[str, ...] | None:
  """A classifier run's classes in id order, as its checkpoint recorded
  them; None for an LM or a checkpoint written before classes were kept."""
  names = read_meta(workdir, step)[1].get('model', {}).get('labels')
  return None if names is None else tuple(names)
