"""The statistics a sweep report states: spread over seeds, paired differences.

A configuration run with ``n`` seeds has a mean, a sample standard deviation
and a 95% interval of the mean from Student's t with ``n - 1`` degrees of
freedom (``mean ± t(0.975, n-1)·std/√n``). Two configurations run with the
same seeds are compared *paired*: the seed fixes the head's initialisation,
the adapters' and the data order, so the per-seed differences cancel what
the two share, and their own t interval says whether the difference is
larger than the seed-to-seed noise. The test set's own resolution is the
binomial standard error of an accuracy, ``√(p(1-p)/N)`` over ``N`` test
examples: a difference below it may not carry over to another sample of
the same size, however stable it is over seeds.

Example:

  >>> s = describe([0.80, 0.82, 0.81])
  >>> s.n, round(s.mean, 3), round(s.std, 3), round(s.half_width, 4)
  (3, 0.81, 0.01, 0.0248)
  >>> d = paired({0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.78, 1: 0.79, 2: 0.79})
  >>> d.n, round(d.mean, 3), d.measurable
  (3, 0.023, True)
  >>> round(binomial_se(0.8, 1000), 4)
  0.0126
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

from scipy import stats as scipy_stats

LEVEL = 0.95


class Spread(NamedTuple):
  """Mean of ``n`` values, their sample std and the 95% t interval's half.

  ``std`` and ``half_width`` are None for one value (no spread to see).
  """
  n: int
  mean: float
  std: float | None
  half_width: float | None

  @property
  def low(self) -> float | None:
    return None if self.half_width is None else self.mean - self.half_width

  @property
  def high(self) -> float | None:
    return None if self.half_width is None else self.mean + self.half_width


class Difference(NamedTuple):
  """A paired difference ``a - b`` over the seeds both have.

  Attributes:
    n: the number of shared seeds.
    mean: the mean of the per-seed differences.
    half_width: its 95% t interval's half width (None for fewer than 2).
    measurable: the interval excludes zero (False for fewer than 2 seeds).
  """
  n: int
  mean: float
  half_width: float | None
  measurable: bool


def t_quantile(n: int, level: float = LEVEL) -> float:
  """The two-sided ``level`` quantile of Student's t with ``n - 1`` dof."""
  if n < 2:
    raise ValueError(f'a t interval needs at least 2 values, got n={n}')
  return float(scipy_stats.t.ppf(0.5 + level / 2, n - 1))


def describe(values: Sequence[float]) -> Spread:
  """``Spread`` of ``values``.

  Raises:
    ValueError: ``values`` is empty.
  """
  values = [float(v) for v in values]
  n = len(values)
  if n == 0:
    raise ValueError('describe() of no values')
  mean = math.fsum(values) / n
  if n == 1:
    return Spread(1, mean, None, None)
  std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
  return Spread(n, mean, std, t_quantile(n) * std / math.sqrt(n))


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Difference:
  """The paired difference ``a - b`` over the seeds (keys) both have.

  Raises:
    ValueError: the two share no seed.
  """
  seeds = sorted(set(a) & set(b))
  if not seeds:
    raise ValueError(f'no shared seed: {sorted(a)} and {sorted(b)}')
  spread = describe([a[s] - b[s] for s in seeds])
  if spread.half_width is None:
    return Difference(spread.n, spread.mean, None, False)
  # A zero spread with a nonzero mean is a difference every seed agrees on.
  measurable = abs(spread.mean) > spread.half_width
  return Difference(spread.n, spread.mean, spread.half_width, measurable)


def binomial_se(p: float, n: int) -> float:
  """The standard error ``√(p(1-p)/n)`` of an accuracy ``p`` over ``n``."""
  if n <= 0:
    raise ValueError(f'binomial_se over n={n} examples')
  return math.sqrt(max(p * (1 - p), 0.0) / n)
