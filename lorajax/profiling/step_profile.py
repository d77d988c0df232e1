"""Peak memory, step time and FLOPs of one config's train step, per batch size.

In the spirit of the LoRA paper's and PEFT's measurements: for batch sizes
1, 2, 4, 8, ... each measurement runs in a fresh subprocess, so its peak
resident memory (``VmHWM``, see ``lorajax.runtime.memory``) is that batch
size's alone. The child builds the run exactly as ``train_and_evaluate``
does (task, spec, optimizer, ``jax.jit`` step), compiles the step once,
reads XLA's FLOP count from ``lower(...).compile().cost_analysis()``, times a
few steps after warm-up, and reports. The parent fits
``peak = intercept + slope · batch`` by least squares: ``slope`` is the
memory each extra example adds. FLOPs per token (over padded tokens,
``batch · max_len``) should not depend on the batch size.

Example:

  >>> rows = [{'batch_size': b, 'peak_rss_bytes': (500 + 10 * b) * 2**20}
  ...         for b in (1, 2, 4)]
  >>> {k: round(v, 3) for k, v in fit_memory(rows).items()}
  {'slope_mb': 10.0, 'intercept_mb': 500.0, 'r2': 1.0}

``profile('configs/x.py', {}, [1, 2, 4])`` measures such rows (each in a
``python -m lorajax.cli.profile`` subprocess); ``markdown`` and ``plot``
show them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import jax
from matplotlib import figure
import numpy as np

from lorajax.data import loader
from lorajax.profiling import op_time
from lorajax.runtime import cpu_attention
from lorajax.runtime import memory
from lorajax.sweeps import grid
from lorajax.training import optim
from lorajax.training import parallel
from lorajax.training import step as step_lib
from lorajax.training import tasks

RESULT_PREFIX = 'STEP_PROFILE '
PROFILE_MODULE = 'lorajax.cli.profile'
Row = dict[str, Any]


def xla_flops(compiled) -> float | None:
  """``flops`` of a compiled computation's cost analysis, with the products
  of lorajax's fused CPU attention calls added (XLA counts a custom call as
  -1; ``cpu_attention.step_flops``); None if XLA reports none."""
  return cpu_attention.step_flops(compiled)


def measure(config, batch_size: int, *, steps: int = 5, warmup: int = 2,
            where: bool = False) -> Row:
  """Measures one batch size in this process (call it in a fresh one).

  Args:
    config: a training config (``configs/``).
    batch_size: examples per step.
    steps: timed steps (the median is reported).
    warmup: untimed steps first (the first one compiles).
    where: also trace ``steps`` more steps with ``jax.profiler`` and add
      ``where`` (``op_time.breakdown``: op time per category) to the row.

  Returns:
    ``batch_size``, ``step_time_s``, ``flops``, ``tokens`` (padded),
    ``real_tokens``, ``setup_rss_bytes`` (after building the run, before
    compiling) and ``peak_rss_bytes`` (``VmHWM`` at the end).
  """
  task = tasks.build_task(config)
  trainable, frozen = task.split_params()
  tx, _ = optim.from_config(config.optim, int(config.num_train_steps))
  runner = parallel.runner_from_config(config, task, tx)
  state = step_lib.create_state(trainable, tx, config.seed)
  state, frozen = runner.place(state, frozen)
  host_batch = next(iter(loader.BatchIterator(
      task.data['train'], batch_size=batch_size, seed=config.seed,
      train=True)))
  batch = runner.put_batch(host_batch)
  setup_rss = memory.rss_bytes()
  compiled = runner.train_step.lower(state, frozen, batch).compile()
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  row = {'batch_size': batch_size, 'step_time_s': statistics.median(times),
          'flops': xla_flops(compiled),
          'tokens': int(np.size(host_batch[task.tokens_key])),
          'real_tokens': int(np.sum(host_batch[task.tokens_key])),
          'trainable_params': int(sum(np.size(x) for x in
                                      jax.tree.leaves(trainable))),
          'setup_rss_bytes': setup_rss,
          'peak_rss_bytes': memory.peak_rss_bytes()}
  if where:
    def one_step():
      nonlocal state
      state, metrics = compiled(state, frozen, batch)
      return state, metrics
    row['where'] = op_time.breakdown(compiled.as_text(), one_step,
                                     steps=steps)
  return row


def measure_in_subprocess(config_file: str, overrides: Mapping[str, Any],
                          batch_size: int, *, timeout: float = 1800.0,
                          where: bool = False) -> Row:
  """Runs ``python -m lorajax.cli.profile --child_batch_size=B`` for one B.

  Raises:
    RuntimeError: the child failed (with the end of its output).
  """
  argv = [sys.executable, '-m', PROFILE_MODULE,
          *grid.config_argv(config_file, overrides),
          f'--child_batch_size={batch_size}', f'--where={where}']
  proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                        timeout=timeout)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = '\n'.join((proc.stdout + proc.stderr).splitlines()[-20:])
  raise RuntimeError(f'profile of batch size {batch_size} failed (exit '
                     f'status {proc.returncode}):\n{tail}')


def profile(config_file: str, overrides: Mapping[str, Any],
            batch_sizes: Sequence[int], *, echo=print, where: bool = False
            ) -> list[Row]:
  """Measures every batch size, each in its own subprocess."""
  rows = []
  for b in batch_sizes:
    row = measure_in_subprocess(config_file, overrides, b, where=where)
    echo(f'batch {b}: {1000 * row["step_time_s"]:.0f} ms/step, peak '
         f'{row["peak_rss_bytes"] / 2**20:.0f} MB, '
         f'{(row["flops"] or 0) / row["tokens"] / 1e6:.1f} MFLOPs/token')
    rows.append(row)
  return rows


def fit_memory(rows: Sequence[Row]) -> dict[str, float]:
  """Least-squares ``peak = intercept + slope · batch``, in MB, with R²."""
  b = np.array([r['batch_size'] for r in rows], float)
  peak = np.array([r['peak_rss_bytes'] for r in rows], float) / 2**20
  if len(rows) < 2:
    return {'slope_mb': float('nan'), 'intercept_mb': float(peak[0]),
            'r2': float('nan')}
  slope, intercept = np.polyfit(b, peak, 1)
  resid = peak - (intercept + slope * b)
  total = np.sum((peak - peak.mean()) ** 2)
  r2 = 1.0 - np.sum(resid ** 2) / total if total > 0 else 1.0
  return {'slope_mb': float(slope), 'intercept_mb': float(intercept),
          'r2': float(r2)}


def fit_flops(rows: Sequence[Row]) -> dict[str, float]:
  """``flops = per_step + per_token · tokens`` by least squares.

  ``per_token`` is the cost of the model on one more token; ``per_step`` is
  what does not grow with the batch (the optimizer update: a few FLOPs per
  trainable parameter), which is why total / tokens falls a little with the
  batch size when many parameters are trained.
  """
  tokens = np.array([r['tokens'] for r in rows], float)
  flops = np.array([r['flops'] or np.nan for r in rows], float)
  if len(rows) < 2 or not np.all(np.isfinite(flops)):
    return {'per_token': float(np.nanmean(flops / tokens)), 'per_step': 0.0}
  per_token, per_step = np.polyfit(tokens, flops, 1)
  return {'per_token': float(per_token), 'per_step': float(per_step)}


def markdown(rows: Sequence[Row], fit: Mapping[str, float], title: str
             ) -> str:
  """The table: one row a batch size, then the fit and the FLOPs spread."""
  lines = [f'# {title}', '',
           '| batch | step (ms) | examples/s | tokens/s (padded) | peak RSS '
           '(MB) | GFLOPs/step | MFLOPs/token |',
           '|---|---|---|---|---|---|---|']
  per_token = []
  for r in rows:
    flops = r['flops'] or float('nan')
    per_token.append(flops / r['tokens'])
    lines.append(
        f'| {r["batch_size"]} | {1000 * r["step_time_s"]:.1f} | '
        f'{r["batch_size"] / r["step_time_s"]:.1f} | '
        f'{r["tokens"] / r["step_time_s"]:,.0f} | '
        f'{r["peak_rss_bytes"] / 2**20:,.0f} | {flops / 1e9:.2f} | '
        f'{flops / r["tokens"] / 1e6:.2f} |')
  spread = (max(per_token) - min(per_token)) / np.mean(per_token)
  flops_fit = fit_flops(rows)
  lines += [
      '',
      f'- Memory per extra example: {fit["slope_mb"]:.2f} MB (least-squares '
      f'fit peak = {fit["intercept_mb"]:.0f} MB + {fit["slope_mb"]:.2f} MB × '
      f'batch, R² = {fit["r2"]:.3f}).',
      f'- FLOPs per token (XLA cost analysis of the compiled step, over '
      f'padded tokens): {np.mean(per_token) / 1e6:.2f} M on average, spread '
      f'{100 * spread:.2f}% across batch sizes; as a line, '
      f'{flops_fit["per_token"] / 1e6:.2f} M per token + '
      f'{flops_fit["per_step"] / 1e6:.2f} M per step (the optimizer update, '
      'independent of the batch).',
      f'- Trainable params: {rows[0]["trainable_params"]:,d}. Peak RSS is '
      'each batch size\'s own fresh process (VmHWM); step time is the median '
      'of timed steps after warm-up.', '']
  if all('where' in r for r in rows):
    lines += [
        '## Where the time goes', '',
        'The step\'s wall time by the category of the XLA op running '
        '(`lorajax.profiling.op_time`: the compiled step traced with '
        '`jax.profiler`; an op runs from its event to its `end:` event, '
        'and an instant when several ops run is shared between them); one '
        'column a batch size.', '',
        op_time.summarize({f'batch {r["batch_size"]}': r['where']
                           for r in rows}), '']
  return '\n'.join(lines)


def plot(rows: Sequence[Row], fit: Mapping[str, float], path: str,
         title: str) -> str:
  """Peak memory (with the fit), step time and FLOPs/token vs batch size."""
  b = np.array([r['batch_size'] for r in rows], float)
  fig = figure.Figure(figsize=(13, 4))
  ax_mem, ax_time, ax_flops = fig.subplots(1, 3)
  ax_mem.plot(b, [r['peak_rss_bytes'] / 2**20 for r in rows], 'o',
              label='peak RSS (VmHWM)')
  dense = np.geomspace(b.min(), b.max(), 64)  # The line, on a log axis.
  ax_mem.plot(dense, fit['intercept_mb'] + fit['slope_mb'] * dense, '-',
              label=f'fit: {fit["slope_mb"]:.2f} MB / example')
  ax_mem.set_ylabel('MB')
  ax_mem.legend(fontsize=8)
  ax_time.plot(b, [1000 * r['step_time_s'] for r in rows], 'o-')
  ax_time.set_ylabel('step time (ms)')
  ax_flops.plot(b, [(r['flops'] or np.nan) / r['tokens'] / 1e6 for r in rows],
                'o-', label='total / tokens')
  ax_flops.axhline(fit_flops(rows)['per_token'] / 1e6, color='gray',
                   linestyle='--', label='per token, without the per-step '
                   'part')
  ax_flops.legend(fontsize=8)
  ax_flops.set_ylabel('MFLOPs per token (XLA)')
  ax_flops.set_ylim(0, 1.2 * max((r['flops'] or 0) / r['tokens']
                                  for r in rows) / 1e6 or 1.0)
  for ax, name in ((ax_mem, 'peak memory'), (ax_time, 'step time'),
                   (ax_flops, 'FLOPs per token')):
    ax.set_xscale('log', base=2)
    ax.set_xticks(b, [str(int(x)) for x in b])
    ax.set_xlabel('batch size')
    ax.set_title(name)
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
