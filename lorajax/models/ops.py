"""Transformer ops whose backward pass keeps only what it needs.

Differentiated as written, a masked softmax attention keeps its scores, their
exponentials and the probabilities for the backward pass, and an exact GELU
keeps three arrays of the feed-forward width. On a MiniLM LoRA step (batch
32 × 128, float32) that is 1.46 GB of XLA temporaries; with these ops it is
0.93 GB (0.55 GB with ``lorajax.compiler_options()``). They compute the same
values with custom derivatives:

- ``attention``: keeps ``q``, ``k``, ``v`` and the max and sum of each
  softmax row, and recomputes the probabilities in the backward pass (one
  more ``q·kᵀ``, as flash attention does); or keeps the probabilities
  (``save_probs=True``). The backward is ``dS = P ∘ (dP − rowsum(dP ∘ P))``.
- ``gelu``: the exact (erf) GELU; keeps its input (the output of the dense
  before it, materialized anyway) and forms the derivative from it.

The backward functions tie their residuals to the incoming cotangent with an
optimization barrier, so that XLA does not hoist backward work into the
forward pass and keep its results alive in between.

Values and gradients agree with the plain formulas to float rounding (see
``tests/test_ops.py``).

Example:

  >>> q = k = v = jnp.ones((2, 8, 4, 16))          # [B, T, heads, head_dim]
  >>> mask = jnp.ones((2, 8), bool)                 # [B, T] real keys
  >>> attention(q, k, v, mask).shape
  (2, 8, 4, 16)
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from lorajax.runtime import cpu_attention

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))
_MASKED = float(jnp.finfo(jnp.float32).min)


def _dropped(p: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
  """Inverted dropout of ``p`` with a precomputed ``keep`` mask."""
  return p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)


def _attention_fwd(q, k, v, mask, keep, rate, save_probs):
  """Context ``[B, T, h, d]`` and the residuals of the backward pass."""
  root = np.float32(np.sqrt(q.shape[-1]))
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                 preferred_element_type=jnp.float32) / root
  s = jnp.where(mask[:, None, None, :], s, _MASKED)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  total = jnp.sum(e, axis=-1, keepdims=True)
  p = e / total
  ctx = jnp.einsum('bhqk,bkhd->bqhd', _dropped(p, keep, rate).astype(v.dtype),
                   v)
  # The row max and sum are [B, h, T, 1]: recomputing p from them repeats
  # the forward's arithmetic exactly.
  saved = p if save_probs else (m, total)
  return ctx, (q, k, v, saved, mask, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, mask, keep, rate, save_probs):
  return _attention_fwd(q, k, v, mask, keep, rate, save_probs)[0]


def _attention_bwd(rate, save_probs, res, g):
  res, g = lax.optimization_barrier((res, g))
  q, k, v, saved, mask, keep = res
  root = np.float32(np.sqrt(q.shape[-1]))
  key_mask = mask[:, None, None, :]
  if save_probs:
    p = saved
  else:
    # Formed as k·qᵀ and transposed back: written as the forward's q·kᵀ,
    # XLA would merge the two (CSE) and keep the scores alive, saving
    # nothing.
    st = jnp.einsum('bkhd,bqhd->bhkq', k, q,
                    preferred_element_type=jnp.float32)
    s = jnp.where(key_mask, jnp.swapaxes(st, -1, -2) / root, _MASKED)
    m, total = saved
    p = jnp.exp(s - m) / total
  dv = jnp.einsum('bhqk,bqhd->bkhd', _dropped(p, keep, rate).astype(g.dtype),
                  g)
  dp = _dropped(jnp.einsum('bqhd,bkhd->bhqk', g, v,
                           preferred_element_type=jnp.float32), keep, rate)
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) / root
  # Masked scores are constants (the where): no gradient flows to them.
  ds = jnp.where(key_mask, ds, 0.0).astype(q.dtype)
  dq = jnp.einsum('bhqk,bkhd->bqhd', ds, k)
  dk = jnp.einsum('bhqk,bqhd->bkhd', ds, q)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              dropout_rate: float = 0.0,
              dropout_rng: jax.Array | None = None,
              save_probs: bool = False) -> jax.Array:
  """Softmax attention over the keys that ``mask`` marks real.

  Computes ``softmax(q·kᵀ/√d, masked)·v`` with float32 scores and softmax;
  the probabilities are cast to ``v``'s dtype for the second product. A query
  whose keys are all masked attends uniformly (no NaN).

  Args:
    q: ``[B, T, heads, head_dim]`` queries.
    k: ``[B, S, heads, head_dim]`` keys.
    v: ``[B, S, heads, head_dim]`` values.
    mask: ``[B, S]``, true (nonzero) for real keys.
    dropout_rate: dropout on the probabilities (inverted: kept ones are
      scaled by ``1 / (1 - rate)``).
    dropout_rng: enables dropout; ``None`` means none.
    save_probs: keep the probabilities ``[B, heads, T, S]`` for the backward
      pass instead of recomputing them from ``q``, ``k`` and the saved row
      maxima and sums (``[B, heads, T, 1]`` each).

  Returns:
    ``[B, T, heads, head_dim]`` in ``v``'s dtype.
  """
  keep = None
  if dropout_rng is not None and dropout_rate > 0.0:
    b, t, h, _ = q.shape
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                (b, h, t, k.shape[1]))
  out_dtype = v.dtype
  if out_dtype != jnp.float32:
    # The products ask for float32 results; XLA's CPU runtime has no
    # bf16 x bf16 -> f32 dot, so lower-precision inputs are widened here.
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  if not save_probs and cpu_attention.available():
    out = cpu_attention.attention(q, k, v, mask, keep=keep,
                                  rate=dropout_rate)
    return out.astype(out_dtype)
  mask = mask.astype(bool)
  rate, save_probs = float(dropout_rate), bool(save_probs)
  per_sequence = 4 * q.shape[2] * q.shape[1] * k.shape[1]   # f32 scores
  chunk = batch_chunk(q.shape[0], per_sequence)
  if chunk == q.shape[0]:
    out = _attention(q, k, v, mask, keep, rate, save_probs)
  else:
    n = q.shape[0] // chunk

    def split(x):
      return None if x is None else x.reshape((n, chunk) + x.shape[1:])

    def one(xs):
      return _attention(*xs, rate, save_probs)

    _, out = lax.scan(lambda c, xs: (c, one(xs)), None,
                      tuple(split(x) for x in (q, k, v, mask, keep)),
                      unroll=True)
    out = out.reshape(q.shape[:1] + out.shape[2:])
  return out.astype(out_dtype)


# On the CPU, attention runs over groups of sequences whose float32 scores
# take at most this many bytes (0: never split the batch), in at most
# MAX_GROUPS groups (the groups are unrolled into the program).
DEFAULT_CPU_SCORE_BYTES = 4 << 20
CPU_SCORE_BYTES = DEFAULT_CPU_SCORE_BYTES
MAX_GROUPS = 16


def batch_chunk(batch: int, per_sequence: int) -> int:
  """How many sequences ``attention`` takes at a time.

  The whole batch, except on the CPU: there, the largest divisor of
  ``batch`` whose float32 scores (``per_sequence`` bytes each) fit
  ``CPU_SCORE_BYTES``, raised if need be to the smallest divisor that makes
  at most ``MAX_GROUPS`` groups.

  Why: the softmax makes several passes over the ``[B, heads, T, S]``
  scores and their gradient; a group whose scores stay in the CPU's cache
  makes them at cache speed rather than memory speed. Measured on a 2-core
  AMD EPYC, alone (2026-12-01, load 0.9,
  ``python -m experiments.bench.attention_groups``): one MiniLM layer's
  attention (32 × 128 tokens, 12 heads), forward and backward, 104.5 ms
  whole and 94.7-99.1 ms in groups of 1 to 8 sequences; the MiniLM LoRA q/v
  step, steps alternated, median 1,854 → 1,782 ms (24 steps each; two
  earlier runs: 1,838 → 1,751 and 1,898 → 1,775), XLA temporaries 545 →
  515 MB. The values and gradients are the same: each group computes its
  rows as the whole batch does. The groups are unrolled, so XLA's FLOP
  count still sees them all (a rolled loop was faster alone, 87-93 against
  124-135 ms, but not in the step, and XLA counts a loop body once).

  >>> batch_chunk(32, 12 * 128 * 128 * 4)   # on the CPU: 8 groups of 4
  4
  >>> batch_chunk(4, 9 * 4096 * 4096 * 4)   # one sequence a group
  1
  >>> batch_chunk(64, 12 * 512 * 512 * 4)   # at most 16 groups
  4
  """
  if jax.default_backend() != 'cpu' or CPU_SCORE_BYTES <= 0:
    return batch
  divisors = [c for c in range(1, batch + 1) if batch % c == 0]
  fit = max([c for c in divisors if c * per_sequence <= CPU_SCORE_BYTES],
            default=1)
  return min(c for c in divisors if c >= fit and batch // c <= MAX_GROUPS)


def _gelu(x32: jax.Array) -> jax.Array:
  return 0.5 * x32 * (1.0 + lax.erf(x32 * _SQRT_HALF))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU ``x·Φ(x) = x/2·(1 + erf(x/√2))``, in ``x``'s dtype.

  Computed in float32. The backward pass keeps only ``x`` and forms the
  derivative ``Φ(x) + x·φ(x)`` from it.
  """
  return _gelu(x.astype(jnp.float32)).astype(x.dtype)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  x, g = lax.optimization_barrier((x, g))
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + lax.erf(x32 * _SQRT_HALF))
  slope = cdf + x32 * jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
  return ((slope * g.astype(jnp.float32)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)
