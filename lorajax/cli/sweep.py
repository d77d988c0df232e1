r"""Runs a config file's ``sweep(add)``, then writes its report.

  python -m lorajax.cli.sweep --config configs/rt_minilm_sweep.py \
      --workdir /tmp/rt_sweep
  python -m lorajax.cli.sweep --config configs/rt_minilm_sweep.py \
      --workdir /tmp/rt_sweep --report-only

Each run is ``python -m lorajax.cli.train`` in a subprocess, in
``<workdir>/<overrides>``; its command is printed. Finished runs are skipped
and interrupted ones resume, so the same command continues a sweep that was
stopped. ``--config.k=v`` flags apply to every run; ``--seeds=0,1,2``
repeats each configuration once a seed (the config file's ``SEEDS`` by
default). At the end (or with
``--report-only``) ``results.csv``, ``results.md`` and PNG plots are written
to the workdir. The exit status is 1 if any run failed. ``lorajax-sweep``
(a console script) is the same command.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from lorajax.sweeps import grid
from lorajax.sweeps import report
from lorajax.sweeps import runner

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file with get_config and sweep(add) '
    '(path[:arg]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep folder: one workdir '
                               'per run, and the results.', required=True)
_SEEDS = flags.DEFINE_list('seeds', None, 'Seeds every configuration runs '
                           'with (e.g. 0,1,2); by default the config file\'s '
                           'SEEDS, if it declares them.')
_REPORT_ONLY = flags.DEFINE_bool('report-only', False, 'Only write the '
                                 'report of the runs already in --workdir.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  failed = []
  if not _REPORT_ONLY.value:
    config_file = config_flags.get_config_filename(flags.FLAGS['config'])
    base = config_flags.get_override_values(flags.FLAGS['config'])
    seeds = None
    if _SEEDS.value is not None:
      try:
        seeds = [int(s) for s in _SEEDS.value]
      except ValueError as e:
        raise app.UsageError(f'--seeds={",".join(_SEEDS.value)}: {e}') from e
    runs = grid.expand(config_file, _WORKDIR.value, base, seeds=seeds)
    print(f'{len(runs)} runs in {_WORKDIR.value}', flush=True)
    outcome = runner.run_sweep(
        runs, _WORKDIR.value, echo=lambda s: print(s, flush=True))
    failed = [name for name, status in outcome.items() if status == 'failed']
  paths = report.write_report(_WORKDIR.value)
  with open(paths['md'], encoding='utf-8') as f:
    print(f.read())
  print('\n'.join(f'wrote {path}' for path in paths.values()))
  if failed:
    print(f'{len(failed)} run(s) failed: {", ".join(failed)}', file=sys.stderr)
    sys.exit(1)


def run() -> None:
  """The ``lorajax-sweep`` console script."""
  app.run(main)


if __name__ == '__main__':
  run()
