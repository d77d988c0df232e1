r"""``results.tex``: a sweep's configurations as a LaTeX table for a paper.

One row a configuration: its swept values, trainable parameters, and the
best validation and test scores as ``mean ± std`` over seeds (in points for
accuracy), with the number of seeds; booktabs rules (``\usepackage
{booktabs}``). The caption says how the test score was taken.

Example:

  >>> escape('lora.rank=8, 50% & _x_')
  'lora.rank=8, 50\\% \\& \\_x\\_'
"""

from __future__ import annotations

from typing import Any, Sequence

from lorajax.sweeps import aggregate
from lorajax.sweeps import grid

_SPECIAL = {'\\': r'\textbackslash{}', '&': r'\&', '%': r'\%', '$': r'\$',
            '#': r'\#', '_': r'\_', '{': r'\{', '}': r'\}',
            '~': r'\textasciitilde{}', '^': r'\textasciicircum{}'}


def escape(text: Any) -> str:
  """``text`` with LaTeX's special characters escaped."""
  return ''.join(_SPECIAL.get(ch, ch) for ch in str(text))


def _value(value: Any) -> str:
  if value is None:
    return '--'
  if isinstance(value, float):
    return f'{value:g}'
  return escape(value)


def _pm(spread: Any, scale: float) -> str:
  if spread is None:
    return '--'
  digits = 1 if scale == 100 else 4
  if spread.std is None:
    return f'${scale * spread.mean:.{digits}f}$'
  return (f'${scale * spread.mean:.{digits}f} \\pm '
          f'{scale * spread.std:.{digits}f}$')


def latex(keys: Sequence[str], configs: Sequence[aggregate.Config],
          title: str) -> str:
  """The ``table`` environment of ``configs`` (see the module docstring)."""
  keys = [k for k in keys if k != grid.SEED]
  metric = configs[0].metric if configs else 'metric'
  scale = 100.0 if metric == 'accuracy' else 1.0
  unit = ' (\\%)' if scale == 100 else ''
  head = [*[escape(k.split('.')[-1]) for k in keys], 'trainable', 'seeds',
          f'val {escape(metric)}{unit}', f'test {escape(metric)}{unit}']
  lines = ['% ' + title.replace('\n', ' '),
           '\\begin{table}[t]', '\\centering', '\\small',
           '\\begin{tabular}{' + 'l' * len(keys) + 'rrrr}', '\\toprule',
           ' & '.join(head) + ' \\\\', '\\midrule']
  for c in configs:
    first = (c.rows or [{}])[0]
    cells = [_value(first.get(k, c.config.get(k))) for k in keys]
    cells += [f'{c.trainable_params:,d}'.replace(',', '{,}')
              if c.trainable_params else '--', str(len(c.rows)),
              _pm(c.validation, scale), _pm(c.test, scale)]
    lines.append(' & '.join(cells) + ' \\\\')
  lines += ['\\bottomrule', '\\end{tabular}',
            f'\\caption{{{escape(title)}: mean $\\pm$ standard deviation over '
            'seeds; test scored at each run\'s best validation step.}',
            '\\end{table}', '']
  return '\n'.join(lines)
