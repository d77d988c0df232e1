"""The MiniLM LoRA step's products timed alone, against PEFT's profile.

``python -m experiments.bench.step_floor [--reps 7] [--nopeft]``

1. lorajax: the MiniLM (6 × 384) LoRA q/v step of
   ``experiments.bench.bench_core``, 32 × 128 tokens, compiled with
   ``lorajax.compiler_options()``; every ``dot`` of its optimized HLO,
   grouped by operand shapes and dimension numbers, timed alone (a jitted
   ``lax.dot_general`` of random operands, same options, median of
   ``--reps``): count, total ms, GFLOP/s. Their sum is the least time the
   step's products take at XLA's own speed, whatever the rest costs.
2. PEFT (needs the ``bench`` extra): the same model in transformers with
   PEFT LoRA q/v, AdamW, one step under ``torch.profiler``: its step time
   and the self CPU time of its top operators.

Run alone (``chrt -f 1``): both cores are timed.
"""

from __future__ import annotations

import collections
import re
import time

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import lorajax
from experiments.bench import bench_core
from lorajax.models import bert as bert_lib

_REPS = flags.DEFINE_integer('reps', 7, 'Timed calls of each product.')
_PEFT = flags.DEFINE_bool('peft', True, 'Also profile the PEFT step.')

B, T = 32, 128
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\{[\d,]*\}')


def _dims(line: str, key: str) -> tuple[int, ...]:
  m = re.search(key + r'=\{([\d,]*)\}', line)
  return tuple(int(x) for x in m.group(1).split(',') if x) if m else ()


def products(hlo: str) -> collections.Counter:
  """(lhs shape, rhs shape, dimension numbers) -> count, for every dot."""
  shapes = {}
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      shapes[m.group(1)] = tuple(int(x) for x in m.group(3).split(',') if x)
  found = collections.Counter()
  for line in hlo.splitlines():
    m = re.search(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', line)
    if not m:
      continue
    dn = ((_dims(line, 'lhs_contracting_dims'),
           _dims(line, 'rhs_contracting_dims')),
          (_dims(line, 'lhs_batch_dims'), _dims(line, 'rhs_batch_dims')))
    found[shapes[m.group(1)], shapes[m.group(2)], dn] += 1
  return found


def lorajax_floor(reps: int) -> None:
  cfg = bert_lib.BertConfig.minilm_l6(hidden_dropout=0.0,
                                      attention_dropout=0.0)
  batch = {k: jnp.asarray(x)
           for k, x in bench_core.make_batch(cfg, B, T).items()}
  setup = bench_core.make_setup('lora', cfg, batch)
  step = setup.step.lower(setup.state, setup.frozen, batch).compile()
  rows, total_ms, total_flops = [], 0.0, 0.0
  for (ls, rs, dn), count in products(step.as_text()).items():
    a = jnp.asarray(np.random.randn(*ls).astype(np.float32))
    b = jnp.asarray(np.random.randn(*rs).astype(np.float32))
    f = jax.jit(lambda a, b, dn=dn: lax.dot_general(a, b, dn)).lower(
        a, b).compile(compiler_options=lorajax.compiler_options())
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, b))
      times.append(time.perf_counter() - t0)
    t, flops = float(np.median(times)), bench_core.compiled_flops(f)
    rows.append((count * t * 1e3, count, flops / t / 1e9, ls, rs, dn))
    total_ms += count * t * 1e3
    total_flops += count * flops
  print(f'lorajax MiniLM LoRA q/v step, {B} x {T}: its products alone '
        f'(median of {reps} each)')
  for ms, count, rate, ls, rs, dn in sorted(rows, reverse=True):
    kind = 'batched' if dn[1][0] else 'plain'
    print(f'  {ms:7.1f} ms  x{count:3d}  {rate:5.0f} GFLOP/s  {kind:7s} '
          f'{ls} . {rs} contracting {dn[0]}')
  print(f'  all products: {total_ms:.0f} ms, {total_flops / 1e9:.1f} GFLOP '
        f'(the step: {bench_core.compiled_flops(step) / 1e9:.1f})')


def peft_profile() -> None:
  # pylint: disable=g-import-not-at-top
  import torch
  from peft import LoraConfig, get_peft_model
  from torch.profiler import ProfilerActivity, profile
  from transformers import BertConfig, BertForSequenceClassification
  # pylint: enable=g-import-not-at-top
  torch.manual_seed(0)
  config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                      num_attention_heads=12, intermediate_size=1536,
                      hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=2)
  model = get_peft_model(
      BertForSequenceClassification(config),
      LoraConfig(r=8, lora_alpha=16, target_modules=['query', 'value'],
                 lora_dropout=0.0))
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                          lr=1e-4, weight_decay=0.01)
  ids = torch.randint(0, config.vocab_size, (B, T))
  labels = torch.randint(0, 2, (B,))

  def step():
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
  for _ in range(2):
    step()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  print(f'\nPEFT step, {B} x {T}: median {1e3 * np.median(times):.0f} ms '
        f'(5 steps); one step under torch.profiler, self CPU time:')
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
  events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
  total = sum(e.self_cpu_time_total for e in events)
  for e in events[:8]:
    print(f'  {e.self_cpu_time_total / 1e3:7.1f} ms  x{e.count:4d}  {e.key}')
  print(f'  all operators: {total / 1e3:.0f} ms')


def main(argv):
  del argv
  with open('/proc/loadavg') as f:
    print('load average', ' '.join(f.read().split()[:3]))
  lorajax_floor(_REPS.value)
  if _PEFT.value:
    peft_profile()


if __name__ == '__main__':
  app.run(main)
