"""TIES, DARE and magnitude pruning, checked against PEFT's merge_utils."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils import merge_utils

import lorajax
from lorajax.serving import task_arithmetic
from lorajax.serving import weighted


def _deltas(n=3, shape=(1, 6, 5), seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize('density', [1.0, 0.5, 0.2])
@pytest.mark.parametrize('method', ['ties', 'magnitude_prune'])
def test_deterministic_methods_match_peft(method, density):
  deltas, weights = _deltas(), [0.7, -0.4, 1.3]
  got = task_arithmetic.merge_task_vectors(
      [jnp.asarray(d) for d in deltas], weights, method, density=density)
  want = getattr(merge_utils, method)(
      [torch.from_numpy(d[0]) for d in deltas], torch.tensor(weights),
      density)
  np.testing.assert_allclose(np.asarray(got)[0], want.numpy(), atol=1e-6)


def test_dare_keeps_a_density_fraction_rescaled():
  delta = jnp.ones((2, 100, 100))
  kept = task_arithmetic.dare(delta, 0.3, jax.random.key(0))
  frac = float(jnp.mean(kept != 0))
  assert abs(frac - 0.3) < 0.02
  np.testing.assert_allclose(np.unique(np.asarray(kept)), [0.0, 1 / 0.3],
                             rtol=1e-6)


@pytest.mark.parametrize('method', ['dare_linear', 'dare_ties'])
def test_dare_methods_at_density_one_equal_their_deterministic_kin(method):
  deltas = [jnp.asarray(d) for d in _deltas()]
  weights = [0.5, 1.0, -0.25]
  got = task_arithmetic.merge_task_vectors(deltas, weights, method,
                                           density=1.0, key=jax.random.key(1))
  kin = 'ties' if method == 'dare_ties' else 'magnitude_prune'
  want = task_arithmetic.merge_task_vectors(deltas, weights, kin, density=1.0)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_bad_arguments_raise():
  deltas = [jnp.ones((1, 2, 2))]
  with pytest.raises(ValueError, match='density must be in'):
    task_arithmetic.merge_task_vectors(deltas, [1.0], 'ties', density=0.0)
  with pytest.raises(ValueError, match='PRNG key'):
    task_arithmetic.merge_task_vectors(deltas, [1.0], 'dare_ties', density=0.5)
  with pytest.raises(ValueError, match="method='avg'"):
    task_arithmetic.merge_task_vectors(deltas, [1.0], 'avg', density=0.5)


@pytest.mark.parametrize('method', ['ties_svd', 'magnitude_prune_svd',
                                    'dare_ties_svd', 'dare_linear_svd'])
def test_weighted_adapter_factors_the_merged_update(method):


  params = {'w': jnp.zeros((6, 5))}
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2, alpha=4))])
  entries = []
  for seed in (1, 2):
    ad = lorajax.init(spec, params, jax.random.key(seed))
    ad = jax.tree.map(lambda v, s=seed: jax.random.normal(
        jax.random.key(s + 10), v.shape), ad)
    entries.append((ad, spec))
  got, gspec = weighted.weighted_adapter(entries, params, weights=[1.0, 0.5],
                                         method=method, rank=5, density=0.6,
                                         seed=3)
  deltas = [lorajax.merge(params, ad, spec)['w'][None] for ad, spec in entries]
  want = task_arithmetic.merge_task_vectors(
      deltas, [1.0, 0.5], method[:-4], density=0.6,
      key=jax.random.split(jax.random.key(3))[1])
  np.testing.assert_allclose(lorajax.merge(params, got, gspec)['w'], want[0],
                             atol=1e-5)
  low, lspec = weighted.weighted_adapter(entries, params, weights=[1.0, 0.5],
                                         method=method, rank=1, density=0.6,
                                         seed=3)
  u, s, vt = np.linalg.svd(np.asarray(want[0]))
  np.testing.assert_allclose(lorajax.merge(params, low, lspec)['w'],
                             s[0] * np.outer(u[:, 0], vt[0]), atol=1e-5)
