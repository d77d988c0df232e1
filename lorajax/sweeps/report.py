"""Results of a sweep directory: tables of runs and configurations, plots.

``collect`` reads every run workdir of a sweep (``sweep_run.json`` from the
sweep runner, ``summary.json`` and ``metrics.jsonl`` from the training
system) into one row a run::

  name, status, <swept keys>, method, seed, trainable_params,
  trainable_pct, metric, best_validation, best_validation_step, test,
  test_step, test_final, test_examples, majority_rate, loss_first,
  loss_last, step_time_ms, tokens_per_sec, peak_memory_mb, adapter_kb,
  wall_time_s, command

``test`` is the score of the run's best validation checkpoint
(``test_step``), ``test_final`` the last step's. ``write_report`` groups the
runs by configuration (``aggregate``: mean, std, 95% interval over seeds),
states the verdicts (``verdicts``: only differences a paired comparison over
seeds can tell from noise, and a warning at the top when runs learned
nothing) and writes ``results.csv`` (a run a line), ``results_by_config.csv``,
``results.md``, ``results.tex`` (``tables``) and the plots (``plots``,
``curve_plots``; PNG with a PDF beside each).

Step time and tokens/s are steady-state: the median over the logged training
windows (tokens/s of each ``log_every`` window; the median leaves out the
window that holds compilation), with tokens/step the run's average of real
(unpadded) tokens. Peak memory is the run process's ``VmHWM`` (present when
the run was a subprocess, as ``lorajax.cli.sweep`` launches it). A swept
value of a method's fields (``lora.*`` for lora/dora/qlora, ``bottleneck.*``,
``prompt.*``, ``prefix.*``) is left blank for runs of another method.

Example:

  >>> paths = write_report('/tmp/sweep')  # doctest: +SKIP
  >>> sorted(paths)  # doctest: +SKIP
  ['config_csv', 'csv', 'learning_curves', 'learning_curves_tokens', 'md',
   'metric_vs_params', 'metric_vs_rank', 'rank_alpha_heatmap', 'tex']
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Any, Sequence

from lorajax.sweeps import aggregate
from lorajax.sweeps import curve_plots
from lorajax.sweeps import grid
from lorajax.sweeps import plots
from lorajax.sweeps import runner
from lorajax.sweeps import tables
from lorajax.sweeps import verdicts

Row = dict[str, Any]
# Config groups that only some methods read: group -> those methods.
METHOD_FIELDS = {'lora': ('lora', 'dora', 'qlora'),
                 'bottleneck': ('bottleneck',), 'prompt': ('prompt',),
                 'prefix': ('prefix',), 'ptuning': ('ptuning',)}
FIELDS = ('method', 'seed', 'trainable_params', 'trainable_pct', 'metric',
          'best_validation', 'best_validation_step', 'test', 'test_step',
          'test_final', 'test_examples', 'majority_rate', 'loss_first',
          'loss_last', 'step_time_ms', 'tokens_per_sec', 'peak_memory_mb',
          'adapter_kb', 'wall_time_s')


def _load(path: str) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _train_rows(workdir: str) -> list[dict[str, Any]]:
  """The last ``train`` line of each step of ``metrics.jsonl``."""
  path = os.path.join(workdir, 'metrics.jsonl')
  rows = {}
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # A line cut by a kill.
        if row.get('split') == 'train':
          rows[row['step']] = row
  return [rows[s] for s in sorted(rows)]


def _speed(summary: dict[str, Any], train_rows: list[dict[str, Any]]
           ) -> tuple[float | None, float | None]:
  """``(step_time_ms, tokens_per_sec)`` in the steady state."""
  rates = [r['tokens_per_sec'] for r in train_rows[1:]
           if isinstance(r.get('tokens_per_sec'), (int, float))]
  if not rates:
    rates = [summary.get('tokens_per_sec') or 0.0]
  rate = statistics.median(rates)
  trained = summary.get('steps', 0) - (summary.get('resumed_from') or 0)
  tokens = (summary.get('tokens_per_sec') or 0) * (
      summary.get('train_time_s') or 0)
  if rate <= 0 or trained <= 0:
    return None, rate or None
  return 1000.0 * tokens / trained / rate, rate


def read_run(workdir: str, keys: Sequence[str],
             record: dict[str, Any] | None = None) -> Row:
  """One row of the table, from one run workdir.

  Args:
    workdir: a run's workdir.
    keys: the swept keys, for their columns.
    record: the run's entry of ``sweep.json``; by default its
      ``sweep_run.json``.

  Returns:
    The row; numbers are None where the run has not finished.
  """
  record = record or _load(os.path.join(workdir, runner.RUN_FILE))
  config = record['config']
  method = config.get('method')
  overrides = record['overrides']
  row: Row = {'name': record['name'],
              'group': grid.run_name({k: v for k, v in overrides.items()
                                      if k != grid.SEED}),
              'status': runner.run_status(workdir)}
  for key in keys:
    owners = METHOD_FIELDS.get(key.split('.')[0])
    skip = method is not None and owners is not None and method not in owners
    row[key] = None if skip else config.get(key)
  row.update(dict.fromkeys(FIELDS))
  row['method'] = method
  row['seed'] = config.get(grid.SEED)
  row['command'] = record['command']
  row['_config'] = config
  row['_overrides'] = record['overrides']
  path = os.path.join(workdir, runner.SUMMARY)
  if not os.path.isfile(path):
    return row
  s = _load(path)
  metric = s['metric']
  train = _train_rows(workdir)
  step_ms, tps = _speed(s, train)
  peak = s.get('peak_rss_bytes')
  losses = [r['loss'] for r in train if isinstance(r.get('loss'),
                                                   (int, float))]
  # Runs written before the best-validation checkpoint tested the last step.
  final = s.get('test_final', s.get('test')) or {}
  row.update(
      test_step=s.get('test_step', s.get('steps')),
      test_final=final.get(metric), test_examples=s.get('test_examples'),
      majority_rate=s.get('test_majority_rate'),
      loss_first=losses[0] if losses else None,
      loss_last=losses[-1] if losses else None, loss_points=len(losses))
  row.update(
      trainable_params=s['trainable_params'],
      trainable_pct=100.0 * s['trainable_fraction'], metric=metric,
      best_validation=(s.get('best_validation') or {}).get(metric),
      best_validation_step=s.get('best_validation_step'),
      test=(s.get('test') or {}).get(metric), step_time_ms=step_ms,
      tokens_per_sec=tps,
      peak_memory_mb=None if peak is None else peak / 2**20,
      adapter_kb=s['adapter_bytes'] / 1024, wall_time_s=s['wall_time_s'])
  return row


def collect(sweep_dir: str) -> tuple[list[str], list[Row]]:
  """``(swept keys, rows)`` of a sweep directory, in sweep order.

  The runs, their order and keys come from ``sweep.json`` (runs not started
  yet are rows with status ``new``); run folders it does not list but that
  have ``sweep_run.json`` follow, by name.

  Raises:
    FileNotFoundError: the folder holds no run.
  """
  records = {}
  listing = os.path.join(sweep_dir, runner.SWEEP_FILE)
  if os.path.isfile(listing):
    records = {r['name']: r for r in _load(listing)['runs']}
  for name in sorted(os.listdir(sweep_dir) if os.path.isdir(sweep_dir)
                     else []):
    path = os.path.join(sweep_dir, name, runner.RUN_FILE)
    if name not in records and os.path.isfile(path):
      records[name] = _load(path)
  if not records:
    raise FileNotFoundError(
        f'no sweep runs in {sweep_dir} (no {runner.SWEEP_FILE}, no '
        f'*/{runner.RUN_FILE})')
  keys = []
  for record in records.values():
    keys += [k for k in record['overrides'] if k not in keys]
  return keys, [read_run(os.path.join(sweep_dir, name), keys, record)
                for name, record in records.items()]


def write_csv(path: str, keys: Sequence[str], rows: Sequence[Row]) -> None:
  """One line a run; empty cells for missing values."""
  columns = list(dict.fromkeys(['name', 'status', *keys, *FIELDS,
                                'command']))   # A swept 'method' once.
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: '' if row.get(k) is None else row[k]
                       for k in columns})


def _cell(value: Any, digits: int = 4) -> str:
  if value is None:
    return '—'
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  if isinstance(value, int) and not isinstance(value, bool):
    return f'{value:,d}'
  return str(value).replace('|', '\\|')


def _value(value: Any) -> str:
  """A config value in a table cell: ``5e-05``, ``8``, `` `regex` ``."""
  if value is None:
    return '—'
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, str):
    return '`' + value.replace('|', '\\|') + '`'
  return str(value)


def _pm(spread: Any, digits: int = 4) -> str:
  """``0.8123 ± 0.0040`` (mean ± std), or the mean alone for one seed."""
  if spread is None:
    return '—'
  if spread.std is None:
    return f'{spread.mean:.{digits}f}'
  return f'{spread.mean:.{digits}f} ± {spread.std:.{digits}f}'


def _interval(spread: Any, digits: int = 4) -> str:
  if spread is None or spread.half_width is None:
    return '—'
  return f'[{spread.low:.{digits}f}, {spread.high:.{digits}f}]'


def config_table(keys: Sequence[str], configs: Sequence[aggregate.Config]
                 ) -> tuple[list[str], list[list[str]]]:
  """``(header, rows)`` of the configurations, aggregated over seeds."""
  metric = configs[0].metric if configs else 'metric'
  keys = [k for k in keys if k != grid.SEED]
  head = ['configuration', *keys, 'seeds', 'trainable', f'best val {metric}',
          f'test {metric}', 'test 95% CI', 'test SE', f'last-step test']
  rows = []
  for c in configs:
    first = (c.rows or [{}])[0]
    cells = [f'`{c.name}`', *[_value(first.get(k, c.config.get(k)))
                              for k in keys],
             f'{len(c.rows)}/{c.planned}', _cell(c.trainable_params),
             _pm(c.validation), _pm(c.test), _interval(c.test),
             _cell(c.test_se), _pm(c.test_final)]
    rows.append(cells)
  return head, rows


def write_config_csv(path: str, keys: Sequence[str],
                     configs: Sequence[aggregate.Config]) -> None:
  """One line a configuration: n, mean, std and 95% interval of each score."""
  keys = [k for k in keys if k != grid.SEED]
  columns = list(dict.fromkeys(['configuration', *keys, 'method', 'n',
                                'planned', 'seeds', 'trainable_params']))
  for field in ('validation', 'test', 'test_final'):
    columns += [f'{field}_mean', f'{field}_std', f'{field}_ci95_low',
                f'{field}_ci95_high']
  columns += ['test_se', 'test_examples']
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for c in configs:
      first = (c.rows or [{}])[0]
      out = {'configuration': c.name, 'method': c.method, 'n': len(c.rows),
             'planned': c.planned,
             'seeds': ' '.join(str(s) for s in c.seeds),
             'trainable_params': c.trainable_params, 'test_se': c.test_se,
             'test_examples': c.test_examples}
      out.update({k: first.get(k, c.config.get(k)) for k in keys
                  if k != 'method'})
      for field in ('validation', 'test', 'test_final'):
        sp = getattr(c, field)
        out.update({f'{field}_mean': sp and sp.mean,
                    f'{field}_std': sp and sp.std,
                    f'{field}_ci95_low': sp and sp.low,
                    f'{field}_ci95_high': sp and sp.high})
      writer.writerow({k: '' if v is None else v for k, v in out.items()})


def markdown(keys: Sequence[str], rows: Sequence[Row], title: str) -> str:
  """``results.md``: warnings, verdicts, the configurations, the runs."""
  configs = aggregate.group(rows)
  metric = next((r['metric'] for r in rows if r['metric']), 'metric')
  warn = verdicts.warnings(rows)
  lines = [f'# {title}', '']
  if warn:
    lines += ['> ' + '\n> '.join(warn), '']
  lines += [*[f'- {s}' for s in verdicts.findings(keys, configs)], '',
            '## Configurations (mean ± std over seeds)', '']
  head, table = config_table(keys, configs)
  lines += ['| ' + ' | '.join(head) + ' |',
            '|' + '|'.join('---' for _ in head) + '|',
            *['| ' + ' | '.join(cells) + ' |' for cells in table], '',
            f'Test is scored at each run\'s best validation step; "last-step '
            f'test" at its last step. The 95% CI is the t interval of the '
            f'mean over seeds; the test SE is the binomial standard error '
            f'√(p(1-p)/N) of the mean {metric} over the N test examples.', '',
            '## Runs', '']
  head = ['run', *keys, 'trainable', 'trainable %', f'best val {metric}',
          f'test {metric}', 'test step', 'step (ms)', 'tokens/s',
          'peak mem (MB)', 'adapter (KB)', 'status']
  lines += ['| ' + ' | '.join(head) + ' |',
            '|' + '|'.join('---' for _ in head) + '|']
  for r in rows:
    cells = [f'`{r["name"]}`', *[_value(r[k]) for k in keys],
             _cell(r['trainable_params']), _cell(r['trainable_pct'], 3),
             _cell(r['best_validation']), _cell(r['test']),
             _cell(r['test_step']),
             _cell(r['step_time_ms'], 0), _cell(r['tokens_per_sec'], 0),
             _cell(r['peak_memory_mb'], 0), _cell(r['adapter_kb'], 1),
             r['status']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', 'Reproduce a run: the `command` column of `results.csv`. '
            'Step time and tokens/s are steady-state medians over logged '
            'windows; peak memory is the run process\'s VmHWM.', '']
  return '\n'.join(lines)


def write_report(sweep_dir: str, out_dir: str | None = None
                 ) -> dict[str, str]:
  """Writes the tables (``results.csv`` a run, ``results_by_config.csv``,
  ``results.md``, ``results.tex``) and the plots (PNG and PDF).

  Args:
    sweep_dir: the folder ``lorajax.cli.sweep`` ran in.
    out_dir: where to write; ``sweep_dir`` by default.

  Returns:
    ``{'csv': path, 'config_csv': path, 'md': path, 'tex': path,
    <plot name>: PNG path, ...}``; each plot's PDF is beside its PNG.
  """
  out_dir = out_dir or sweep_dir
  os.makedirs(out_dir, exist_ok=True)
  keys, rows = collect(sweep_dir)
  configs = aggregate.group(rows)
  paths = {'csv': os.path.join(out_dir, 'results.csv'),
           'config_csv': os.path.join(out_dir, 'results_by_config.csv'),
           'md': os.path.join(out_dir, 'results.md'),
           'tex': os.path.join(out_dir, 'results.tex')}
  write_csv(paths['csv'], keys, rows)
  write_config_csv(paths['config_csv'], keys, configs)
  title = f'Sweep {os.path.basename(os.path.abspath(sweep_dir))}'
  with open(paths['md'], 'w', encoding='utf-8') as f:
    f.write(markdown(keys, rows, title))
  with open(paths['tex'], 'w', encoding='utf-8') as f:
    f.write(tables.latex(keys, configs, title))
  curves = {r['name']: aggregate.curves(os.path.join(sweep_dir, r['name']),
                                        r['metric'])
            for r in rows if r.get('test') is not None}
  paths.update(plots.plot_all(keys, configs, out_dir))
  paths.update(curve_plots.plot_curves(keys, configs, curves, out_dir))
  return paths
