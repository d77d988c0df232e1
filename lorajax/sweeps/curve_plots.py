"""Learning curves of a sweep: validation metric and training loss per step.

``plot_curves`` draws, from each run's ``metrics.jsonl``
(``aggregate.curves``), one line a configuration: the mean over its seeds
with a band of ± one standard deviation. Columns are the validation metric
and the training loss; rows are the rank × alpha grid's alphas (one row an
alpha, one colour a rank) and then the other configurations (off-grid
LoRA runs, full fine-tuning, head-only). ``learning_curves.png`` has steps
on the x axis, ``learning_curves_tokens.png`` the real (unpadded) training
tokens seen, when the runs logged them; each with a PDF beside it.

Example:

  >>> paths = plot_curves(keys, configs, curves, '/tmp/sweep')  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from matplotlib import figure
import numpy as np

from lorajax.sweeps import aggregate
from lorajax.sweeps import plots

Config = aggregate.Config
Curves = dict[str, dict[str, aggregate.Curve]]


def _rows(keys: Sequence[str], configs: Sequence[Config]
          ) -> list[tuple[str, list[Config]]]:
  """``(title, configurations)`` of each row of panels."""
  done = aggregate.finished(configs)
  runs = plots.grid(keys, configs)
  out = []
  for alpha in sorted({c.config[plots.ALPHA] for c in runs}):
    members = sorted((c for c in runs if c.config[plots.ALPHA] == alpha),
                     key=lambda c: c.config[plots.RANK])
    out.append((f'LoRA alpha {alpha:g}', members))
  names = {c.name for c in runs}
  rest = [c for c in done if c.name not in names]
  if rest:
    out.append(('other runs' if runs else 'runs', rest))
  return out


def _line_label(c: Config, runs: Sequence[Config]) -> str:
  if c.name in {r.name for r in runs}:
    return f'rank {c.config[plots.RANK]}'
  if plots.is_lora(c):
    return plots.label(c, runs)
  return dict((m, label) for m, label, _ in plots.REFS).get(c.method, c.name)


def _draw(ax, curve: aggregate.Curve, x_key: str, style: dict[str, Any],
          label: str) -> bool:
  x = curve.step if x_key == 'step' else curve.tokens
  if x is None or not curve.step:
    return False
  y, sd = np.asarray(curve.value), np.asarray(curve.std)
  ax.plot(x, y, label=label + (f' (n={curve.n})' if curve.n > 1 else ''),
          linewidth=1.3, markersize=3.5, **style)
  if curve.n > 1:
    ax.fill_between(x, y - sd, y + sd, color=style['color'], alpha=0.15,
                    linewidth=0)
  return True


def _figure(keys: Sequence[str], configs: Sequence[Config], curves: Curves,
            x_key: str, path: str) -> str | None:
  panels = _rows(keys, configs)
  if not panels:
    return None
  runs = plots.grid(keys, configs)
  metric = plots.metric_name(configs)
  fig = figure.Figure(figsize=(11, 2.9 * len(panels)))
  axes = fig.subplots(len(panels), 2, squeeze=False)
  drawn = False
  for (title, members), row in zip(panels, axes):
    for i, c in enumerate(members):
      ref = {m: color for m, _, color in plots.REFS}.get(c.method)
      style = dict(color=ref or f'C{i % 10}', marker=plots.MARKERS[i % 8],
                   linestyle=plots.LINESTYLES[i % 4])
      for column, split in ((0, 'validation'), (1, 'loss')):
        spread = aggregate.curve_spread(
            [curves[r['name']][split] for r in c.rows if r['name'] in curves])
        if spread is not None:
          drawn |= _draw(row[column], spread, x_key, style,
                         _line_label(c, runs))
    row[0].set_ylabel(f'validation {metric}')
    row[1].set_ylabel('training loss')
    for ax in row:
      ax.set_title(title, fontsize=9)
      ax.grid(alpha=0.3)
      ax.set_xlabel('step' if x_key == 'step' else 'training tokens')
    if row[1].get_legend_handles_labels()[0]:
      row[1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0),
                    borderaxespad=0.0)
  if not drawn:
    return None
  fig.suptitle('learning curves: mean over seeds, band ± 1 std', fontsize=10)
  return plots.save(fig, path)


def plot_curves(keys: Sequence[str], configs: Sequence[Config],
                curves: Curves, out_dir: str) -> dict[str, str]:
  """Writes the learning-curve plots that have data; ``{name: PNG path}``.

  Args:
    keys: the swept keys.
    configs: from ``aggregate.group``.
    curves: ``{run name: aggregate.curves(run workdir, metric)}``.
    out_dir: where to write.
  """
  out = {}
  for name, x_key in (('learning_curves', 'step'),
                      ('learning_curves_tokens', 'tokens')):
    path = _figure(keys, configs, curves, x_key,
                   os.path.join(out_dir, name + '.png'))
    if path:
      out[name] = path
  return out
