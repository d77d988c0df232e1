"""Benchmarks: ``python -m experiments.bench {core|peft} [--json]``.

Subcommands:
  core   LoRA vs full fine-tuning step on a MiniLM-shaped BERT: XLA FLOPs,
         median step time (interleaved repetitions), peak RSS per variant.
  peft   the same LoRA step in lorajax and in PyTorch + transformers + PEFT
         (each in its own worker process, steps alternated), MiniLM and
         BERT-base shapes, LoRA on query/value and on all dense kernels:
         median step time, min–max, peak RSS, tokens/s, lorajax/PEFT ratios.
         Needs the ``bench`` extra (``pip install -e '.[bench]'``).

Every figure printed is measured in this run; ratios are within the run.
"""

import json
import sys

from absl import app
from absl import flags

_JSON = flags.DEFINE_bool('json', False, 'Print one JSON line per variant.')
_VARIANT = flags.DEFINE_string(
    'variant', None, 'Measure only this variant, in this process (used for '
    'peak-memory subprocesses).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Examples per step.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'Tokens per example.')
_REPS = flags.DEFINE_integer(
    'reps', None, 'Timed repetitions per variant (default: core 5, peft 10).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps run when measuring memory.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'peft: untimed steps first.')
_SIZES = flags.DEFINE_list('sizes', ['minilm', 'base'],
                           'peft: model shapes (minilm: 6x384, batch 32x128; '
                           'base: 12x768, batch 8x128).')
_TARGETS = flags.DEFINE_list('targets', ['qv', 'all'],
                             'peft: LoRA targets (qv: query/value; all: every '
                             'dense kernel of the encoder blocks).')

SUBCOMMANDS = ('core', 'peft')


def _peft(log) -> None:
  """``python -m experiments.bench peft``."""
  # Imported here: bench_peft needs the bench extra (torch), core does not.
  from experiments.bench import bench_peft  # pylint: disable=g-import-not-at-top
  for name in _SIZES.value:
    if name not in bench_peft.SIZES:
      raise app.UsageError(f'--sizes: {name!r} is not one of '
                           f'{sorted(bench_peft.SIZES)}')
  for name in _TARGETS.value:
    if name not in bench_peft.TARGETS:
      raise app.UsageError(f'--targets: {name!r} is not one of '
                           f'{bench_peft.TARGETS}')
  variants = [(s, t) for s in _SIZES.value for t in _TARGETS.value]
  rows = bench_peft.run(variants, reps=_REPS.value or 10,
                        warmup=_WARMUP.value, log=log)
  if _JSON.value:
    for r in rows:
      print(json.dumps(r))
    return
  print()
  print('LoRA rank 8 (alpha 16) + classifier, float32, AdamW; lorajax vs '
        'PyTorch + transformers + PEFT, steps alternated between workers')
  print(bench_peft.table(rows))
  for r in rows:
    print(f"{r['variant']}: max |loss difference| over "
          f"{len(r['lorajax']['losses'])} steps {r['max_loss_diff']:.2e}; "
          f"load average {r['load_avg_1m']}")


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f'usage: python -m experiments.bench '
                         f'{{{"|".join(SUBCOMMANDS)}}} [--json]')
  log = (lambda s: print(s, file=sys.stderr)) if _JSON.value else print
  if argv[1] == 'peft':
    _peft(log)
    return
  from experiments.bench import bench_core  # pylint: disable=g-import-not-at-top
  if _VARIANT.value:
    if _VARIANT.value not in bench_core.VARIANTS:
      raise app.UsageError(f'--variant must be one of {bench_core.VARIANTS}')
    print(json.dumps(bench_core.measure_one_variant(
        _VARIANT.value, _BATCH.value, _SEQ.value, _STEPS.value)))
    return
  rows = bench_core.run(batch_size=_BATCH.value, seq_len=_SEQ.value,
                        reps=_REPS.value or 5, memory_steps=_STEPS.value,
                        log=log)
  if _JSON.value:
    for r in rows:
      print(json.dumps(r))
  else:
    print()
    print(f'MiniLM-shaped BERT, batch {_BATCH.value} x {_SEQ.value}, float32, '
          f'AdamW')
    print(bench_core.table(rows))


if __name__ == '__main__':
  app.run(main)
