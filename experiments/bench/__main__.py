"""Benchmarks: ``python -m experiments.bench {core|peft} [--json]``.

Subcommands:
  core   LoRA vs full fine-tuning step on a MiniLM-shaped BERT: XLA FLOPs,
         median step time (interleaved repetitions), peak RSS per variant.
  peft   the same LoRA step in lorajax and in PyTorch + transformers + PEFT
         (each in its own worker process, steps alternated): lorajax's
         shipped BERT (minilm, base), a user's own plain Flax BERT
         (flaxbert), a SmolLM2-135M-shaped causal LM (smollm2: 8x256;
         smollm2_lc: 8x256, lorajax's head and loss in 512-token chunks;
         smollm2_2k: 1x2048 with remat / gradient checkpointing); LoRA on
         query/value and on every block Linear; float32 or bfloat16
         compute; PEFT with torch.compile as a second anchor. Median step
         time, min–max, peak RSS, tokens/s, lorajax/PEFT ratios, the GEMM
         ceiling of this machine and each step's utilization of it.
         Needs the ``bench`` extra (``pip install -e '.[bench]'``).

  python -m experiments.bench peft --sizes=minilm,flaxbert --targets=qv
  python -m experiments.bench peft --sizes=smollm2 --dtypes=bfloat16 --json

Every figure printed is measured in this run; ratios are within the run.
"""

import json
import sys

from absl import app
from absl import flags

_JSON = flags.DEFINE_bool('json', False, 'Print one JSON line per row '
                          '(peft: then one line with the GEMM ceilings).')
_VARIANT = flags.DEFINE_string(
    'variant', None, 'core: measure only this variant, in this process '
    '(used for peak-memory subprocesses).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'core: examples per step.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'core: tokens per example.')
_REPS = flags.DEFINE_integer(
    'reps', None, 'Timed repetitions per variant (default: core 5, peft 10).')
_STEPS = flags.DEFINE_integer('steps', 3, 'core: steps run when measuring '
                              'memory.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'peft: untimed steps first.')
_SIZES = flags.DEFINE_list(
    'sizes', ['minilm', 'base', 'flaxbert', 'smollm2', 'smollm2_2k'],
    'peft: models and shapes (minilm: shipped BERT 6x384, batch 32x128; '
    'base: 12x768, 8x128; flaxbert: a plain Flax BERT of MiniLM shape; '
    'smollm2: Llama 30x576, 8x256; smollm2_lc: the same, lorajax with '
    'config.loss_chunk=512; smollm2_2k: the same, 1x2048, remat).')
_TARGETS = flags.DEFINE_list('targets', ['qv', 'all'],
                             'peft: LoRA targets (qv: query/value; all: '
                             'every Linear of the blocks).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'],
                            'peft: compute dtypes (float32, bfloat16).')
_COMPILE = flags.DEFINE_bool('torch_compile', True,
                             'peft: add PEFT with torch.compile as a second '
                             'anchor (skipped with its reason if it fails).')
_GEMM_SIZE = flags.DEFINE_integer('gemm_size', 2048,
                                  'peft: side of the ceiling\'s matmul.')
_HOST_PAGES = flags.DEFINE_enum(
    'host_pages', 'default', ['kept', 'default', 'both'],
    'peft: start the lorajax workers with glibc\'s defaults (default), with '
    'LORAJAX_HOST_PAGES=kept (kept: the preloaded block cache), or both, '
    'adding PEFT with the block cache (lorajax.runtime.host_memory).')
_PER_CALL = flags.DEFINE_integer(
    'steps_per_call', 1, 'peft: with k > 1, add a lorajax worker running k '
    'steps in one compiled call (config.steps_per_call; its step time is '
    'the call\'s over k).', lower_bound=1)
_GEMM_REPS = flags.DEFINE_integer('gemm_reps', 10,
                                  'peft: timed calls of the ceiling\'s matmul.')

SUBCOMMANDS = ('core', 'peft')


def _peft(log) -> None:
  """``python -m experiments.bench peft``."""
  # Imported here: bench_peft needs the bench extra (torch), core does not.
  from experiments.bench import bench_inputs  # pylint: disable=g-import-not-at-top
  from experiments.bench import bench_peft  # pylint: disable=g-import-not-at-top
  for flag, values, allowed in (('targets', _TARGETS.value,
                                 bench_inputs.TARGETS),
                                ('dtypes', _DTYPES.value,
                                 bench_inputs.DTYPES)):
    for v in values:
      if v not in allowed:
        raise app.UsageError(f'--{flag}: {v!r} is not one of {allowed}')
  try:
    rows = bench_inputs.rows(_SIZES.value, _TARGETS.value, _DTYPES.value)
  except ValueError as e:
    raise app.UsageError(f'--sizes: {e}') from None
  result = bench_peft.run(rows, reps=_REPS.value or 10, warmup=_WARMUP.value,
                          torch_compile=_COMPILE.value,
                          host_pages=_HOST_PAGES.value,
                          steps_per_call=_PER_CALL.value,
                          gemm_size=_GEMM_SIZE.value,
                          gemm_reps=_GEMM_REPS.value, log=log)
  if _JSON.value:
    for r in result['rows']:
      print(json.dumps(r))
    print(json.dumps({'ceilings': result['ceilings']}))
    return
  print()
  print(f'LoRA rank {bench_peft.RANK} (alpha {bench_peft.ALPHA}), AdamW; '
        'lorajax vs PyTorch + transformers + PEFT, steps alternated between '
        'workers; GEMM util. = lorajax XLA FLOPs / step time / ceiling')
  print(bench_peft.table(result))
  for line in bench_peft.notes(result):
    print(line)


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
