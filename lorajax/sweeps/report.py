"""Results of a sweep directory: ``results.csv``, ``results.md`` and plots.

``collect`` reads every run workdir of a sweep (``sweep_run.json`` from the
sweep runner, ``summary.json`` and ``metrics.jsonl`` from the training
system) into one row a run::

  name, status, <swept keys>, method, trainable_params, trainable_pct,
  metric, best_validation, best_validation_step, test, step_time_ms,
  tokens_per_sec, peak_memory_mb, adapter_kb, wall_time_s, command

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
  ['heatmap', 'md', 'metric_vs_params', 'metric_vs_rank', 'csv']
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Any, Sequence

from lorajax.sweeps import plots
from lorajax.sweeps import runner

Row = dict[str, Any]
# Config groups that only some methods read: group -> those methods.
METHOD_FIELDS = {'lora': ('lora', 'dora', 'qlora'),
                 'bottleneck': ('bottleneck',), 'prompt': ('prompt',),
                 'prefix': ('prefix',)}
FIELDS = ('method', 'trainable_params', 'trainable_pct', 'metric',
          'best_validation', 'best_validation_step', 'test', 'step_time_ms',
          'tokens_per_sec', 'peak_memory_mb', 'adapter_kb', 'wall_time_s')


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
  row: Row = {'name': record['name'],
             'status': runner.run_status(workdir)}
  for key in keys:
    owners = METHOD_FIELDS.get(key.split('.')[0])
    skip = method is not None and owners is not None and method not in owners
    row[key] = None if skip else config.get(key)
  row.update(dict.fromkeys(FIELDS))
  row['method'] = method
  row['command'] = record['command']
  row['_config'] = config
  row['_overrides'] = record['overrides']
  path = os.path.join(workdir, runner.SUMMARY)
  if not os.path.isfile(path):
    return row
  s = _load(path)
  metric = s['metric']
  step_ms, tps = _speed(s, _train_rows(workdir))
  peak = s.get('peak_rss_bytes')
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
  columns = ['name', 'status', *keys, *FIELDS, 'command']
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


def _best(rows: Sequence[Row], field: str) -> Row | None:
  done = [r for r in rows if r[field] is not None]
  if not done:
    return None
  higher = not str(done[0]['metric']).endswith(('loss', 'perplexity'))
  return (max if higher else min)(done, key=lambda r: r[field])


def _describe(row: Row) -> str:
  config = row['_config']
  return (f'`{row["name"]}` (rank {config.get("lora.rank")}, alpha '
          f'{_value(config.get("lora.alpha"))}): validation '
          f'{row["best_validation"]:.4f}, test {_cell(row["test"])}, '
          f'{row["trainable_params"]:,d} trainable params '
          f'({row["trainable_pct"]:.3f}%)')


def findings(keys: Sequence[str], rows: Sequence[Row]) -> list[str]:
  """Sentences on the best runs and LoRA against full and head-only."""
  out = []
  lora = [r for r in rows if r['method'] in (None, 'lora')]
  best = _best(lora, 'best_validation')
  if best is None:
    return ['No run has finished yet.']
  metric = best['metric']
  out.append(f'Best LoRA run by validation {metric}: {_describe(best)}.')
  in_grid = _best(plots.grid(keys, rows), 'best_validation')
  if in_grid is not None and in_grid is not best:
    out.append(f'Best of the rank × alpha grid by validation {metric}: '
               f'{_describe(in_grid)}.')
  top = _best(lora, 'test')
  if top is not None and top is not best:
    out.append(f'Best LoRA run by test {metric}: `{top["name"]}` '
               f'({top["test"]:.4f}).')
  for method, label in (('full', 'Full fine-tuning'), ('head', 'Head-only')):
    ref = _best([r for r in rows if r['method'] == method], 'best_validation')
    if ref is None or ref['test'] is None or best['test'] is None:
      continue
    gap = best['test'] - ref['test']
    ratio = best['trainable_params'] / ref['trainable_params']
    size = (f'{100 * ratio:.2f}% of its' if ratio < 1
            else f'{ratio:,.0f}× its')
    out.append(f'{label}: test {ref["test"]:.4f} with '
               f'{ref["trainable_params"]:,d} trainable params; the best LoRA '
               f'run is {abs(gap) * 100:.1f} points '
               f'{"above" if gap >= 0 else "below"} it with {size} '
               'trainable params.')
  return out


def markdown(keys: Sequence[str], rows: Sequence[Row], title: str) -> str:
  """``results.md``: the findings and one table row a run."""
  metric = next((r['metric'] for r in rows if r['metric']), 'metric')
  head = ['run', *keys, 'trainable', 'trainable %', f'best val {metric}',
          f'test {metric}', 'step (ms)', 'tokens/s', 'peak mem (MB)',
          'adapter (KB)', 'status']
  lines = [f'# {title}', '', *[f'- {s}' for s in findings(keys, rows)], '',
           '| ' + ' | '.join(head) + ' |',
           '|' + '|'.join('---' for _ in head) + '|']
  for r in rows:
    cells = [f'`{r["name"]}`', *[_value(r[k]) for k in keys],
             _cell(r['trainable_params']), _cell(r['trainable_pct'], 3),
             _cell(r['best_validation']), _cell(r['test']),
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
  """Writes ``results.csv``, ``results.md`` and the PNG plots.

  Args:
    sweep_dir: the folder ``lorajax.cli.sweep`` ran in.
    out_dir: where to write; ``sweep_dir`` by default.

  Returns:
    ``{'csv': path, 'md': path, <plot name>: path, ...}``.
  """
  out_dir = out_dir or sweep_dir
  os.makedirs(out_dir, exist_ok=True)
  keys, rows = collect(sweep_dir)
  paths = {'csv': os.path.join(out_dir, 'results.csv'),
           'md': os.path.join(out_dir, 'results.md')}
  write_csv(paths['csv'], keys, rows)
  title = f'Sweep {os.path.basename(os.path.abspath(sweep_dir))}'
  with open(paths['md'], 'w', encoding='utf-8') as f:
    f.write(markdown(keys, rows, title))
  paths.update(plots.plot_all(keys, rows, out_dir))
  return paths
