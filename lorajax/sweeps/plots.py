"""PNG plots of a sweep's rows (from ``report.collect``).

Three plots, drawn with matplotlib's object API (``Figure``, Agg canvas; no
pyplot state, no display needed), of the test metric:

- ``metric_vs_rank.png``: one line per alpha over rank (log2 axis); other
  LoRA runs as labelled black markers; full fine-tuning and head-only as reference
  lines.
- ``rank_alpha_heatmap.png``: rank × alpha, each cell annotated.
- ``metric_vs_params.png``: the metric against trainable parameters (log
  axis), with full fine-tuning and head-only as reference lines.

The rank × alpha runs are the finished LoRA runs that share every other swept
value (the largest such group); a plot that has no data is not written.

Example:

  >>> paths = plot_all(keys, rows, '/tmp/sweep')  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from matplotlib import figure
import numpy as np

Row = dict[str, Any]
RANK, ALPHA = 'lora.rank', 'lora.alpha'
_REFS = (('full', 'full fine-tuning', 'tab:red'),
         ('head', 'head only', 'tab:gray'))


def _done(rows: Sequence[Row]) -> list[Row]:
  return [r for r in rows if r.get('test') is not None]


def _is_lora(row: Row) -> bool:
  return row.get('method') in (None, 'lora')


def grid(keys: Sequence[str], rows: Sequence[Row]) -> list[Row]:
  """The finished LoRA runs that differ only in rank and alpha."""
  groups: dict[tuple[Any, ...], list[Row]] = {}
  others = [k for k in keys if k not in (RANK, ALPHA)]
  for row in _done(rows):
    if _is_lora(row) and RANK in row['_config']:
      key = tuple(repr(row['_config'].get(k)) for k in others)
      groups.setdefault(key, []).append(row)
  return max(groups.values(), key=len, default=[])


_MARKERS = ('*', 'P', 'X', 'D', 'v', '^', 's', 'h')


def _short(value: Any, width: int = 42) -> str:
  text = f'{value:g}' if isinstance(value, float) else str(value)
  return text if len(text) <= width else '…' + text[-(width - 1):]


def _label(row: Row, runs: Sequence[Row]) -> str:
  """What sets an off-grid LoRA run apart: its rank and alpha, then each
  override whose value the rank × alpha runs do not share (long values
  keep their end, where the difference usually is)."""
  config = row['_config']
  parts = [f'r={config.get(RANK)}', f'alpha={_short(config.get(ALPHA))}']
  for key, value in row.get('_overrides', {}).items():
    if key in (RANK, ALPHA):
      continue
    if runs and all(r['_config'].get(key) == value for r in runs):
      continue
    parts.append(f'{key.split(".")[-1]}={_short(value)}')
  return ', '.join(parts)


def _extras(rows: Sequence[Row], runs: Sequence[Row]
            ) -> list[tuple[Row, str, str]]:
  """``(row, marker, label)`` for each finished LoRA run off the grid."""
  in_grid = {id(r) for r in runs}
  extra = [r for r in _done(rows) if _is_lora(r) and id(r) not in in_grid
           and RANK in r['_config']]
  return [(r, _MARKERS[i % len(_MARKERS)], _label(r, runs))
          for i, r in enumerate(extra)]


def _legend(fig: figure.Figure, ax) -> None:
  """The legend right of the axes, where it covers no point."""
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0)
  fig.set_size_inches(10, 4.5)


def _references(ax, rows: Sequence[Row], *, with_points: bool = False
                ) -> None:
  for method, label, color in _REFS:
    for row in _done(rows):
      if row.get('method') != method:
        continue
      text = f'{label} ({row["trainable_params"]:,d} params)'
      ax.axhline(row['test'], color=color, linestyle='--', linewidth=1,
                 label=text)
      if with_points:
        ax.plot([row['trainable_params']], [row['test']], 'o', color=color)


def _save(fig: figure.Figure, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def _metric(rows: Sequence[Row]) -> str:
  return next((r['metric'] for r in rows if r.get('metric')), 'metric')


def plot_metric_vs_rank(keys: Sequence[str], rows: Sequence[Row], path: str
                        ) -> str | None:
  """Test metric over rank, one line per alpha; None if no grid."""
  runs = grid(keys, rows)
  if not runs:
    return None
  fig = figure.Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  alphas = sorted({r['_config'][ALPHA] for r in runs})
  colors = [f'C{i % 10}' for i in range(len(alphas))]
  for alpha, color in zip(alphas, colors):
    pts = sorted((r['_config'][RANK], r['test']) for r in runs
                 if r['_config'][ALPHA] == alpha)
    ax.plot(*zip(*pts), 'o-', color=color, label=f'alpha {alpha:g}')
  for row, marker, label in _extras(rows, runs):
    ax.plot([row['_config'][RANK]], [row['test']], marker, markersize=10,
            color='black', linestyle='none', label=label)
  _references(ax, rows)
  ranks = sorted({r['_config'][RANK] for r in _done(rows) if _is_lora(r)
                  and RANK in r['_config']})
  ax.set_xscale('log', base=2)
  ax.set_xticks(ranks, [str(r) for r in ranks])
  ax.set_xlabel('LoRA rank')
  ax.set_ylabel(f'test {_metric(rows)}')
  ax.set_title(f'test {_metric(rows)} vs LoRA rank')
  ax.grid(alpha=0.3)
  _legend(fig, ax)
  return _save(fig, path)


def plot_heatmap(keys: Sequence[str], rows: Sequence[Row], path: str
                 ) -> str | None:
  """Rank × alpha grid of the test metric; None if no grid."""
  runs = grid(keys, rows)
  if not runs:
    return None
  ranks = sorted({r['_config'][RANK] for r in runs})
  alphas = sorted({r['_config'][ALPHA] for r in runs})
  values = np.full((len(ranks), len(alphas)), np.nan)
  for r in runs:
    values[ranks.index(r['_config'][RANK]),
           alphas.index(r['_config'][ALPHA])] = r['test']
  fig = figure.Figure(figsize=(1.6 + 1.1 * len(alphas),
                               1.2 + 0.5 * len(ranks)))
  ax = fig.add_subplot()
  image = ax.imshow(values, cmap='viridis', aspect='auto')
  fig.colorbar(image, ax=ax, label=f'test {_metric(rows)}')
  ax.set_xticks(range(len(alphas)), [f'{a:g}' for a in alphas])
  ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
  ax.set_xlabel('alpha')
  ax.set_ylabel('rank')
  finite = values[np.isfinite(values)]
  middle = float(np.mean([finite.min(), finite.max()]))
  for (i, j), v in np.ndenumerate(values):
    if math.isfinite(v):
      ax.text(j, i, f'{v:.3f}', ha='center', va='center', fontsize=8,
              color='black' if v > middle else 'white')
  ax.set_title(f'test {_metric(rows)}: rank × alpha')
  return _save(fig, path)


def plot_metric_vs_params(keys: Sequence[str], rows: Sequence[Row],
                          path: str) -> str | None:
  """Test metric over trainable parameters; None if nothing finished."""
  done = [r for r in _done(rows) if r.get('trainable_params')]
  if not done:
    return None
  fig = figure.Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  runs = grid(keys, rows)
  alphas = sorted({r['_config'][ALPHA] for r in runs})
  for i, alpha in enumerate(alphas):
    pts = sorted((r['trainable_params'], r['test']) for r in runs
                 if r['_config'][ALPHA] == alpha)
    ax.plot(*zip(*pts), 'o-', color=f'C{i % 10}', label=f'LoRA alpha {alpha:g}')
  for row, marker, label in _extras(rows, runs):
    ax.plot([row['trainable_params']], [row['test']], marker, markersize=10,
            color='black', linestyle='none', label=label)
  _references(ax, rows, with_points=True)
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel(f'test {_metric(rows)}')
  ax.set_title(f'test {_metric(rows)} vs trainable parameters')
  ax.grid(alpha=0.3)
  _legend(fig, ax)
  return _save(fig, path)


def plot_all(keys: Sequence[str], rows: Sequence[Row], out_dir: str
             ) -> dict[str, str]:
  """Writes every plot that has data; ``{name: path}``."""
  out = {}
  for name, fn in (('metric_vs_rank', plot_metric_vs_rank),
                   ('rank_alpha_heatmap', plot_heatmap),
                   ('metric_vs_params', plot_metric_vs_params)):
    path = fn(keys, rows, os.path.join(out_dir, name + '.png'))
    if path:
      out[name] = path
  return out
