"""EVA's statistics: incremental PCA of layer inputs, convergence, ranks.

EVA (``lorajax.methods.eva``) fits, for every group of target kernels that
see the same inputs, an incremental PCA of those inputs (token rows
``[n, in]``), batch after batch, until the leading components stop moving,
then hands the layers ranks by explained variance. This module is that
bookkeeping in NumPy (float64), following PEFT 0.21.2
(``peft/utils/incremental_pca.py`` and ``tuners/lora/eva.py``) step for step
with one difference: every SVD is exact (PEFT calls ``torch.svd_lowrank``,
a randomized SVD with ``q = 2k`` and 4 power iterations). Memory is bounded:
a fit keeps ``k`` components of ``in`` features, and each step decomposes
``k + n + 1`` rows.

Example:

  >>> rng = np.random.default_rng(0)
  >>> pca = IncrementalPca(2)
  >>> for _ in range(3):
  ...   _ = pca.partial_fit(rng.standard_normal((50, 4)) * [5., 2., 1., .1])
  >>> int(np.abs(pca.components[0]).argmax()), pca.ratio.round(1)
  (0, array([0.8, 0.1]))
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np


class IncrementalPca:
  """Ross et al.'s incremental PCA (scikit-learn's ``IncrementalPCA``).

  Attributes:
    k: components kept.
    components: ``[k, in]`` rows (unit norm, sign fixed so that each row's
      largest entry is positive), or None before the first fit.
    singular_values: ``[k]``.
    ratio: explained variance ratio of each component, ``[k]``.
    converged: ``[k]`` bools: cosine similarity of each component with the
      previous step's ``>= tau`` (all False until the second fit).
    n_seen: rows fitted.
  """

  def __init__(self, k: int, tau: float = 0.99):
    self.k, self.tau = int(k), float(tau)
    self.components = self.singular_values = self.ratio = None
    self.mean = self.var = None
    self.n_seen = 0
    self.converged = np.zeros(self.k, bool)

  def partial_fit(self, x: np.ndarray) -> bool:
    """Fits one batch of rows ``[n, in]``; False (and nothing done) when
    it has fewer than ``k`` rows, as PEFT skips such a batch."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    if n < self.k:
      return False
    if self.k > d:
      raise ValueError(f'{self.k} components of {d} input features')
    previous = self.components
    mean, var, total = self._mean_and_var(x)
    if previous is None:
      stacked = x - mean
    else:
      batch_mean = x.mean(0)
      correction = np.sqrt(self.n_seen / total * n) * (self.mean - batch_mean)
      stacked = np.vstack([self.singular_values[:, None] * previous,
                           x - batch_mean, correction[None]])
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    # Sign of each row: its entry of largest magnitude positive.
    big = np.abs(vt).argmax(1)
    vt = vt * np.sign(vt[np.arange(len(vt)), big])[:, None]
    self.components, self.singular_values = vt[:self.k], s[:self.k]
    self.ratio = s[:self.k] ** 2 / np.sum(var * total)
    self.mean, self.var, self.n_seen = mean, var, total
    if previous is not None:
      cos = np.sum(self.components * previous, 1) / np.maximum(
          np.linalg.norm(self.components, axis=1)
          * np.linalg.norm(previous, axis=1), 1e-8)
      self.converged = cos >= self.tau
    return True

  def _mean_and_var(self, x):
    """Running mean and (population) variance after ``x``, and the count."""
    n = len(x)
    total = self.n_seen + n
    new_sum = x.sum(0)
    centered = x - new_sum / n
    new_var = np.sum(centered ** 2, 0) - centered.sum(0) ** 2 / n
    if self.mean is None:
      return new_sum / total, new_var / total, total
    last_sum = self.mean * self.n_seen
    ratio = self.n_seen / n
    updated = (self.var * self.n_seen + new_var
               + ratio / total * (last_sum / ratio - new_sum) ** 2)
    return (last_sum + new_sum) / total, updated / total, total


def distribute(ratios: dict[str, np.ndarray], order: Sequence[str],
               budget: int, shared: dict[str, str]) -> dict[str, int]:
  """Ranks by explained variance: the ``budget`` largest ratios win.

  Args:
    ratios: per layer, the explained variance ratios it may use (its
      group's fit, cut to the layer's maximum rank).
    order: the layers, group leaders first (ties go to the earlier).
    budget: the sum of the layers' configured ranks.
    shared: follower -> leader for layers whose inputs equal a leader's;
      a leader then gets the larger rank of the two.

  Returns:
    ``{layer: rank}`` (0 for a layer that won nothing).
  """
  keys = [k for k in order for _ in ratios[k]]
  values = np.concatenate([ratios[k] for k in order])
  top = np.argsort(-values, kind='stable')[:budget]
  counts = collections.Counter(keys[i] for i in top)
  counts = {k: counts.get(k, 0) for k in order}
  for follower, leader in shared.items():
    if counts[leader] < counts[follower]:
      counts[leader], counts[follower] = counts[follower], counts[leader]
  return counts


__all__ = ['IncrementalPca', 'distribute']
