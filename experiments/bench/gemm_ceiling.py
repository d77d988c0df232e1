"""XLA's own matrix-multiply throughput on this machine: the step's ceiling.

A LoRA step is mostly matrix multiplies; the fastest a step can run on a
machine is its FLOPs at the throughput XLA reaches on one large, square,
jitted ``x @ y`` (in bfloat16, ``lorajax.matmul``'s float32-accumulated form
with ``lorajax.compiler_options(dtype='bfloat16')``, the form lorajax's
bfloat16 steps use and the only one XLA runs on the CPU's bfloat16 units;
the plain ``x @ y`` in bfloat16 runs as a float32 product, about 4x slower
on an AMX machine). ``measure`` times that GEMM (median of repetitions, after
a compile and a warm-up call) and ``utilization`` relates a step to it:

  utilization = XLA FLOPs of the step / step seconds / ceiling FLOP/s

so 1.0 means the step ran as fast as a plain GEMM of the same FLOPs, and
time lost to attention, elementwise work, copies or page faults shows as
the gap. Imported by ``experiments.bench.lorajax_worker`` (its ``gemm``
command), so the ceiling is measured by a JAX process of the same run.

Example:

  >>> gflops = measure('float32', size=256, reps=3)  # doctest: +SKIP
  >>> utilization(flops=1e9, step_s=0.01, ceiling_gflops=200.0)
  0.5
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lorajax
from lorajax import matmul as matmul_lib

DTYPES = ('float32', 'bfloat16')


def gemm_flops(size: int) -> float:
  """FLOPs of one ``[size, size] @ [size, size]`` (a multiply-add is 2)."""
  return 2.0 * size ** 3


def measure(dtype: str, *, size: int = 2048, reps: int = 10
            ) -> dict[str, Any]:
  """Throughput of a jitted square matmul in ``dtype``.

  Args:
    dtype: ``'float32'`` or ``'bfloat16'`` (operands and result).
    size: the matrices' side.
    reps: timed calls; the median is reported.

  Returns:
    ``{'dtype', 'size', 'reps', 'gflops_median', 'gflops_max'}``, GFLOP/s.
  """
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; expected one of {DTYPES}')
  if size < 1 or reps < 1:
    raise ValueError(f'size={size}, reps={reps}; both must be positive')
  rng = np.random.default_rng(0)
  x, y = (jnp.asarray(rng.standard_normal((size, size), np.float32),
                      jnp.dtype(dtype)) for _ in range(2))
  if dtype == 'bfloat16':
    def product(a, b):
      return matmul_lib.dot_general(a, b, (((1,), (0,)), ((), ())))
  else:
    product = jnp.matmul
  matmul = jax.jit(product, compiler_options=lorajax.compiler_options(
      dtype=dtype)).lower(x, y).compile()
  jax.block_until_ready(matmul(x, y))  # first call: allocations, page-ins
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(x, y))
    times.append(time.perf_counter() - t0)
  flops = gemm_flops(size)
  return {'dtype': dtype, 'size': size, 'reps': reps,
          'gflops_median': round(flops / statistics.median(times) / 1e9, 2),
          'gflops_max': round(flops / min(times) / 1e9, 2)}


def utilization(*, flops: float, step_s: float,
                ceiling_gflops: float) -> float:
  """The fraction of the GEMM ceiling a step of ``flops`` in ``step_s``
  seconds reaches."""
  if step_s <= 0 or ceiling_gflops <= 0:
    raise ValueError(f'step_s={step_s}, ceiling_gflops={ceiling_gflops}; '
                     'both must be positive')
  return round(flops / step_s / (ceiling_gflops * 1e9), 3)
