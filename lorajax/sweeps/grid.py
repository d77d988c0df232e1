r"""Sweeps declared in a config file: expand into runs that reproduce.

A config file may define ``sweep(add)`` next to ``get_config(arg)``, in the
style of big_vision; each ``add(...)`` call is one run, given as overrides of
dotted config fields::

  def sweep(add):
    for rank in (1, 8, 64):
      add(**{'lora.rank': rank, 'lora.alpha': 2 * rank})
    add(method='full', **{'optim.learning_rate': 5e-5})

``expand`` turns that into ``Run``s. Every swept key must be a field of the
config (a misspelled key is a ``ValueError`` naming it, raised before any run
starts), and every run's config is parsed from its own command line exactly as
``python -m lorajax.cli.train`` parses it, so the printed command reproduces
the run. A run's workdir is ``<sweep_dir>/<name>``, the name made of its
overrides (``lora.rank=8,lora.alpha=16``; unsafe characters replaced, and then
a short hash appended so that names stay distinct).
``lorajax.sweeps.runner.run_sweep`` runs them.

Seeds are an axis like any other: ``add(seed=1, ...)`` sets the ``seed``
field of one run, and a config file that declares ``SEEDS = (0, 1, 2)``
next to ``sweep`` (or ``expand(..., seeds=(0, 1, 2))``, the sweep command's
``--seeds``) repeats every entry that sets no seed once a seed, seed-major:
every configuration at the first seed, then at the second, so that a sweep
stopped part-way has a whole grid at fewer seeds. The seed is the last part
of a repeated run's name (``lora.rank=8,lora.alpha=16,seed=1``).

Example:

  >>> overrides = {'lora.rank': 8, 'lora.alpha': 16.0}
  >>> run_name(overrides)
  'lora.rank=8,lora.alpha=16.0'
  >>> config_argv('configs/x.py', overrides, '/tmp/sweep/lora.rank=8')
  ['--config=configs/x.py', '--workdir=/tmp/sweep/lora.rank=8', '--config.lora.rank=8', '--config.lora.alpha=16.0']

``expand('configs/x.py', '/tmp/sweep')`` gives one ``Run`` a call of
``add``, whose ``command()`` is ``python -m lorajax.cli.train`` and the flags
above.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shlex
from typing import Any, Mapping, Sequence

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

TRAIN_MODULE = 'lorajax.cli.train'
SEED = 'seed'   # The config field a sweep repeats over.
_MAX_NAME = 120
_UNSAFE = re.compile(r'[^A-Za-z0-9._,=+-]')


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep.

  Attributes:
    name: the workdir's name, made of the overrides.
    overrides: ``{dotted key: value}`` of this run, in ``add`` order.
    config: the run's locked config, as its command line parses.
    argv: the flags after ``python -m lorajax.cli.train``.
    workdir: ``<sweep_dir>/<name>``.
  """
  name: str
  overrides: dict[str, Any]
  config: config_dict.ConfigDict
  argv: tuple[str, ...]
  workdir: str

  def command(self) -> str:
    """The shell command that reproduces this run on its own."""
    return shlex.join(['python', '-m', TRAIN_MODULE, *self.argv])


def _split(config_file: str) -> tuple[str, str | None]:
  path, sep, arg = config_file.partition(':')
  return path, (arg if sep else None)


