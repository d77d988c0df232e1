"""Benchmarks: ``python -m experiments.bench core [--json]``.

Subcommands:
  core   LoRA vs full fine-tuning step on a MiniLM-shaped BERT: XLA FLOPs,
         median step time (interleaved repetitions), peak RSS per variant.

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
_REPS = flags.DEFINE_integer('reps', 5, 'Timed repetitions per variant.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps run when measuring memory.')

SUBCOMMANDS = ('core',)


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f'usage: python -m experiments.bench '
                         f'{{{"|".join(SUBCOMMANDS)}}} [--json]')
  from experiments import bench_core  # pylint: disable=g-import-not-at-top
  if _VARIANT.value:
    if _VARIANT.value not in bench_core.VARIANTS:
      raise app.UsageError(f'--variant must be one of {bench_core.VARIANTS}')
    print(json.dumps(bench_core.measure_one_variant(
        _VARIANT.value, _BATCH.value, _SEQ.value, _STEPS.value)))
    return
  log = (lambda s: print(s, file=sys.stderr)) if _JSON.value else print
  rows = bench_core.run(batch_size=_BATCH.value, seq_len=_SEQ.value,
                        reps=_REPS.value, memory_steps=_STEPS.value, log=log)
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
