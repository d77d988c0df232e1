"""The lorajax side of ``python -m experiments.bench peft``: one process.

Serves ``setup`` (build and compile the LoRA train step of a row from the
files the driver wrote; ``experiments.bench.lorajax_setups``), ``step`` (run
one step, report its wall time, measured around the step and
``block_until_ready``) and ``gemm`` (XLA's matmul throughput,
``experiments.bench.gemm_ceiling``). See
``experiments.bench.worker_protocol``.

Run by ``experiments.bench.bench_peft``; by hand:

  echo '{"cmd": "stats"}' | python -m experiments.bench.lorajax_worker
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from experiments.bench import bench_core
from experiments.bench import gemm_ceiling
from experiments.bench import lorajax_setups
from experiments.bench import worker_protocol
from lorajax.runtime import host_memory


class Runner:
  """Holds the compiled step, its state and the batch between requests."""

  def __init__(self, host_pages_kept: bool = False):
    self.host_pages_kept = host_pages_kept
    self.setup = None
    self.compiled = None
    self.state = None
    self.batch = None
    self.per_call = 1

  def handle_setup(self, req: dict[str, Any]) -> dict[str, Any]:
    """Builds and compiles the step; runs nothing."""
    t0 = time.perf_counter()
    if req['model'] not in lorajax_setups.BUILDERS:
      raise ValueError(f'model={req["model"]!r}; expected one of '
                       f'{sorted(lorajax_setups.BUILDERS)}')
    self.setup, self.batch = lorajax_setups.BUILDERS[req['model']](req)
    one_batch = self.batch
    self.state = self.setup.state
    compiled = self.setup.step.lower(self.state, self.setup.frozen,
                                     self.batch).compile()
    flops = bench_core.compiled_flops(compiled)
    self.per_call = int(req.get('steps_per_call') or 1)
    if self.per_call > 1:   # config.steps_per_call: k steps in one call
      self.batch = jax.tree.map(
          lambda x: jax.numpy.stack([x] * self.per_call), self.batch)
      compiled = bench_core.several_steps(
          self.setup.step, self.per_call, xla_options=req['jit'] == 'xla',
          dtype=req['dtype']).lower(self.state, self.setup.frozen,
                                    self.batch).compile()
    self.compiled = compiled
    twin = self.setup.flops_twin
    if twin is not None:   # loops: count the step written without them
      flops = bench_core.compiled_flops(twin.step.lower(
          twin.state, twin.frozen, one_batch).compile())
      self.setup = dataclasses.replace(self.setup, flops_twin=None)
    reference = flops
    twin = self.setup.reference_twin
    if twin is not None:   # the work PEFT's step does, counted by XLA
      reference = bench_core.compiled_flops(twin.step.lower(
          twin.state, twin.frozen, one_batch).compile())
      self.setup = dataclasses.replace(self.setup, reference_twin=None)
    return {'trainable_params': self.setup.trainable_params,
            'flops_per_step': flops,
            'reference_flops_per_step': reference,
            'setup_s': round(time.perf_counter() - t0, 2),
            'versions': {'jax': jax.__version__},
            'host_pages_kept': self.host_pages_kept}

  def handle_step(self, req: dict[str, Any]) -> dict[str, Any]:
    """One call: one train step, or ``steps_per_call`` of them (then
    ``step_s`` is the call's wall time over the steps, and ``losses`` every
    step's loss); the wall time includes waiting for the result."""
    del req
    t0 = time.perf_counter()
    self.state, loss = self.compiled(self.state, self.setup.frozen,
                                     self.batch)
    loss = jax.block_until_ready(loss)
    step_s = (time.perf_counter() - t0) / self.per_call
    losses = [float(x) for x in jax.numpy.ravel(loss)]
    return {'step_s': step_s, 'loss': losses[-1], 'losses': losses}


def handle_gemm(req: dict[str, Any]) -> dict[str, Any]:
  """``gemm_ceiling.measure`` of ``req['dtype']``, ``size``, ``reps``."""
  return gemm_ceiling.measure(req['dtype'], size=req['size'],
                              reps=req['reps'])


def main() -> None:
  # Whether bench_peft started this worker with lorajax's block cache
  # (``host_pages``), as lorajax's commands run.
  runner = Runner(host_pages_kept=host_memory.active())
  worker_protocol.serve({'setup': runner.handle_setup,
                         'step': runner.handle_step, 'gemm': handle_gemm})


if __name__ == '__main__':
  main()
