r"""Runs a sweep's runs one after another: skip, resume, reproduce.

``run_sweep`` launches each run of ``lorajax.sweeps.grid.expand`` (by default
as a subprocess ``python -m lorajax.cli.train --config=... --workdir=...
--config.k=v``): a subprocess returns all its memory when it ends, has its
own peak RSS (``VmHWM`` starts afresh at ``exec``), cannot take the sweep
down when it crashes, and is literally the reproduction command. A run whose
workdir holds ``summary.json`` (written by ``train_and_evaluate`` when it
ends) is finished and skipped; any other run is launched, and the training
system resumes it from the newest checkpoint in its workdir. One sweep
process holds a folder at a time, and its runs die with it.

Example:

  >>> import tempfile
  >>> from ml_collections import config_dict
  >>> sweep_dir = tempfile.mkdtemp()
  >>> run = grid.Run(name='a=1', overrides={'a': 1},
  ...                config=config_dict.ConfigDict({'a': 1}),
  ...                argv=('--config.a=1',), workdir=f'{sweep_dir}/a=1')
  >>> def fake_train(run):  # The default launches python -m lorajax.cli.train.
  ...   with open(os.path.join(run.workdir, SUMMARY), 'w') as f:
  ...     f.write('{}')
  ...   return 0
  >>> run_sweep([run], sweep_dir, launcher=fake_train, echo=lambda s: None)
  {'a=1': 'done'}
  >>> run_sweep([run], sweep_dir, launcher=fake_train, echo=lambda s: None)
  {'a=1': 'skipped'}
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from lorajax.sweeps import grid

SUMMARY = 'summary.json'   # The completion marker, from train_and_evaluate.
RUN_FILE = 'sweep_run.json'
SWEEP_FILE = 'sweep.json'
LOG_FILE = 'train.log'
LOCK_FILE = '.sweep.lock'
Run = grid.Run


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
          'command': run.command(), 'config': grid.flat_config(run.config)}


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
    new = grid.flat_config(run.config)
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


PARENT_ENV = 'LORAJAX_SWEEP_PARENT'


def die_with_parent_from_env() -> None:
  """In a run launched by a sweep: die when the sweep process dies.

  The launcher names its pid in ``$LORAJAX_SWEEP_PARENT``; this asks Linux
  for SIGKILL when the parent goes (``prctl(PR_SET_PDEATHSIG)``), and exits
  at once if it is already gone. Called at the start of
  ``lorajax.cli.train`` (after ``exec``: a ``preexec_fn`` would have to run
  Python in a forked copy of the multithreaded JAX process). A no-op
  outside a sweep or off Linux.
  """
  parent = os.environ.get(PARENT_ENV)
  if not parent or sys.platform != 'linux':
    return
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
  if os.getppid() != int(parent):
    sys.exit(f'the sweep process {parent} that launched this run is gone')


def subprocess_launcher(run: Run) -> int:
  """Runs ``python -m lorajax.cli.train`` for ``run``; output to train.log.

  The child is killed if the sweep process dies (``die_with_parent_from_env``),
  so that a restarted sweep never finds an orphan still training in the same
  workdir.

  Returns:
    The exit status of the subprocess.
  """
  os.makedirs(run.workdir, exist_ok=True)
  log = os.path.join(run.workdir, LOG_FILE)
  with open(log, 'a', encoding='utf-8') as f:
    f.write(f'$ {run.command()}\n')
    f.flush()
    proc = subprocess.run(
        [sys.executable, '-m', grid.TRAIN_MODULE, *run.argv], stdout=f,
        stderr=subprocess.STDOUT, check=False,
        env=dict(os.environ, **{PARENT_ENV: str(os.getpid())}))
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
              echo: Callable[[str], None] = print,
              clock: Callable[[], float] = time.monotonic) -> dict[str, str]:
  """Runs every unfinished run, one after another.

  Finished runs are skipped, interrupted ones resumed (the training system
  restores the newest checkpoint of the workdir), each run's reproduction
  command is printed, and a failed run does not stop the others.

  Args:
    runs: from ``grid.expand``.
    sweep_dir: the folder of the run workdirs; ``sweep.json`` lists the runs.
    launcher: ``run -> exit status``; it must leave ``summary.json`` in
      ``run.workdir`` when the run completes.
    echo: where progress lines go: each run's start, command and end, with
      its wall time and an estimate of the time the sweep has left (the
      mean of the runs launched so far, times the runs still to launch).
    clock: seconds, for those times.

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
    return _run_all(runs, launcher, echo, clock)


def _duration(seconds: float) -> str:
  """``42s``, ``3m05s``, ``1h02m``."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def _run_all(runs: Sequence[Run], launcher: Launcher,
             echo: Callable[[str], None],
             clock: Callable[[], float]) -> dict[str, str]:
  outcome = {}
  todo = [r for r in runs if run_status(r.workdir) != 'finished']
  spent = []
  sweep_start = clock()
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
    start = clock()
    code = launcher(run)
    spent.append(clock() - start)
    left = len(todo) - len(spent)
    took = f'in {_duration(spent[-1])}' + (
        f'; about {_duration(left * sum(spent) / len(spent))} left for '
        f'{left} more run{"s" if left > 1 else ""}' if left > 0 else '')
    if code == 0 and run_status(run.workdir) == 'finished':
      outcome[run.name] = 'done'
      echo(f'{head}: done {took}')
    else:
      outcome[run.name] = 'failed'
      echo(f'{head}: FAILED (exit status {code}) {took}; last lines of '
           f'{os.path.join(run.workdir, LOG_FILE)}:\n'
           + _tail(os.path.join(run.workdir, LOG_FILE)))
  counts = {k: list(outcome.values()).count(k)
            for k in ('done', 'skipped', 'failed')}
  echo(f'{len(runs)} runs, {counts["done"]} done, {counts["skipped"]} '
       f'skipped, {counts["failed"]} failed, in '
       f'{_duration(clock() - sweep_start)}')
  return outcome
