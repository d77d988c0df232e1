"""lorajax against PyTorch + transformers + PEFT on the same LoRA step.

``python -m experiments.bench peft [--sizes ...] [--json]``. Rows
(``experiments.bench.bench_inputs``): lorajax's shipped BERT at MiniLM and
BERT-base shapes (``minilm``, ``base``), a user's own plain Flax BERT of
MiniLM shape (``flaxbert``: LoRA through ``lorajax.lora`` alone, jitted
with ``lorajax.compiler_options()`` and with a plain ``jax.jit``), and a
SmolLM2-135M-shaped Llama causal LM read through ``lorajax.models.load``
(``smollm2``: 8 × 256 tokens; ``smollm2_2k``: 1 × 2048 tokens with lorajax
``remat`` against PEFT with activation checkpointing), each with LoRA on
query/value or on every block Linear, in float32 or bfloat16 compute
(PEFT under ``torch.autocast('cpu', torch.bfloat16)``). For every row the
driver

1. writes the weights (random, std 0.02), PEFT-layout LoRA ``A`` factors
   (``B`` starts at zero) and the batch, once per shape, so both frameworks
   train the same model on the same data from the same start;
2. starts one long-lived worker process per contestant
   (``experiments.bench.lorajax_worker``, ``experiments.bench.peft_worker``;
   with ``torch_compile``, a second PEFT worker running
   ``torch.compile(model)``, dropped with its reason where it fails);
3. runs warm-up steps, then alternates timed steps between the workers (the
   order flips every repetition), so they never run at the same time and
   load drifts hit all alike;
4. asks each worker for its peak RSS (``VmHWM`` of its own process).

The GEMM ceiling (``experiments.bench.gemm_ceiling``: a jitted square
matmul in a JAX worker) is measured at the start and at the end of the run;
the higher of the two medians is the ceiling. Each row's utilization is
a contestant's XLA FLOP count of the step ÷ its median step time ÷ the
ceiling of the row's dtype. PEFT's figure counts the work transformers does:
lorajax's step with the same FLOPs (on the shipped BERT, the last layer for
every token rather than for ``[CLS]`` alone, ``cls_readout=False``).

Each worker times its own step (around the step, waiting for the result).
The step is AdamW (lr 1e-4, weight decay 0.01), dropout off, LoRA rank 8,
alpha 16 (classifier trained on the BERT rows). Both frameworks see the same
losses step after step (``max_loss_diff``; bf16 compute differs by
rounding, so there it is a closeness figure, not equality).

Timings need a quiet machine: under load, PyTorch's OpenMP barriers lose far
more than XLA's thread pool (at load average 4 on 2 cores PEFT's MiniLM step
went from 1.2 s to 5.3 s, lorajax's from 0.86 s to 1.5 s). Each row records
the load average; compare runs near 1 (the benchmark itself).

Earlier result on the 2-core AMD EPYC dev machine (jax 0.10.2, torch
2.13.0+cpu, transformers 5.23.0, peft 0.21.2; 10 repetitions; load average
1.4-1.7), shipped BERT rows only:

  | variant   | lorajax ms | PEFT ms | step ratio | lorajax MB | PEFT MB | RSS ratio |
  |-----------|-----------:|--------:|-----------:|-----------:|--------:|----------:|
  | minilm/qv |        862 |    1217 |      0.708 |       1018 |    1305 |     0.780 |
  | minilm/all|       1128 |    1518 |      0.743 |       1429 |    1895 |     0.754 |
  | base/qv   |       1288 |    2090 |      0.616 |       1362 |    1607 |     0.848 |
  | base/all  |       1543 |    2462 |      0.627 |       1825 |    2140 |     0.853 |

An outsider's re-run on a quiet 2-core EPYC (load 1.1, issue #18) measured
minilm/qv at 1,690 vs 1,548 ms (1.09x) and 990 vs 1,370 MB (0.72x): the step
varies by 2x between machines (XLA CPU allocates its 0.55 GB of temporaries
afresh each step, so every step pays its page faults), hence the ceiling
and utilization columns, which say how far a step is from this machine's
matmul speed.

On the 2-core Intel Xeon of 2026-11-30 (quiet, ``chrt -f 1``), every row ran
slower than PEFT. The float32 time ratios were 1.36-1.64 for minilm/qv,
1.42 for smollm2/qv, and 4.23 for smollm2_2k with remat against
checkpointing. PyTorch's GEMMs reached 0.63-0.83 of XLA's GEMM ceiling;
lorajax's steps reached 0.20-0.56. The rows, commands and profiles are in
``experiments/results/bench_peft/``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
from typing import Any, Callable

import numpy as np

from experiments.bench import bench_inputs
from experiments.bench import worker_protocol
from lorajax.runtime import host_memory

RANK, ALPHA = 8, 16
# Must match ``experiments.bench.bench_core.adamw``.
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01
LORAJAX_WORKER = 'experiments.bench.lorajax_worker'
PEFT_WORKER = 'experiments.bench.peft_worker'
REFERENCE = 'peft'


@dataclasses.dataclass(frozen=True)
class Contestant:
  """One worker of a row: its label, module and extra request fields."""
  label: str
  module: str
  fields: dict[str, Any]
  optional: bool = False  # dropped with its reason if it fails
  env: dict[str, str] | None = None  # None: the driver's environment


def _reason(e: Exception, limit: int = 300) -> str:
  """The first ``limit`` characters of a worker's error (compiler errors
  run to pages)."""
  text = ' '.join(str(e).split())
  return text if len(text) <= limit else text[:limit] + '…'


HOST_PAGES = ('kept', 'default', 'both')


def _glibc_default_env() -> dict[str, str]:
  """The driver's environment without lorajax's block cache (what a
  process started by hand without it runs with)."""
  return host_memory.without()


def contestants(row: bench_inputs.Row, *, torch_compile: bool,
                host_pages: str = 'default',
                steps_per_call: int = 1) -> list[Contestant]:
  """lorajax and PEFT; the plain-jit lorajax on ``flaxbert`` rows; PEFT
  with ``torch.compile`` when asked.

  ``steps_per_call`` > 1 adds a lorajax worker that runs that many steps in
  one compiled call (``config.steps_per_call``), reporting each call's
  time over its steps; the one-step lorajax stays, measured in the same run.

  ``host_pages``: ``'default'`` starts the lorajax workers with glibc's
  defaults (as lorajax's commands run unless told otherwise), ``'kept'``
  with ``LORAJAX_HOST_PAGES=kept`` (``lorajax.runtime.host_memory``: the
  preloaded block cache keeps the step's buffers mapped), and
  ``'both'`` adds a lorajax worker with glibc's defaults and a PEFT worker
  with the block cache, so each side's gain from it is measured in the
  same run. PEFT runs with glibc's defaults otherwise.
  """
  if host_pages not in HOST_PAGES:
    raise ValueError(f'host_pages={host_pages!r}; expected one of '
                     f'{HOST_PAGES}')
  default = _glibc_default_env()
  kept = host_memory.environ(default) if host_pages != 'default' else None
  lorajax_env = default if host_pages == 'default' else kept
  out = [Contestant('lorajax', LORAJAX_WORKER, {'jit': 'xla'},
                    env=lorajax_env)]
  if steps_per_call > 1:
    out.append(Contestant(per_call_label(steps_per_call), LORAJAX_WORKER,
                          {'jit': 'xla', 'steps_per_call': steps_per_call},
                          env=lorajax_env))
  if row.model == 'flaxbert':
    out.append(Contestant('lorajax plain jit', LORAJAX_WORKER,
                          {'jit': 'plain'}, env=lorajax_env))
  if host_pages == 'both':
    out.append(Contestant('lorajax glibc default', LORAJAX_WORKER,
                          {'jit': 'xla'}, env=default))
  out.append(Contestant(REFERENCE, PEFT_WORKER, {'torch_compile': False},
                        env=default))
  if host_pages == 'both':
    out.append(Contestant('peft kept pages', PEFT_WORKER,
                          {'torch_compile': False}, env=kept))
  if torch_compile:
    out.append(Contestant('peft+compile', PEFT_WORKER,
                          {'torch_compile': True}, optional=True,
                          env=default))
  return out


def per_call_label(k: int) -> str:
  """The label of the lorajax worker running ``k`` steps a call."""
  return f'lorajax {k} steps/call'


def measure_ceilings(dtypes, *, size: int, reps: int,
                     log: Callable[[str], None],
                     host_pages: str = 'default') -> dict[str, Any]:
  """``gemm_ceiling.measure`` of each dtype, in a fresh JAX worker (with
  lorajax's block cache unless ``host_pages`` is ``'default'``: the
  ceiling of the conditions lorajax's step runs in)."""
  env = _glibc_default_env()
  if host_pages != 'default':
    env = host_memory.environ(env)
  with worker_protocol.Worker([sys.executable, '-m', LORAJAX_WORKER],
                              'gemm', env=env) as w:
    out = {d: w.call('gemm', dtype=d, size=size, reps=reps) for d in dtypes}
  for d, m in out.items():
    log(f'GEMM ceiling {d} ({size}x{size} matmul, median of {reps}): '
        f'{m["gflops_median"]:.1f} GFLOP/s')
  return out


def _summary(reply: dict[str, Any], times: list[float], losses: list[float],
             tokens: int) -> dict[str, Any]:
  median = statistics.median(times)
  row = {
      'step_ms_median': round(median * 1e3, 1),
      'step_ms_min': round(min(times) * 1e3, 1),
      'step_ms_max': round(max(times) * 1e3, 1),
      'tokens_per_s': round(tokens / median, 1),
      'losses': [round(x, 6) for x in losses],
  }
  row.update(reply)
  return row


def _compare(results: dict[str, dict[str, Any]], flops: float,
             ceiling_gflops: float | None,
             reference_flops: float | None = None) -> None:
  """Adds utilization and ratios against PEFT to every result.

  A lorajax contestant's utilization counts its own step's FLOPs (its
  ``flops_per_step``, else ``flops``); PEFT's counts ``reference_flops``,
  the work of the same step as transformers does it (``flops`` when None).
  """
  ref = results[REFERENCE]
  for label, m in results.items():
    if ceiling_gflops:
      work = m.get('flops_per_step', flops)
      if label.startswith(REFERENCE):
        work = reference_flops or flops
      m['utilization'] = round(
          work / (m['step_ms_median'] / 1e3) / (ceiling_gflops * 1e9), 3)
    if label == REFERENCE:
      continue
    m['step_ratio'] = round(m['step_ms_median'] / ref['step_ms_median'], 3)
    m['rss_ratio'] = round(m['peak_rss_mb'] / ref['peak_rss_mb'], 3)
    n = min(len(m['losses']), len(ref['losses']))   # the same steps
    m['max_loss_diff'] = float(np.max(np.abs(
        np.subtract(m['losses'][:n], ref['losses'][:n]))))
  if 'peft+compile' in results:
    compiled = results['peft+compile']['step_ms_median']
    results['lorajax']['step_ratio_compiled'] = round(
        results['lorajax']['step_ms_median'] / compiled, 3)


def run_row(row: bench_inputs.Row, *, reps: int, warmup: int, workdir: str,
            torch_compile: bool = False, host_pages: str = 'default',
            steps_per_call: int = 1,
            ceilings: dict[str, Any] | None = None,
            torch_threads: int | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Measures one row with every contestant; returns its result dict.

  Args:
    row: what to measure.
    reps: timed steps per contestant.
    warmup: untimed steps first (torch.compile compiles in the first).
    workdir: where the weights and batches are written (once per shape).
    torch_compile: add PEFT with ``torch.compile``.
    host_pages, steps_per_call: see ``contestants``.
    ceilings: ``{dtype: gemm_ceiling.measure(...)}`` for utilization;
      None leaves it out.
    torch_threads: PyTorch's threads; None is the machine's core count.
    log: progress lines.
  """
  request = dict(dataclasses.asdict(row.shape), model=row.model,
                 targets=row.targets, dtype=row.dtype, rank=RANK, alpha=ALPHA,
                 learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                 torch_threads=torch_threads,
                 **bench_inputs.write_inputs(row, workdir, RANK))
  workers, setup, skipped = {}, {}, {}
  optional = set()
  try:
    for c in contestants(row, torch_compile=torch_compile,
                         host_pages=host_pages,
                         steps_per_call=steps_per_call):
      if c.optional:
        optional.add(c.label)
      # One after the other: setups never overlap.
      workers[c.label] = worker_protocol.Worker(
          [sys.executable, '-m', c.module], f'{c.label} ({row.name})',
          env=c.env)
      try:
        setup[c.label] = workers[c.label].call('setup', **(request | c.fields))
      except worker_protocol.WorkerError as e:
        if not c.optional:
          raise
        skipped[c.label] = _reason(e)
        workers.pop(c.label).close()
        log(f'{row.name}: {c.label} skipped: {e}')
        continue
      log(f'{row.name}: {c.label} set up in {setup[c.label]["setup_s"]:.1f} '
          f's, {setup[c.label]["trainable_params"]:,d} trainable params')
    times = {label: [] for label in workers}
    losses = {label: [] for label in workers}
    for r in range(warmup + reps):
      labels = list(workers)
      for label in labels if r % 2 == 0 else labels[::-1]:
        try:
          reply = workers[label].call('step')
        except worker_protocol.WorkerError as e:
          if label not in optional:
            raise
          skipped[label] = _reason(e)
          workers.pop(label).close()
          del times[label], losses[label]
          log(f'{row.name}: {label} skipped: {e}')
          continue
        losses[label].extend(reply.get('losses', [reply['loss']]))
        if r >= warmup:
          times[label].append(reply['step_s'])
      if r >= warmup:
        log(f'{row.name} repetition {r - warmup + 1}/{reps}: ' + ', '.join(
            f'{label} {times[label][-1] * 1e3:.0f} ms' for label in workers))
    stats = {label: w.call('stats') for label, w in workers.items()}
  finally:
    for w in workers.values():
      w.close()
  results = {label: _summary(setup[label] | stats[label], times[label],
                             losses[label], row.tokens)
             for label in workers}
  flops = setup['lorajax']['flops_per_step']
  reference_flops = setup['lorajax'].get('reference_flops_per_step', flops)
  ceiling = ceilings[row.dtype]['gflops_median'] if ceilings else None
  _compare(results, flops, ceiling, reference_flops)
  shape = row.shape
  return {'row': row.name, 'size': row.size, 'model': row.model,
          'targets': row.targets, 'dtype': row.dtype,
          'batch_size': shape.batch_size, 'seq_len': shape.seq_len,
          'remat': row.remat, 'reps': reps,
          'flops_per_step': flops, 'reference_flops_per_step': reference_flops,
          'ceiling_gflops': ceiling,
          'load_avg_1m': round(os.getloadavg()[0], 2),
          'results': results, 'skipped': skipped}


def run(rows: list[bench_inputs.Row], *, reps: int = 10, warmup: int = 2,
        torch_compile: bool = True, gemm_size: int = 2048,
        gemm_reps: int = 10, torch_threads: int | None = None,
        host_pages: str = 'default', steps_per_call: int = 1,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Measures the GEMM ceiling, every row, and the ceiling again.

  ``reps``, ``warmup``, ``torch_compile``, ``torch_threads``,
  ``host_pages`` and ``steps_per_call`` are ``run_row``'s; ``gemm_size`` and ``gemm_reps`` the ceiling's matmul.

  Returns:
    ``{'ceilings': {dtype: {'gflops_median', 'start', 'end', ...}},
    'rows': [row result, ...]}``; a row's ceiling is its dtype's.
  """
  dtypes = sorted({r.dtype for r in rows})
  start = measure_ceilings(dtypes, size=gemm_size, reps=gemm_reps, log=log,
                           host_pages=host_pages)
  out = []
  with tempfile.TemporaryDirectory(prefix='lorajax_bench_peft_') as workdir:
    for row in rows:
      out.append(run_row(row, reps=reps, warmup=warmup, workdir=workdir,
                         torch_compile=torch_compile, host_pages=host_pages,
                         steps_per_call=steps_per_call,
                         torch_threads=torch_threads, log=log))
  end = measure_ceilings(dtypes, size=gemm_size, reps=gemm_reps, log=log,
                         host_pages=host_pages)
  ceilings = {}
  for d in dtypes:
    best = max(start[d]['gflops_median'], end[d]['gflops_median'])
    ceilings[d] = {'gflops_median': best, 'size': gemm_size,
                   'reps': gemm_reps, 'start': start[d]['gflops_median'],
                   'end': end[d]['gflops_median']}
  for r in out:  # Utilization against the higher of the two ceilings.
    r['ceiling_gflops'] = ceilings[r['dtype']]['gflops_median']
    _compare(r['results'], r['flops_per_step'], r['ceiling_gflops'],
             r.get('reference_flops_per_step'))
  return {'ceilings': ceilings, 'rows': out}


def table(result: dict[str, Any]) -> str:
  """A markdown table: one line per row and contestant, with ratios."""
  lines = ['| row | batch | framework | trainable | step ms median (min–max) '
           '| tokens/s | peak RSS MB | XLA GFLOP/step | GEMM util. | '
           '×PEFT step | ×PEFT RSS | max abs Δloss vs PEFT |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in result['rows']:
    batch = f"{r['batch_size']}×{r['seq_len']}" + (' remat' if r['remat']
                                                   else '')
    for label, m in r['results'].items():
      ratios = ('', '', '')
      if label != REFERENCE:
        ratios = (f"{m['step_ratio']:.3f}", f"{m['rss_ratio']:.3f}",
                  f"{m['max_loss_diff']:.1e}")
      gflop = (f"{r['flops_per_step'] / 1e9:.1f}" if label == 'lorajax'
               else '')
      util = f"{m['utilization']:.0%}" if 'utilization' in m else ''
      lines.append(
          f"| {r['row']} | {batch} | {label} | {m['trainable_params']:,d} | "
          f"{m['step_ms_median']:.0f} ({m['step_ms_min']:.0f}–"
          f"{m['step_ms_max']:.0f}) | {m['tokens_per_s']:.0f} | "
          f"{m['peak_rss_mb']:.0f} | {gflop} | {util} | {ratios[0]} | "
          f"{ratios[1]} | {ratios[2]} |")
  return '\n'.join(lines)


def notes(result: dict[str, Any]) -> list[str]:
  """The lines printed under the table: ceilings, load, skips."""
  out = []
  for d, c in result['ceilings'].items():
    out.append(f"GEMM ceiling {d}: {c['gflops_median']:.1f} GFLOP/s "
               f"(jitted {c['size']}² matmul, median of {c['reps']}; "
               f"{c['start']:.1f} at the start, {c['end']:.1f} at the end)")
  for r in result['rows']:
    line = (f"{r['row']}: load average {r['load_avg_1m']}; "
            f"{len(r['results']['lorajax']['losses'])} steps")
    if 'step_ratio_compiled' in r['results']['lorajax']:
      line += (f"; lorajax/(PEFT+torch.compile) step "
               f"{r['results']['lorajax']['step_ratio_compiled']:.3f}")
    out.append(line)
    for label, reason in r['skipped'].items():
      out.append(f'{r["row"]}: {label} skipped: {reason}')
  return out
