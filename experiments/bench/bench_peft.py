"""lorajax against PyTorch + transformers + PEFT on the same LoRA step.

``python -m experiments.bench peft [--json]``. For every variant (a model
size and a set of LoRA targets) the driver

1. writes one safetensors file with Hugging Face-named BERT weights (normal
   std 0.02, as BERT initializes), the LoRA ``A`` matrices in PEFT's layout
   (``B`` starts at zero) and the batch, so both frameworks train the same
   model on the same data from the same start;
2. starts one long-lived worker per framework
   (``experiments.bench.lorajax_worker`` and
   ``experiments.bench.peft_worker``), each in its own process;
3. runs warm-up steps, then alternates timed steps between the two workers
   (the order flips every repetition), so they never run at the same time
   and load drifts hit both alike;
4. asks each worker for its peak RSS (``VmHWM`` of its own process).

Each worker times its own step (around the step, waiting for the result).
The step is float32 with AdamW (lr 1e-4, weight decay 0.01), dropout off,
LoRA rank 8, alpha 16, classifier trained, on query/value (``qv``) or on all
six dense kernels of every block (``all``). Both frameworks see the same
losses step after step (reported as ``max_loss_diff``): they compute the
same thing.

Timings need a quiet machine: under load, PyTorch's OpenMP barriers lose far
more than XLA's thread pool (at load average 4 on 2 cores PEFT's MiniLM step
went from 1.2 s to 5.3 s, lorajax's from 0.86 s to 1.5 s). Each row records
the load average; compare runs near 1 (the benchmark itself).

Result on the 2-core AMD EPYC dev machine (jax 0.10.2, torch 2.13.0+cpu,
transformers 5.23.0, peft 0.21.2; 10 repetitions; load average 1.4-1.7):

  | variant   | lorajax ms | PEFT ms | step ratio | lorajax MB | PEFT MB | RSS ratio |
  |-----------|-----------:|--------:|-----------:|-----------:|--------:|----------:|
  | minilm/qv |        862 |    1217 |      0.708 |       1018 |    1305 |     0.780 |
  | minilm/all|       1128 |    1518 |      0.743 |       1429 |    1895 |     0.754 |
  | base/qv   |       1288 |    2090 |      0.616 |       1362 |    1607 |     0.848 |
  | base/all  |       1543 |    2462 |      0.627 |       1825 |    2140 |     0.853 |

Three quiet runs of minilm/qv gave step ratios 0.708, 0.778, 0.761 and RSS
ratios 0.780, 0.776, 0.765: lorajax's step varies more between runs (XLA CPU
allocates its 0.55 GB of temporaries afresh each step, so every step pays
its page faults; transparent huge pages through
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` made single steps faster, 787 ms,
but the median slower, 1339 ms, so the harness sets nothing).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
from typing import Any, Callable

import numpy as np
from safetensors import numpy as safetensors_numpy

from experiments.bench import worker_protocol

FRAMEWORKS = ('lorajax', 'peft')
WORKERS = {'lorajax': 'experiments.bench.lorajax_worker',
           'peft': 'experiments.bench.peft_worker'}
TARGETS = ('qv', 'all')
RANK, ALPHA = 8, 16
# Must match the optimizer of ``experiments.bench.bench_core.make_setup``.
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01


@dataclasses.dataclass(frozen=True)
class Size:
  """A BERT shape and the batch it is benchmarked with."""
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  batch_size: int
  seq_len: int
  vocab_size: int = 30522
  max_position: int = 512
  num_labels: int = 2


SIZES = {
    'minilm': Size(384, 6, 12, 1536, batch_size=32, seq_len=128),
    'base': Size(768, 12, 12, 3072, batch_size=8, seq_len=128),
}


def _linear_shapes(size: Size) -> dict[str, tuple[int, int]]:
  """Hugging Face module name -> ``[out, in]`` of every encoder Linear."""
  h, f = size.hidden_size, size.intermediate_size
  shapes = {}
  for i in range(size.num_layers):
    block = f'encoder.layer.{i}'
    for proj in ('query', 'key', 'value'):
      shapes[f'{block}.attention.self.{proj}'] = (h, h)
    shapes[f'{block}.attention.output.dense'] = (h, h)
    shapes[f'{block}.intermediate.dense'] = (f, h)
    shapes[f'{block}.output.dense'] = (h, f)
  return shapes


def make_tensors(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
  """Weights, LoRA ``A`` factors and one batch, named as both sides read them.

  Returns:
    ``bert.*`` and ``classifier.*``: a ``BertForSequenceClassification``
    state dict (Linear weights ``[out, in]``); ``lora.<module>.A``: ``[r, in]``
    Kaiming-uniform factors for every encoder Linear; ``batch.input_ids``,
    ``batch.attention_mask`` ``[B, T]`` and ``batch.label`` ``[B]`` int32.
  """
  rng = np.random.default_rng(seed)
  h = size.hidden_size
  out: dict[str, np.ndarray] = {}

  def normal(*shape):
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)

  def linear(name, n_out, n_in):
    out[f'{name}.weight'] = normal(n_out, n_in)
    out[f'{name}.bias'] = np.zeros(n_out, np.float32)

  def norm(name):
    out[f'{name}.weight'] = np.ones(h, np.float32)
    out[f'{name}.bias'] = np.zeros(h, np.float32)

  for table, rows in (('word', size.vocab_size),
                      ('position', size.max_position), ('token_type', 2)):
    out[f'bert.embeddings.{table}_embeddings.weight'] = normal(rows, h)
  norm('bert.embeddings.LayerNorm')
  for name, (n_out, n_in) in _linear_shapes(size).items():
    linear(f'bert.{name}', n_out, n_in)
    bound = 1.0 / np.sqrt(n_in)
    out[f'lora.{name}.A'] = rng.uniform(-bound, bound,
                                        (RANK, n_in)).astype(np.float32)
  for i in range(size.num_layers):
    norm(f'bert.encoder.layer.{i}.attention.output.LayerNorm')
    norm(f'bert.encoder.layer.{i}.output.LayerNorm')
  linear('bert.pooler.dense', h, h)
  linear('classifier', size.num_labels, h)
  shape = (size.batch_size, size.seq_len)
  out['batch.input_ids'] = rng.integers(0, size.vocab_size, shape,
                                        dtype=np.int32)
  out['batch.attention_mask'] = np.ones(shape, np.int32)
  out['batch.label'] = rng.integers(0, size.num_labels, (size.batch_size,),
                                    dtype=np.int32)
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


def run_variant(size_name: str, targets: str, *, reps: int, warmup: int,
                workdir: str, log: Callable[[str], None]) -> dict[str, Any]:
  """Measures one variant in both frameworks; returns its result row."""
  size = SIZES[size_name]
  weights = os.path.join(workdir, f'{size_name}.safetensors')
  if not os.path.exists(weights):
    safetensors_numpy.save_file(make_tensors(size), weights)
  request = dict(dataclasses.asdict(size), targets=targets, rank=RANK,
                 alpha=ALPHA, learning_rate=LEARNING_RATE,
                 weight_decay=WEIGHT_DECAY, weights=weights)
  variant = f'{size_name}/{targets}'
  workers = {}
  try:
    setup = {}
    for fw in FRAMEWORKS:  # one after the other: setups never overlap
      workers[fw] = worker_protocol.Worker(
          [sys.executable, '-m', WORKERS[fw]], f'{fw} ({variant})')
      setup[fw] = workers[fw].call('setup', **request)
      log(f'{variant}: {fw} set up in {setup[fw]["setup_s"]:.1f} s, '
          f'{setup[fw]["trainable_params"]:,d} trainable params')
    times = {fw: [] for fw in FRAMEWORKS}
    losses = {fw: [] for fw in FRAMEWORKS}
    for r in range(warmup + reps):
      order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
      for fw in order:
        reply = workers[fw].call('step')
        losses[fw].append(reply['loss'])
        if r >= warmup:
          times[fw].append(reply['step_s'])
      if r >= warmup:
        log(f'{variant} repetition {r - warmup + 1}/{reps}: ' + ', '.join(
            f'{fw} {times[fw][-1] * 1e3:.0f} ms' for fw in FRAMEWORKS))
    stats = {fw: workers[fw].call('stats') for fw in FRAMEWORKS}
  finally:
    for w in workers.values():
      w.close()
  tokens = size.batch_size * size.seq_len
  row = {'variant': variant, 'size': size_name, 'targets': targets,
         'batch_size': size.batch_size, 'seq_len': size.seq_len,
         'reps': reps, 'load_avg_1m': round(os.getloadavg()[0], 2)}
  for fw in FRAMEWORKS:
    row[fw] = _summary(setup[fw] | stats[fw], times[fw], losses[fw], tokens)
  ours, theirs = row['lorajax'], row['peft']
  row['step_ratio'] = round(ours['step_ms_median'] / theirs['step_ms_median'],
                            3)
  row['rss_ratio'] = round(ours['peak_rss_mb'] / theirs['peak_rss_mb'], 3)
  row['max_loss_diff'] = float(np.max(np.abs(
      np.subtract(ours['losses'], theirs['losses']))))
  return row


def run(variants: list[tuple[str, str]], *, reps: int = 10, warmup: int = 2,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Measures every ``(size, targets)`` variant; one row each."""
  rows = []
  with tempfile.TemporaryDirectory(prefix='lorajax_bench_peft_') as workdir:
    for size_name, targets in variants:
      rows.append(run_variant(size_name, targets, reps=reps, warmup=warmup,
                              workdir=workdir, log=log))
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  """A markdown table: one line per variant and framework, with ratios."""
  lines = ['| variant | batch | framework | trainable | step ms median '
           '(min–max) | tokens/s | peak RSS MB | lorajax/PEFT step | '
           'lorajax/PEFT RSS |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    for fw in FRAMEWORKS:
      m = r[fw]
      ratio = ((f"{r['step_ratio']:.3f}", f"{r['rss_ratio']:.3f}")
               if fw == 'lorajax' else ('', ''))
      lines.append(
          f"| {r['variant']} | {r['batch_size']}×{r['seq_len']} | {fw} | "
          f"{m['trainable_params']:,d} | {m['step_ms_median']:.0f} "
          f"({m['step_ms_min']:.0f}–{m['step_ms_max']:.0f}) | "
          f"{m['tokens_per_s']:.0f} | {m['peak_rss_mb']:.0f} | "
          f'{ratio[0]} | {ratio[1]} |')
  return '\n'.join(lines)
