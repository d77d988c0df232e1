"""A sweep's runs grouped by configuration and aggregated over seeds.

A configuration is a run's overrides without its ``seed``; its runs are the
seeds it ran with. ``group`` turns the rows of ``report.collect`` into
``Config``s (in sweep order) holding the ``stats.Spread`` of the best
validation score, of the test score (taken at the best validation step) and
of the final step's test score, and the test set's binomial standard error.
``curves`` reads each run's ``metrics.jsonl`` into learning curves, and
``curve_spread`` puts a configuration's seeds together step by step.

Example:

  >>> rows = [dict(name=f'r=1,seed={s}', group='r=1', seed=s, method='lora',
  ...              status='finished', metric='accuracy', test=t,
  ...              best_validation=t, test_final=t, test_examples=100,
  ...              trainable_params=10, _config={}, _overrides={'r': 1})
  ...         for s, t in ((0, 0.8), (1, 0.9))]
  >>> [c] = group(rows)
  >>> c.name, c.test.n, round(c.test.mean, 2), round(c.test_se, 3)
  ('r=1', 2, 0.85, 0.036)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from lorajax.sweeps import stats

Row = dict[str, Any]
LOWER_IS_BETTER = ('loss', 'perplexity')


def higher_is_better(metric: str | None) -> bool:
  """Accuracy-like metrics rise; losses and perplexities fall."""
  return not str(metric).endswith(LOWER_IS_BETTER)


def _spread(rows: Sequence[Row], field: str) -> stats.Spread | None:
  values = [r[field] for r in rows if r.get(field) is not None]
  return stats.describe(values) if values else None


@dataclasses.dataclass(frozen=True)
class Config:
  """One configuration of a sweep and its finished seeds.

  Attributes:
    name: the run name without the seed (``lora.rank=8,lora.alpha=8``).
    rows: the finished runs, in sweep order (one a seed).
    planned: how many runs of it the sweep has, finished or not.
    method: the config's ``method``.
    config: the first run's flat config (its seed aside, all runs share it).
    overrides: the swept values, without the seed.
    trainable_params: of its runs.
    metric: the task's metric name.
    validation: the best validation score over seeds.
    test: the test score at the best validation step over seeds.
    test_final: the test score at the last step over seeds.
    test_se: the binomial standard error of ``test.mean`` over the test
      set's size (accuracy only; None otherwise or when the size is unknown).
    test_examples: the test set's size.
  """
  name: str
  rows: tuple[Row, ...]
  planned: int
  method: str | None
  config: dict[str, Any]
  overrides: dict[str, Any]
  trainable_params: int | None
  metric: str
  validation: stats.Spread | None
  test: stats.Spread | None
  test_final: stats.Spread | None
  test_se: float | None
  test_examples: int | None

  def by_seed(self, field: str = 'test') -> dict[Any, float]:
    """``{seed: value}`` of one field of the finished runs."""
    return {r['seed']: r[field] for r in self.rows
            if r.get(field) is not None}

  @property
  def seeds(self) -> list[Any]:
    return [r['seed'] for r in self.rows]


def group(rows: Sequence[Row]) -> list[Config]:
  """The configurations of ``rows`` (report rows), in order of first run."""
  groups: dict[str, list[Row]] = {}
  for row in rows:
    groups.setdefault(row['group'], []).append(row)
  out = []
  for name, members in groups.items():
    done = [r for r in members if r.get('test') is not None]
    first = (done or members)[0]
    metric = first.get('metric') or next(
        (r['metric'] for r in rows if r.get('metric')), 'metric')
    test = _spread(done, 'test')
    sizes = {r.get('test_examples') for r in done} - {None}
    size = min(sizes) if sizes else None
    se = (stats.binomial_se(test.mean, size) if test is not None and size
          and metric == 'accuracy' else None)
    out.append(Config(
        name=name, rows=tuple(done), planned=len(members),
        method=first.get('method'), config=first['_config'],
        overrides={k: v for k, v in first['_overrides'].items()
                   if k != 'seed'},
        trainable_params=first.get('trainable_params'), metric=metric,
        validation=_spread(done, 'best_validation'), test=test,
        test_final=_spread(done, 'test_final'), test_se=se,
        test_examples=size))
  return out


def finished(configs: Sequence[Config]) -> list[Config]:
  return [c for c in configs if c.test is not None]


def best(configs: Sequence[Config], field: str = 'validation'
         ) -> Config | None:
  """The configuration of the best mean ``field``; None if none has it."""
  have = [c for c in configs if getattr(c, field) is not None]
  if not have:
    return None
  sign = 1 if higher_is_better(have[0].metric) else -1
  return max(have, key=lambda c: sign * getattr(c, field).mean)


# ---- learning curves -------------------------------------------------------


class Curve(NamedTuple):
  """A learning curve: ``value`` at each ``step`` (and its ``tokens``).

  ``std`` and ``n`` are the spread over seeds and their number, for a
  curve from ``curve_spread``.
  """
  step: list[int]
  tokens: list[float] | None
  value: list[float]
  std: list[float] | None = None
  n: int = 1


def _lines(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, 'metrics.jsonl')
  out = []
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # A line cut by a kill.
  return out


def curves(workdir: str, metric: str) -> dict[str, Curve]:
  """``{'loss': train loss curve, 'validation': metric curve}`` of a run.

  The last line of each step wins (a resumed run writes a step again).
  Tokens are the real tokens trained on by each step (``tokens_seen`` of the
  train lines; validation steps take the train line of their step, or are
  interpolated); None for runs written before that field existed.
  """
  train: dict[int, dict[str, Any]] = {}
  val: dict[int, float] = {}
  for row in _lines(workdir):
    if row.get('split') == 'train' and 'loss' in row:
      train[row['step']] = row
    elif row.get('split') == 'validation' and metric in row:
      val[row['step']] = row[metric]
  steps = sorted(train)
  known = steps and all('tokens_seen' in train[s] for s in steps)
  tokens = [train[s]['tokens_seen'] for s in steps] if known else None
  out = {'loss': Curve(steps, tokens, [train[s]['loss'] for s in steps])}
  vsteps = sorted(val)
  vtokens = None
  if known:
    vtokens = list(np.interp(vsteps, [0] + steps, [0] + tokens))
  out['validation'] = Curve(vsteps, vtokens, [val[s] for s in vsteps])
  return out


def curve_spread(runs: Sequence[Curve]) -> Curve | None:
  """Mean and std over seeds at the steps every run has.

  Returns:
    A ``Curve`` of the means (tokens: their mean over runs, or None) with
    ``std`` and ``n``, or None when the runs share no step.
  """
  runs = [r for r in runs if r.step]
  if not runs:
    return None
  steps = sorted(set.intersection(*(set(r.step) for r in runs)))
  if not steps:
    return None
  values = np.array([[dict(zip(r.step, r.value))[s] for s in steps]
                     for r in runs], dtype=float)
  tokens = None
  if all(r.tokens is not None for r in runs):
    tokens = np.mean([[dict(zip(r.step, r.tokens))[s] for s in steps]
                      for r in runs], axis=0).tolist()
  std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
  return Curve(steps, tokens, values.mean(0).tolist(), std.tolist(),
               len(runs))
