r"""Sweeps declared in a config file: expand, run, skip, resume, reproduce.

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
``python -m experiments.train`` parses it, so the printed command reproduces
the run. A run's workdir is ``<sweep_dir>/<name>``, the name made of its
overrides (``lora.rank=8,lora.alpha=16``; unsafe characters replaced, and then
a short hash appended so that names stay distinct).

``run_sweep`` launches each run (by default as a subprocess
``python -m experiments.train --config=... --workdir=... --config.k=v``): a
subprocess returns all its memory when it ends, has its own peak RSS
(``VmHWM`` starts afresh at ``exec``), cannot take the sweep down when it
crashes, and is literally the reproduction command. A run whose workdir holds
``summary.json`` (written by ``train_and_evaluate`` when it ends) is finished
and skipped; any other run is launched, and the training system resumes it
from the newest checkpoint in its workdir.

Example:

  >>> runs = expand('configs/rt_minilm_sweep.py', '/tmp/sweep')  # doctest: +SKIP
  >>> runs[0].name, runs[0].command()  # doctest: +SKIP
  ('lora.rank=1,lora.alpha=1', 'python -m experiments.train --config=...')
  >>> results = run_sweep(runs, '/tmp/sweep')  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import difflib
import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

SUMMARY = 'summary.json'   # The completion marker, from train_and_evaluate.
RUN_FILE = 'sweep_run.json'
SWEEP_FILE = 'sweep.json'
LOG_FILE = 'train.log'
LOCK_FILE = '.sweep.lock'
TRAIN_MODULE = 'experiments.train'
_MAX_NAME = 120
_UNSAFE = re.compile(r'[^A-Za-z0-9._,=+-]')


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep.

  Attributes:
    name: the workdir's name, made of the overrides.
    overrides: ``{dotted key: value}`` of this run, in ``add`` order.
    config: the run's locked config, as its command line parses.
    argv: the flags after ``python -m experiments.train``.
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
  """The locked config that ``experiments.train`` builds from these flags."""
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
           base_overrides: Mapping[str, Any] | None = None) -> list[Run]:
  """Every run of the file's ``sweep(add)``, checked before any starts.

  Args:
    config_file: ``path[:arg]`` of a config file with ``get_config`` and
      ``sweep``.
    sweep_dir: the folder that holds one workdir per run.
    base_overrides: ``{dotted key: value}`` applied to every run first (the
      sweep command's own ``--config.k=v`` flags); not part of run names.

  Returns:
    The runs, in ``add`` order.

  Raises:
    ValueError: a key that is not a config field (named, with the fields
      that exist), a value the field does not take, a run added twice.
  """
  base_overrides = dict(base_overrides or {})
  base = parse_config(config_file, base_overrides)
  check_keys(base, base_overrides, f'{config_file} (command line)')
  entries = sweep_entries(config_file)
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


def latest_checkpoint(workdir: str) -> int | None:
  """The newest complete checkpoint step in ``<workdir>/checkpoints``."""
  folder = os.path.join(workdir, 'checkpoints')
  steps = [int(d) for d in (os.listdir(folder) if os.path.isdir(folder)
                            else []) if d.isdigit()]
  return max(steps, default=None)


def run_status(workdir: str) -> str:
  """``'finished'`` (has ``summary.json``), ``'unfinished'`` or ``'new'``.

  ``'unfinished'``: started (running now, or stopped) and not finished.
  """
  if os.path.isfile(os.path.join(workdir, SUMMARY)):
    return 'finished'
  if os.path.isfile(os.path.join(workdir, RUN_FILE)) or latest_checkpoint(
      workdir) is not None:
    return 'unfinished'
  return 'new'


def _record(run: Run) -> dict[str, Any]:
  return {'name': run.name, 'overrides': run.overrides,
          'command': run.command(), 'config': flat_config(run.config)}


def check_existing(runs: Sequence[Run]) -> list[str]:
  """Checks that each existing workdir was made by the config it gets now.

  A finished run is skipped and an unfinished one resumed only when every
  field its recorded config shares with the current one has the same value.
  Fields added to (or removed from) the configs since then do not count:
  code that adds a field keeps the old behaviour as its default.

  Returns:
    Notes naming the added and removed fields (one per distinct change).

  Raises:
    ValueError: naming the run and the fields whose values differ, before
      anything is launched.
  """
  changes: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
  for run in runs:
    path = os.path.join(run.workdir, RUN_FILE)
    if not os.path.isfile(path):
      continue
    with open(path, encoding='utf-8') as f:
      old = json.load(f)['config']
    new = flat_config(run.config)
    diff = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if diff:
      shown = ', '.join(f'{k}: {old[k]!r} -> {new[k]!r}' for k in diff[:5])
      raise ValueError(f'run {run.name}: {run.workdir} was made with a '
                       f'different config ({shown}); use another sweep '
                       'workdir or remove that run')
    added = tuple(sorted(set(new) - set(old)))
    removed = tuple(sorted(set(old) - set(new)))
    if added or removed:
      changes.setdefault((added, removed), []).append(run.name)
  return [f'note: config fields added since {len(names)} run(s) were made '
          f'({names[0]}, ...): {", ".join(added) or "none"}; removed: '
          f'{", ".join(removed) or "none"}'
          for (added, removed), names in changes.items()]


Launcher = Callable[[Run], int]


def _die_with_parent() -> None:
  """In the child: SIGKILL when the sweep process dies (Linux prctl)."""
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def subprocess_launcher(run: Run) -> int:
  """Runs ``python -m experiments.train`` for ``run``; output to train.log.

  The child is killed if the sweep process dies, so that a restarted sweep
  never finds an orphan still training in the same workdir.

  Returns:
    The exit status of the subprocess.
  """
  os.makedirs(run.workdir, exist_ok=True)
  log = os.path.join(run.workdir, LOG_FILE)
  with open(log, 'a', encoding='utf-8') as f:
    f.write(f'$ {run.command()}\n')
    f.flush()
    proc = subprocess.run(
        [sys.executable, '-m', TRAIN_MODULE, *run.argv], stdout=f,
        stderr=subprocess.STDOUT, check=False,
        preexec_fn=_die_with_parent if sys.platform == 'linux' else None)
  return proc.returncode


def _tail(path: str, lines: int = 15) -> str:
  if not os.path.isfile(path):
    return ''
  with open(path, encoding='utf-8', errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


@contextlib.contextmanager
def _lock(sweep_dir: str):
  """Holds ``<sweep_dir>/.sweep.lock``; one sweep process per folder."""
  with open(os.path.join(sweep_dir, LOCK_FILE), 'a+', encoding='utf-8') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise RuntimeError(f'another sweep is running in {sweep_dir}; wait for '
                         'it or stop it first') from e
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_sweep(runs: Sequence[Run], sweep_dir: str, *,
              launcher: Launcher = subprocess_launcher,
              echo: Callable[[str], None] = print) -> dict[str, str]:
  """Runs every unfinished run, one after another.

  Finished runs are skipped, interrupted ones resumed (the training system
  restores the newest checkpoint of the workdir), each run's reproduction
  command is printed, and a failed run does not stop the others.

  Args:
    runs: from ``expand``.
    sweep_dir: the folder of the run workdirs; ``sweep.json`` lists the runs.
    launcher: ``run -> exit status``; it must leave ``summary.json`` in
      ``run.workdir`` when the run completes.
    echo: where progress lines go.

  Returns:
    ``{name: 'skipped' | 'done' | 'failed'}``.

  Raises:
    ValueError: from ``check_existing``, before any run is launched.
    RuntimeError: another sweep process holds the folder.
  """
  for note in check_existing(runs):
    echo(note)
  os.makedirs(sweep_dir, exist_ok=True)
  with _lock(sweep_dir):
    with open(os.path.join(sweep_dir, SWEEP_FILE), 'w', encoding='utf-8') as f:
      json.dump({'runs': [_record(r) for r in runs]}, f, indent=2)
    return _run_all(runs, launcher, echo)


def _run_all(runs: Sequence[Run], launcher: Launcher,
             echo: Callable[[str], None]) -> dict[str, str]:
  outcome = {}
  for i, run in enumerate(runs, 1):
    status = run_status(run.workdir)
    head = f'[{i}/{len(runs)}] {run.name}'
    if status == 'finished':
      echo(f'{head}: finished, skipped\n  {run.command()}')
      outcome[run.name] = 'skipped'
      continue
    step = latest_checkpoint(run.workdir)
    what = f'resuming from step {step}' if step is not None else 'starting'
    echo(f'{head}: {what}\n  {run.command()}')
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, RUN_FILE), 'w', encoding='utf-8') as f:
      json.dump(_record(run), f, indent=2)
    code = launcher(run)
    if code == 0 and run_status(run.workdir) == 'finished':
      outcome[run.name] = 'done'
      echo(f'{head}: done')
    else:
      outcome[run.name] = 'failed'
      echo(f'{head}: FAILED (exit status {code}); last lines of '
           f'{os.path.join(run.workdir, LOG_FILE)}:\n'
           + _tail(os.path.join(run.workdir, LOG_FILE)))
  return outcome
