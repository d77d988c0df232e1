"""What a sweep report may say: differences that exceed the noise, and no more.

``degenerate`` finds runs that learned nothing (a test accuracy not above
the test set's majority-class rate by one standard error, or a training loss
that did not fall); ``warnings`` turns them into the lines at the top of
``results.md``. ``findings`` states the verdicts: the best LoRA
configuration chosen by validation (never by test), its paired difference
from full fine-tuning and head-only, and differences along rank and along
alpha, each stated only where the paired 95% interval over seeds excludes
zero, else as "no measurable difference". A measurable difference smaller
than the test set's standard error is said to be so.

Example:

  >>> findings([], [])
  ['No run has finished yet.']
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from lorajax.sweeps import aggregate
from lorajax.sweeps import stats

Row = dict[str, Any]
Config = aggregate.Config
RANK, ALPHA = 'lora.rank', 'lora.alpha'
# A training loss that ends above (1 - this) of its first logged value did
# not fall.
LOSS_DROP = 0.01


def at_majority(row: Row) -> bool:
  """The run's test accuracy is within one standard error of (or below) the
  majority-class rate of its test set."""
  rate, n, test = (row.get('majority_rate'), row.get('test_examples'),
                   row.get('test'))
  if rate is None or not n or test is None or row.get('metric') != 'accuracy':
    return False
  return test <= rate + stats.binomial_se(rate, n)


def loss_flat(row: Row) -> bool:
  """The run's last logged training loss is not below its first by 1%."""
  first, last = row.get('loss_first'), row.get('loss_last')
  if first is None or last is None or row.get('loss_points', 0) < 2:
    return False
  return last > first * (1 - LOSS_DROP)


def degenerate(rows: Sequence[Row]) -> dict[str, list[Row]]:
  """``{'majority': runs at the majority rate, 'flat': flat losses,
  'same': all runs when every finished run has one test score (two or
  more runs; the check for runs without a recorded majority rate)}``."""
  done = [r for r in rows if r.get('test') is not None]
  same = done if len(done) > 1 and len({r['test'] for r in done}) == 1 else []
  return {'majority': [r for r in done if at_majority(r)],
          'flat': [r for r in done if loss_flat(r)], 'same': same}


def _names(rows: Sequence[Row], limit: int = 4) -> str:
  names = [f'`{r["name"]}`' for r in rows[:limit]]
  return ', '.join(names) + (f' and {len(rows) - limit} more'
                             if len(rows) > limit else '')


def warnings(rows: Sequence[Row]) -> list[str]:
  """The degenerate-sweep lines for the top of the report (none if fine)."""
  bad = degenerate(rows)
  n = sum(r.get('test') is not None for r in rows)
  out = []
  if bad['majority']:
    r = bad['majority'][0]
    out.append(f'{len(bad["majority"])} of {n} finished runs score at the '
               f'majority-class rate of the test set ({r["majority_rate"]:.4f}'
               f' over {r["test_examples"]:,d} examples) or below it: '
               f'{_names(bad["majority"])}.')
  if bad['flat']:
    out.append(f'{len(bad["flat"])} of {n} finished runs have a training '
               f'loss that did not fall by {100 * LOSS_DROP:g}% from its first '
               f'logged value: {_names(bad["flat"])}.')
  if bad['same'] and not bad['majority']:
    out.append(f'All {n} finished runs have the same test score '
               f'({bad["same"][0]["test"]:.4f}).')
  if out:
    whole = (len(bad['majority']) == n or len(bad['flat']) == n
             or bool(bad['same']))
    out.insert(0, '**DEGENERATE SWEEP**: ' + (
        'no run learned the task; the comparisons below measure nothing.'
        if whole else 'some runs did not learn; differences involving them '
        'measure a failure, not the method.'))
  return out


def _fmt(spread: stats.Spread | None, scale: float = 100.0) -> str:
  """``81.2 ± 0.4 (95% CI ± 1.1, n=3)`` in points, or ``81.2 (n=1)``."""
  if spread is None:
    return '—'
  if spread.std is None:
    return f'{scale * spread.mean:.1f} (n=1)'
  return (f'{scale * spread.mean:.1f} ± {scale * spread.std:.1f} '
          f'(95% CI ± {scale * spread.half_width:.1f}, n={spread.n})')


