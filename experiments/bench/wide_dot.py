"""Wide float32 products on the CPU, whole and in blocks of columns.

``python -m experiments.bench.wide_dot [--reps 5] [--json]``

Times, interleaved in one process, each product of ``SHAPES`` three ways:
XLA's plain ``lax.dot_general``; ``lorajax.matmul.blocked_dot_general``
(blocks of ``WIDE_BLOCK`` columns of the right operand, concatenated: what
``lorajax.lora`` runs where ``matmul.wide_blocks`` says so); and, to show
why the rows are never split, the left operand's rows in blocks of the same
size. Then the LM head of SmolLM2-135M at 8 × 256 tokens (tied ``h·Eᵀ`` over
49,152 words) with its cross entropy and the gradient of the hidden states,
plain and in blocks. Every figure is GFLOP/s of the product's own FLOPs
(median of ``--reps`` calls, each after a first call that compiles and maps
the buffers), with the process's user CPU seconds a call; the machine's
ceiling (a 2048² float32 product, ``gemm_ceiling.measure``) is measured in
the same run. Run it alone (``chrt -f 1``): both cores are timed.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments.bench import gemm_ceiling
from lorajax import matmul

_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls of each form.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON line per row.')

# (rows M, contraction K, columns N): SmolLM2's head at 8×256 tokens and at
# 2×256; a head of 16 k words; a 1B-class decoder's head (K=2048) cut to 32 k
# words; narrower products; a long sequence's MLP (many rows, 1,536 columns).
SHAPES = ((2048, 576, 49152), (512, 576, 49152), (2048, 576, 16384),
          (2048, 2048, 32768), (2048, 576, 8192), (2048, 576, 4096),
          (2048, 576, 2048), (8192, 576, 1536))
NT = (((1,), (1,)), ((), ()))   # h·Eᵀ: the right operand stored [N, K]


def _rows_in_blocks(lhs, rhs):
  block = matmul.WIDE_BLOCK
  parts = [lax.dot_general(lhs[i:i + block], rhs, NT)
           for i in range(0, lhs.shape[0], block)]
  return jnp.concatenate(parts, 0)


FORMS: dict[str, Callable[..., jax.Array]] = {
    'whole': lambda a, b: lax.dot_general(a, b, NT),
    'column blocks': lambda a, b: matmul.blocked_dot_general(a, b, NT),
    'row blocks': _rows_in_blocks,
}


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(
      compiler_options=lorajax.compiler_options('cpu'))


def _time(calls: dict[str, Any], args, reps: int) -> dict[str, dict]:
  """Median seconds and user CPU seconds of each compiled call,
  alternated call by call."""
  for c in calls.values():
    jax.block_until_ready(c(*args))
  wall = {n: [] for n in calls}
  user = {n: [] for n in calls}
  for _ in range(reps):
    for name, c in calls.items():
      u0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
      t0 = time.perf_counter()
      jax.block_until_ready(c(*args))
      wall[name].append(time.perf_counter() - t0)
      user[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_utime
                        - u0)
  return {n: {'s': statistics.median(wall[n]),
              'user_s': statistics.median(user[n])} for n in calls}


def _head_loss(product):
  def loss(h, e, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        product(h, e), y).mean()
  return jax.grad(loss)


def main(argv):
  del argv
  reps = _REPS.value
  rng = np.random.default_rng(0)
  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05)
  rows = []
  for m, k, n in SHAPES:
    args = (normal(m, k), normal(n, k))
    calls = {name: _compile(f, *args) for name, f in FORMS.items()}
    gflop = 2 * m * k * n / 1e9
    t = _time(calls, args, reps)
    rows.append({'product': f'[{m}, {k}]·[{n}, {k}]ᵀ', 'gflop': gflop,
                 **{name: {'gflops': gflop / r['s'], **r}
                    for name, r in t.items()}})
  h, e = normal(2048, 576), normal(49152, 576)
  y = jnp.asarray(rng.integers(0, 49152, 2048))
  head = {name: _compile(_head_loss(FORMS[name]), h, e, y)
          for name in ('whole', 'column blocks')}
  grads = [np.asarray(c(h, e, y)) for c in head.values()]
  t = _time(head, (h, e, y), reps)
  head_row = {'product': 'SmolLM2 head + cross entropy, d loss / d h',
              'gflop': 4 * 2048 * 576 * 49152 / 1e9,
              'max_abs_diff': float(np.abs(grads[0] - grads[1]).max()),
              **{name: {'gflops': 4 * 2048 * 576 * 49152 / 1e9 / r['s'], **r}
                 for name, r in t.items()}}
  ceiling = gemm_ceiling.measure('float32', reps=reps)['gflops_median']
  load = float(open('/proc/loadavg').read().split()[0])
  if _JSON.value:
    for r in rows + [head_row]:
      print(json.dumps(dict(r, ceiling_gflops=ceiling, load_avg_1m=load)))
    return
  print(f'float32 GEMM ceiling (2048²): {ceiling:.1f} GFLOP/s; load {load}; '
        f'blocks of {matmul.WIDE_BLOCK} columns')
  print('| product | whole | column blocks | row blocks |')
  print('|---|---:|---:|---:|')
  for r in rows:
    print(f'| {r["product"]} | ' + ' | '.join(
        f'{r[f]["gflops"]:.1f} GFLOP/s ({r[f]["user_s"]:.2f} s CPU)'
        for f in FORMS) + ' |')
  print(f'| {head_row["product"]} | ' + ' | '.join(
      f'{head_row[f]["s"] * 1e3:,.0f} ms ({head_row[f]["user_s"]:.2f} s CPU)'
      for f in ('whole', 'column blocks')) + ' | |')
  print(f'largest gradient difference: {head_row["max_abs_diff"]:.2e}')


if __name__ == '__main__':
  app.run(main)
