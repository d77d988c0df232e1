"""Plots of a sweep's configurations (from ``aggregate.group``), PNG and PDF.

Drawn with matplotlib's object API (``Figure``, Agg canvas; no pyplot state,
no display needed), of the test metric (taken at each run's best validation
step), as the mean over seeds with its 95% t interval as error bars:

- ``metric_vs_rank``: one line per alpha over rank (log2 axis); each alpha
  has its own marker and line style and is nudged sideways, so lines that
  coincide stay apart; other LoRA runs as labelled black markers; full
  fine-tuning and head-only as bands (their 95% interval) around their mean.
- ``rank_alpha_heatmap``: rank × alpha, each cell the mean and, below it,
  ``± std`` over seeds.
- ``metric_vs_params``: the metric against trainable parameters (log axis),
  with the full fine-tuning and head-only bands.

The rank × alpha configurations are the finished LoRA configurations that
share every other swept value (the largest such group); a plot without data
is not written. Each plot is written as ``<name>.png`` and ``<name>.pdf``.

Example:

  >>> paths = plot_all(keys, configs, '/tmp/sweep')  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from matplotlib import figure
import numpy as np

from lorajax.sweeps import aggregate

Config = aggregate.Config
RANK, ALPHA = 'lora.rank', 'lora.alpha'
REFS = (('full', 'full fine-tuning', 'tab:red'),
        ('head', 'head only', 'tab:gray'))
MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', 'h')
LINESTYLES = ('-', '--', '-.', ':')
_EXTRA_MARKERS = ('*', 'P', 'X', 'D', 'v', '^', 's', 'h')


def is_lora(c: Config) -> bool:
  return c.method in (None, 'lora') and c.config.get(RANK) is not None


def grid(keys: Sequence[str], configs: Sequence[Config]) -> list[Config]:
  """The finished LoRA configurations that differ only in rank and alpha."""
  groups: dict[tuple[Any, ...], list[Config]] = {}
  others = [k for k in keys if k not in (RANK, ALPHA, 'seed')]
  for c in aggregate.finished(configs):
    if is_lora(c):
      key = tuple(repr(c.config.get(k)) for k in others)
      groups.setdefault(key, []).append(c)
  return max(groups.values(), key=len, default=[])


def _short(value: Any, width: int = 42) -> str:
  text = f'{value:g}' if isinstance(value, float) else str(value)
  return text if len(text) <= width else '…' + text[-(width - 1):]


def label(c: Config, runs: Sequence[Config]) -> str:
  """What sets an off-grid LoRA run apart: its rank and alpha, then each
  override whose value the grid does not share (long values keep their
  end, where the difference usually is)."""
  parts = [f'r={c.config.get(RANK)}', f'alpha={_short(c.config.get(ALPHA))}']
  for key, value in c.overrides.items():
    if key in (RANK, ALPHA):
      continue
    if runs and all(r.config.get(key) == value for r in runs):
      continue
    parts.append(f'{key.split(".")[-1]}={_short(value)}')
  return ', '.join(parts)


def _extras(configs: Sequence[Config], runs: Sequence[Config]
            ) -> list[tuple[Config, str, str]]:
  """``(config, marker, label)`` of each finished LoRA config off the grid."""
  in_grid = {c.name for c in runs}
  extra = [c for c in aggregate.finished(configs) if is_lora(c)
           and c.name not in in_grid]
  return [(c, _EXTRA_MARKERS[i % len(_EXTRA_MARKERS)], label(c, runs))
          for i, c in enumerate(extra)]


def _err(c: Config) -> float:
  return c.test.half_width or 0.0


def _seeds(configs: Sequence[Config]) -> str:
  ns = sorted({c.test.n for c in aggregate.finished(configs)})
  if not ns:
    return ''
  n = f'{ns[0]}' if len(ns) == 1 else f'{ns[0]}–{ns[-1]}'
  return (f'mean over {n} seed{"s" if ns[-1] > 1 else ""}'
          + ('; bars: 95% CI' if ns[-1] > 1 else ''))


def _legend(fig: figure.Figure, ax) -> None:
  """The legend right of the axes, where it covers no point."""
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0)
  fig.set_size_inches(10, 4.5)


def _references(ax, configs: Sequence[Config], *, with_points: bool = False
                ) -> None:
  """Full fine-tuning and head-only: a line at the mean, a band for the CI."""
  for method, label, color in REFS:
    for c in aggregate.finished(configs):
      if c.method != method:
        continue
      text = f'{label} ({c.trainable_params:,d} params)'
      ax.axhline(c.test.mean, color=color, linestyle='--', linewidth=1,
                 label=text)
      if c.test.half_width:
        ax.axhspan(c.test.low, c.test.high, color=color, alpha=0.15,
                   linewidth=0)
      if with_points:
        ax.errorbar([c.trainable_params], [c.test.mean], yerr=[_err(c)],
                    fmt='o', color=color, capsize=3)


def save(fig: figure.Figure, path: str) -> str:
  """Writes ``path`` (PNG) and the same figure as PDF beside it."""
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  fig.savefig(os.path.splitext(path)[0] + '.pdf')
  return path


def metric_name(configs: Sequence[Config]) -> str:
  return configs[0].metric if configs else 'metric'


def _alpha_lines(ax, runs: Sequence[Config], x_of, *, dodge: float
                 ) -> None:
  """One error-bar line per alpha; alpha ``i`` shifted by ``dodge * i``
  (a factor on a log axis) so that equal values do not hide each other."""
  alphas = sorted({c.config[ALPHA] for c in runs})
  middle = (len(alphas) - 1) / 2
  for i, alpha in enumerate(alphas):
    pts = sorted((x_of(c), c.test.mean, _err(c)) for c in runs
                 if c.config[ALPHA] == alpha)
    x, y, e = (np.array(v, dtype=float) for v in zip(*pts))
    ax.errorbar(x * dodge ** (i - middle), y, yerr=e, color=f'C{i % 10}',
                marker=MARKERS[i % len(MARKERS)],
                linestyle=LINESTYLES[i % len(LINESTYLES)], capsize=3,
                markersize=5, label=f'LoRA alpha {alpha:g}')


def plot_metric_vs_rank(keys: Sequence[str], configs: Sequence[Config],
                        path: str) -> str | None:
  """Test metric over rank, one line per alpha; None if no grid."""
  runs = grid(keys, configs)
  if not runs:
    return None
  fig = figure.Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  _alpha_lines(ax, runs, lambda c: c.config[RANK], dodge=1.06)
  for c, marker, label in _extras(configs, runs):
    ax.errorbar([c.config[RANK]], [c.test.mean], yerr=[_err(c)], fmt=marker,
                markersize=9, color='black', capsize=3, label=label)
  _references(ax, configs)
  ranks = sorted({c.config[RANK] for c in aggregate.finished(configs)
                  if is_lora(c)})
  ax.set_xscale('log', base=2)
  ax.set_xticks(ranks, [str(r) for r in ranks])
  ax.minorticks_off()
  ax.set_xlabel('LoRA rank')
  metric = metric_name(configs)
  ax.set_ylabel(f'test {metric} (at best validation step)')
  ax.set_title(f'test {metric} vs LoRA rank ({_seeds(configs)})')
  ax.grid(alpha=0.3)
  _legend(fig, ax)
  return save(fig, path)


def plot_heatmap(keys: Sequence[str], configs: Sequence[Config], path: str
                 ) -> str | None:
  """Rank × alpha grid: mean test metric, ± std below it; None if no grid."""
  runs = grid(keys, configs)
  if not runs:
    return None
  ranks = sorted({c.config[RANK] for c in runs})
  alphas = sorted({c.config[ALPHA] for c in runs})
  values = np.full((len(ranks), len(alphas)), np.nan)
  spread = np.full_like(values, np.nan)
  for c in runs:
    at = ranks.index(c.config[RANK]), alphas.index(c.config[ALPHA])
    values[at] = c.test.mean
    spread[at] = np.nan if c.test.std is None else c.test.std
  fig = figure.Figure(figsize=(2.0 + 1.2 * len(alphas),
                               1.4 + 0.6 * len(ranks)))
  ax = fig.add_subplot()
  image = ax.imshow(values, cmap='viridis', aspect='auto')
  metric = metric_name(configs)
  fig.colorbar(image, ax=ax, label=f'mean test {metric}')
  ax.set_xticks(range(len(alphas)), [f'{a:g}' for a in alphas])
  ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
  ax.set_xlabel('alpha')
  ax.set_ylabel('rank')
  finite = values[np.isfinite(values)]
  middle = float(np.mean([finite.min(), finite.max()]))
  for (i, j), v in np.ndenumerate(values):
    if math.isfinite(v):
      text = f'{v:.3f}' + (f'\n±{spread[i, j]:.3f}'
                           if math.isfinite(spread[i, j]) else '')
      ax.text(j, i, text, ha='center', va='center', fontsize=7,
              color='black' if v > middle else 'white')
  ax.set_title(f'test {metric}: rank × alpha\n(mean ± std over seeds)',
               fontsize=9)
  return save(fig, path)


def plot_metric_vs_params(keys: Sequence[str], configs: Sequence[Config],
                          path: str) -> str | None:
  """Test metric over trainable parameters; None if nothing finished."""
  done = [c for c in aggregate.finished(configs) if c.trainable_params]
  if not done:
    return None
  fig = figure.Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  runs = grid(keys, configs)
  if runs:
    _alpha_lines(ax, runs, lambda c: c.trainable_params, dodge=1.04)
  for c, marker, label in _extras(configs, runs):
    ax.errorbar([c.trainable_params], [c.test.mean], yerr=[_err(c)],
                fmt=marker, markersize=9, color='black', capsize=3,
                label=label)
  _references(ax, configs, with_points=True)
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  metric = metric_name(configs)
  ax.set_ylabel(f'test {metric} (at best validation step)')
  ax.set_title(f'test {metric} vs trainable parameters ({_seeds(configs)})')
  ax.grid(alpha=0.3)
  _legend(fig, ax)
  return save(fig, path)


def plot_all(keys: Sequence[str], configs: Sequence[Config], out_dir: str
             ) -> dict[str, str]:
  """Writes every plot that has data; ``{name: PNG path}``."""
  out = {}
  for name, fn in (('metric_vs_rank', plot_metric_vs_rank),
                   ('rank_alpha_heatmap', plot_heatmap),
                   ('metric_vs_params', plot_metric_vs_params)):
    path = fn(keys, configs, os.path.join(out_dir, name + '.png'))
    if path:
      out[name] = path
  return out