def _label(c: Config) -> str:
  cfg = c.config
  if c.method in (None, 'lora') and cfg.get(RANK) is not None:
    parts = [f'rank {cfg.get(RANK)}', f'alpha {cfg.get(ALPHA):g}']
    extra = [f'{k}={v}' for k, v in c.overrides.items()
             if k not in (RANK, ALPHA)]
    return f'`{c.name}` (' + ', '.join(parts + extra) + ')'
  return f'`{c.name}`'


def compare(a: Config, b: Config, what: str) -> str:
  """One sentence: the paired test difference ``a - b``, or none found."""
  d = stats.paired(a.by_seed(), b.by_seed())
  if d.n < 2:
    return (f'{what}: {100 * d.mean:+.1f} points on one shared seed; '
            'one seed cannot tell a difference from noise.')
  interval = (f'{100 * d.mean:+.1f} ± {100 * d.half_width:.1f} points '
              f'(paired over {d.n} seeds, 95% CI)')
  if not d.measurable:
    return f'{what}: no measurable difference ({interval}).'
  se = max(filter(None, (a.test_se, b.test_se)), default=None)
  caveat = ''
  if se is not None and abs(d.mean) < se:
    caveat = (f'; smaller than the test set\'s standard error '
              f'({100 * se:.1f} points over {a.test_examples:,d} examples), '
              'so it may not carry over to another test sample')
  return f'{what}: {interval}, a measurable difference{caveat}.'


def _along(configs: Sequence[Config], vary: str, fixed: str) -> list[str]:
  """Pairs that differ only in ``vary`` (same ``fixed`` and other values)."""
  groups: dict[tuple[Any, ...], list[Config]] = {}
  for c in configs:
    if vary not in c.overrides or c.test is None:
      continue
    key = tuple(sorted((k, repr(v)) for k, v in c.overrides.items()
                       if k != vary))
    groups.setdefault(key, []).append(c)
  pairs, hits = 0, []
  n_seeds = set()
  for members in groups.values():
    for a, b in itertools.combinations(members, 2):
      d = stats.paired(a.by_seed(), b.by_seed())
      pairs += 1
      n_seeds.add(d.n)
      if d.measurable:
        hits.append((abs(d.mean), a, b, d))
  if not pairs:
    return []
  name = vary.split('.')[-1]
  if max(n_seeds) < 2:
    return [f'{name.capitalize()}: one seed a configuration, so no '
            f'difference between {name}s can be told from noise '
            '(run with --seeds=0,1,2).']
  head = (f'{name.capitalize()}: {len(hits)} of {pairs} pairs that differ only'
          f' in {name} differ measurably (paired 95% CI over seeds excludes 0'
          + (f'; not corrected for {pairs} comparisons)' if pairs > 1
             else ')'))
  if not hits:
    return [head + f'; no measurable difference between {name}s.']
  _, a, b, d = max(hits, key=lambda h: h[0])
  hi, lo = (a, b) if d.mean > 0 else (b, a)
  return [head + f'; the largest: {_label(hi)} above {_label(lo)} by '
          f'{100 * abs(d.mean):.1f} ± {100 * d.half_width:.1f} points.']


def findings(keys: Sequence[str], configs: Sequence[Config]) -> list[str]:
  """The verdicts, each with its evidence (see the module docstring)."""
  del keys
  done = aggregate.finished(configs)
  lora = [c for c in done if c.method in (None, 'lora')]
  top = aggregate.best(lora)
  if top is None:
    return ['No run has finished yet.']
  metric = top.metric
  out = [f'Best LoRA configuration by mean validation {metric}: '
         f'{_label(top)}: validation {_fmt(top.validation)}, test '
         f'{_fmt(top.test)}' + (f'; test standard error {100 * top.test_se:.1f}'
                                f' points over {top.test_examples:,d} examples'
                                if top.test_se is not None else '') + '.']
  for method, label in (('full', 'full fine-tuning'), ('head', 'head-only')):
    ref = aggregate.best([c for c in done if c.method == method])
    if ref is None:
      continue
    ratio = top.trainable_params / max(ref.trainable_params, 1)
    size = (f'{100 * ratio:.2f}% of its' if ratio < 1 else
            f'{ratio:,.0f}x its')
    out.append(f'{label.capitalize()}: test {_fmt(ref.test)} with '
               f'{ref.trainable_params:,d} trainable params; ' + compare(
                   top, ref, f'best LoRA minus {label} (LoRA has {size} '
                   'trainable params)'))
  out += _along(lora, RANK, ALPHA)
  out += _along(lora, ALPHA, RANK)
  return out
