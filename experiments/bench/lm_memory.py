"""XLA temporaries and FLOPs of a SmolLM2-135M LoRA step: remat, loss chunks.

``nice -n 19 python -m experiments.bench.lm_memory [--shapes=1x2048,8x256]
[--chunk=512] [--attn_chunk=256] [--json]``

Compiles, and never runs, the train step the training loop compiles
(``tasks.build_task`` + ``parallel.runner_from_config``: LoRA rank 8 on
q/v, AdamW, ``lorajax.compiler_options()``) for a random SmolLM2-135M (30
layers, d 576, vocabulary 49,152, tied embeddings, float32), for each batch
shape, each ``config.remat`` ('none', 'layer', 'dots') and the loss
computed whole or in chunks of ``--chunk`` tokens (``config.loss_chunk``).
Each row: XLA's temporary bytes (``compiled.memory_analysis()``: what the
step allocates beyond its arguments and outputs) and XLA's FLOPs
(``cost_analysis()``). Both come from the compiler, not from a run: they
are the same on every run of the same jax/jaxlib (here 0.10.2, CPU).

XLA's cost analysis counts a while loop's body once, and the chunked loss is
a ``lax.scan``; so the FLOPs of a chunked row are those of the same step
compiled with one chunk of the whole batch (``loss_chunk = B·T``): XLA
removes that one-trip loop and counts its body, which does every chunk's
per-token work (the head product, again in the backward pass, and the
softmax); ``flops_note`` says so. Checked on a tiny Llama (V 4096, d 64,
2x128): one chunk 5.127e8 FLOPs, the chunks written out as straight-line
code 5.128e8, the whole loss 3.754e8 + 2·B·T·d·V = 5.096e8.

``--attn_chunk`` sets ``config.attn_chunk`` (attention over blocks of that
many queries, a ``lax.map``) in every row. Its loop body is counted once
too, and no one-trip twin removes it, so the FLOPs of those rows are a
lower bound; compare their temporaries only.

Measured (2026-11-30, jax 0.10.2 CPU; temp MiB, GFLOPs):

  | shape  | remat | whole loss      | loss_chunk=512  | + attn_chunk    |
  |--------|-------|-----------------|-----------------|-----------------|
  | 1x2048 | none  | 9,487 / 1,999.1 | 8,392 / 1,999.1 | 2,380 (256)     |
  | 1x2048 | layer | 5,538 / 2,624.8 | 4,299 / 2,624.8 | 1,103 (256)     |
  | 1x2048 | dots  | 5,825 / 2,153.8 | 4,879 / 2,153.8 | 1,534 (256)     |
  | 8x256  | none  | 4,537 / 1,220.2 | 3,352 / 1,220.2 | 2,376 (128)     |
  | 8x256  | layer | 2,473 / 1,584.1 | 1,509 / 1,584.1 | 1,001 (128)     |
  | 8x256  | dots  | 3,183 / 1,240.8 | 2,066 / 1,240.8 |                 |

  Layer remat recomputes the forward pass (+31% FLOPs at 1x2048, +30% at
  8x256), dots remat +8% / +2%. Without attention blocks a layer-remat
  step still holds ~180 MB a layer at 1x2048 (the attention scores: 2 vs 4
  layers of the same shape differ by 359 MiB); with 256-query blocks the
  difference is 9 MiB, a layer's input. See README "Memory: remat, loss
  chunks, attention blocks".

  Since 5aa636a (2026-12-01) the LoRA rewrite's layer remat recomputes each
  block only after its cotangent exists (``lorajax.runtime.recompute``):
  the 1x2048 layer row with loss_chunk=512 and attn_chunk=256 measured
  1,333 MB of temporaries just before that commit (the table's 1,103 MiB is
  older) and 469 MB after it; the other layer rows were not re-measured.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

from lorajax.training import config as config_lib
from lorajax.training import optim
from lorajax.training import parallel
from lorajax.training import step as step_lib
from lorajax.training import tasks

_SHAPES = flags.DEFINE_list('shapes', ['1x2048', '8x256'],
                            'Batch shapes BxT to compile.')
_CHUNK = flags.DEFINE_integer('chunk', 512, 'Tokens a loss chunk.')
_REMATS = flags.DEFINE_list('remats', ['none', 'layer', 'dots'],
                            'config.remat values.')
_ATTN = flags.DEFINE_integer('attn_chunk', 0, 'config.attn_chunk of every '
                             'row (queries an attention block; 0: all).')
_JSON = flags.DEFINE_bool('json', False, 'One JSON line a row.')


def _config(remat: str, chunk: int, batch: int, length: int):
  c = config_lib.base_config('lm')
  c.model.pretrained = False   # random weights of the real shape
  c.remat, c.loss_chunk = remat, chunk
  c.attn_chunk = _ATTN.value
  c.batch_size, c.data.max_len = batch, length
  return c


def compile_step(remat: str, chunk: int, batch: int, length: int):
  """The compiled train step of one setting."""
  config = _config(remat, chunk, batch, length)
  task = tasks.build_task(config, splits=())
  trainable, frozen = task.split_params()
  tx, _ = optim.from_config(config.optim, int(config.num_train_steps))
  state = step_lib.create_state(trainable, tx, seed=0)
  runner = parallel.runner_from_config(config, task, tx)
  tokens = jax.ShapeDtypeStruct((batch, length), np.int32)
  data = {'inputs': tokens, 'targets': tokens, 'mask': tokens}
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        (state, frozen))
  return runner.train_step.lower(*shapes, data).compile()


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost['flops'])


def measure(shape: str, remat: str, chunk: int) -> dict:
  """One row: temp bytes and FLOPs of a setting."""
  batch, length = (int(n) for n in shape.split('x'))
  start = time.perf_counter()
  compiled = compile_step(remat, chunk, batch, length)
  memory = compiled.memory_analysis()
  row = {'shape': shape, 'remat': remat, 'loss_chunk': chunk,
         'attn_chunk': _ATTN.value,
         'temp_bytes': int(memory.temp_size_in_bytes),
         'argument_bytes': int(memory.argument_size_in_bytes),
         'flops': _flops(compiled)}
  if chunk and chunk < batch * length:   # a loop: count one whole chunk
    row['flops'] = _flops(compile_step(remat, batch * length, batch, length))
    row['flops_note'] = f'from loss_chunk={batch * length} (one chunk)'
  row['compile_s'] = round(time.perf_counter() - start, 1)
  return row


def main(argv) -> None:
  del argv
  rows = []
  for shape in _SHAPES.value:
    for chunk in (0, _CHUNK.value):
      for remat in _REMATS.value:
        row = measure(shape, remat, chunk)
        rows.append(row)
        if _JSON.value:
          print(json.dumps(row), flush=True)
        else:
          print(f"{row['shape']:>7} remat={row['remat']:<5} "
                f"loss_chunk={row['loss_chunk']:<4} temp "
                f"{row['temp_bytes'] / 2**20:8.1f} MiB  XLA FLOPs "
                f"{row['flops'] / 1e9:8.1f} G", flush=True)
  if not _JSON.value:
    base = {r['shape']: r for r in rows
            if r['remat'] == 'none' and not r['loss_chunk']}
    print('ratios to remat=none, whole loss (temp, FLOPs):')
    for r in rows:
      b = base[r['shape']]
      print(f"{r['shape']:>7} remat={r['remat']:<5} "
            f"loss_chunk={r['loss_chunk']:<4} "
            f"{r['temp_bytes'] / b['temp_bytes']:.3f} "
            f"{r['flops'] / b['flops']:.3f}")
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