def load_module(config_file: str):
  """Imports the config file ``path[:arg]`` as a module."""
  path, _ = _split(config_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location('_lorajax_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sweep_entries(config_file: str) -> list[dict[str, Any]]:
  """The overrides each ``add(...)`` of the file's ``sweep(add)`` gives.

  ``sweep`` may take a second parameter ``arg``: the file's ``:arg``.

  Raises:
    ValueError: the file defines no ``sweep``, or it adds no run.
  """
  module = load_module(config_file)
  fn = getattr(module, 'sweep', None)
  if fn is None:
    raise ValueError(f'{config_file} defines no sweep(add) function')
  entries = []
  add = lambda **overrides: entries.append(dict(overrides))
  if 'arg' in inspect.signature(fn).parameters:
    fn(add, arg=_split(config_file)[1])
  else:
    fn(add)
  if not entries:
    raise ValueError(f'sweep(add) of {config_file} added no run')
  return entries


def declared_seeds(config_file: str) -> tuple[int, ...] | None:
  """The file's ``SEEDS`` (a tuple of ints), or None if it declares none.

  Raises:
    ValueError: ``SEEDS`` is not a non-empty sequence of distinct ints.
  """
  seeds = getattr(load_module(config_file), 'SEEDS', None)
  return None if seeds is None else check_seeds(seeds, config_file)


def check_seeds(seeds: Any, where: str) -> tuple[int, ...]:
  """``seeds`` as a tuple of distinct ints; ValueError naming it if not."""
  try:
    out = tuple(seeds)
  except TypeError:
    out = None
  if (not out or any(isinstance(s, bool) or not isinstance(s, int)
                     for s in out) or len(set(out)) != len(out)):
    raise ValueError(f'{where}: seeds {seeds!r}; expected a non-empty '
                     'sequence of distinct ints such as (0, 1, 2)')
  return out


def with_seeds(entries: list[dict[str, Any]], seeds: tuple[int, ...] | None
               ) -> list[dict[str, Any]]:
  """Each entry once a seed, seed-major; entries that set ``seed`` once.

  >>> with_seeds([{'a': 1}, {'a': 2, 'seed': 7}], (0, 1))
  [{'a': 1, 'seed': 0}, {'a': 2, 'seed': 7}, {'a': 1, 'seed': 1}]
  """
  if not seeds:
    return entries
  out = []
  for i, seed in enumerate(seeds):
    for entry in entries:
      if SEED not in entry:
        out.append({**entry, SEED: seed})
      elif i == 0:
        out.append(entry)
  return out


def check_keys(config: config_dict.ConfigDict, overrides: Mapping[str, Any],
               where: str) -> None:
  """Raises ValueError unless every dotted key is a field of ``config``."""
  for key, value in overrides.items():
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      fields = sorted(node.keys()) if isinstance(
          node, config_dict.ConfigDict) else []
      if part not in fields:
        prefix = '.'.join(parts[:i])
        near = difflib.get_close_matches(part, fields, n=1)
        hint = f'; did you mean {".".join(parts[:i] + near)!r}?' if near else ''
        raise ValueError(
            f'{where}: swept key {key!r} is not a config field{hint} Fields '
            f'of {prefix or "the config"}: {", ".join(fields) or "none"}')
      node = node[part]
    if isinstance(node, config_dict.ConfigDict):
      raise ValueError(f'{where}: swept key {key!r} is a group of fields, '
                       'not a field; sweep its fields instead')
    if value is None:
      raise ValueError(f'{where}: swept key {key!r} has value None, which no '
                       'command line can set')


def flag_value(value: Any) -> str:
  """``value`` as ``--config.key=`` text that ml_collections parses back."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
  """A filesystem-safe, distinct name: ``lora.rank=8,lora.alpha=16``."""
  if not overrides:
    return 'base'
  raw = ','.join(f'{k}={flag_value(v)}' for k, v in overrides.items())
  safe = re.sub(r'_+', '_', _UNSAFE.sub('_', raw))
  if safe == raw and len(raw) <= _MAX_NAME:
    return raw
  digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
  return f'{safe[:_MAX_NAME - 9]}-{digest}'


def config_argv(config_file: str, overrides: Mapping[str, Any],
                workdir: str | None = None) -> list[str]:
  """``--config=... [--workdir=...] --config.k=v ...`` of one run."""
  argv = [f'--config={config_file}']
  if workdir is not None:
    argv.append(f'--workdir={workdir}')
  argv += [f'--config.{k}={flag_value(v)}' for k, v in overrides.items()]
  return argv


def parse_config(config_file: str, overrides: Mapping[str, Any]
                 ) -> config_dict.ConfigDict:
  """The locked config that ``lorajax.cli.train`` builds from these flags."""
  argv = ['sweep'] + config_argv(config_file, overrides)
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      'config', None, flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


def flat_config(config: config_dict.ConfigDict) -> dict[str, Any]:
  """``{dotted key: JSON value}`` of every field."""
  out = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, prefix + key + '.')
      else:
        out[prefix + key] = value
  walk(json.loads(config.to_json_best_effort()), '')
  return out


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(map(_same, a, b))
  return a == b


def expand(config_file: str, sweep_dir: str,
           base_overrides: Mapping[str, Any] | None = None, *,
           seeds: Sequence[int] | None = None) -> list[Run]:
  """Every run of the file's ``sweep(add)``, checked before any starts.

  Args:
    config_file: ``path[:arg]`` of a config file with ``get_config`` and
      ``sweep``.
    sweep_dir: the folder that holds one workdir per run.
    base_overrides: ``{dotted key: value}`` applied to every run first (the
      sweep command's own ``--config.k=v`` flags); not part of run names.
    seeds: repeat every entry that sets no ``seed`` once a seed (see
      ``with_seeds``); None takes the file's ``SEEDS``, if it has one.

  Returns:
    The runs, in ``add`` order.

  Raises:
    ValueError: a key that is not a config field (named, with the fields
      that exist), a value the field does not take, a run added twice.
  """
  base_overrides = dict(base_overrides or {})
  base = parse_config(config_file, base_overrides)
  check_keys(base, base_overrides, f'{config_file} (command line)')
  seeds = (declared_seeds(config_file) if seeds is None
           else check_seeds(seeds, f'{config_file} (seeds)'))
  entries = with_seeds(sweep_entries(config_file), seeds)
  for i, overrides in enumerate(entries):
    check_keys(base, overrides, f'{config_file}: sweep entry {i} {overrides}')
  runs, seen = [], {}
  for i, overrides in enumerate(entries):
    name = run_name(overrides)
    if name in seen:
      raise ValueError(f'{config_file}: sweep entries {seen[name]} and {i} '
                       f'are the same run ({name})')
    seen[name] = i
    merged = {**base_overrides, **overrides}
    try:
      config = parse_config(config_file, merged)
    except (flags.Error, TypeError, ValueError, AttributeError) as e:
      raise ValueError(f'{config_file}: sweep entry {i} {overrides} does not '
                       f'fit the config: {e}') from e
    for key, value in overrides.items():
      got = config
      for part in key.split('.'):
        got = got[part]
      if not _same(got, value):
        raise ValueError(f'{config_file}: sweep entry {i}: {key}={value!r} '
                         f'reads back from its flag as {got!r}')
    workdir = os.path.join(sweep_dir, name)
    runs.append(Run(name=name, overrides=overrides, config=config,
                    argv=tuple(config_argv(config_file, merged, workdir)),
                    workdir=workdir))
  return runs
