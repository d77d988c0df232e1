"""Attention split on the CPU: groups of sequences (BERT), causal query
blocks (decoders); the op alone and the step.

``python -m experiments.bench.attention_groups [--reps 9] [--step_reps 24]``

1. One MiniLM layer's ``lorajax.models.ops.attention`` (32 × 128 tokens, 12
   heads of 32, a quarter of the keys padded), forward and backward, with
   the whole batch and in groups of 1, 2, 4, 8 and 16 sequences: median
   time, XLA temporaries, and the largest gradient difference from the
   whole batch.
2. The MiniLM (6 layers) LoRA q/v step of ``experiments.bench.bench_core``
   with ``ops.CPU_SCORE_BYTES = 0`` (whole batch) and with the default
   groups, steps alternated in one process: median and minimum step time,
   XLA temporaries, XLA FLOPs.

3. One SmolLM2-135M layer's causal ``attention.attend_in_blocks`` (9
   heads, 3 KV heads of 64) at 16 × 128, 8 × 256 and 4 × 512 tokens,
   forward and backward, all queries at once and in 2, 4, 8 and 16 causal
   blocks (``attention.CAUSAL_BLOCK``): median time, XLA FLOPs and
   temporaries, largest gradient difference.
4. The SmolLM2-135M-shaped LoRA q/v step (8 × 256, random weights, the
   whole-logits loss) with causal blocks off and on, alternated.

5. ``--part fused``: the fused CPU attention kernel
   (``lorajax.runtime.cpu_attention``) against XLA's attention: one MiniLM
   layer alone and the MiniLM LoRA step (against the groups); one SmolLM2
   layer's causal attention alone and the SmolLM2-shaped step (against the
   causal blocks). Parts 1-4 run XLA's attention
   (``LORAJAX_CPU_ATTENTION=xla``).

Each variant is traced afresh with ``ops.CPU_SCORE_BYTES`` (and the
kernel's switch) set, so the setting takes effect. Run alone (``chrt -f 1``): both cores are timed.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments.bench import bench_core
from lorajax.runtime import cpu_attention
from lorajax.models import attention
from lorajax.models import bert as bert_lib
from lorajax.models import llama
from lorajax.models import ops

_REPS = flags.DEFINE_integer('reps', 9, 'Timed calls of each attention '
                             'variant (alternated).')
_STEP_REPS = flags.DEFINE_integer('step_reps', 24, 'Timed steps of each '
                                  'step variant (alternated); 0 skips.')

_CAUSAL_STEP_REPS = flags.DEFINE_integer(
    'causal_step_reps', 8, 'Timed SmolLM2 steps of each variant; 0 skips.')
_PART = flags.DEFINE_enum('part', 'all', ['all', 'groups', 'causal', 'fused'],
                          'Which measurements to run.')

B, T, HEADS, D = 32, 128, 12, 32
PER_SEQUENCE = 4 * HEADS * T * T


def _use_xla(on: bool) -> None:
  if on:
    os.environ[cpu_attention.SWITCH] = 'xla'
  else:
    os.environ.pop(cpu_attention.SWITCH, None)


def _alternate(runs: dict, reps: int) -> dict[str, list[float]]:
  times = {name: [] for name in runs}
  for _ in range(reps):
    for name, run in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - t0)
  return times


def attention_alone(reps: int) -> None:
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(x, (B, T, HEADS, D))
                for x in (kq, kk, kv, kg))
  mask = jnp.ones((B, T), bool).at[:, 3 * T // 4:].set(False)
  compiled, grads = {}, {}
  for group in (None, 1, 2, 4, 8, 16):
    ops.CPU_SCORE_BYTES = 0 if group is None else group * PER_SEQUENCE
    loss = lambda q, k, v: jnp.sum(ops.attention(q, k, v, mask) * g)
    name = 'whole' if group is None else f'groups of {group}'
    compiled[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        q, k, v).compile(compiler_options=lorajax.compiler_options())
    grads[name] = compiled[name](q, k, v)
  ops.CPU_SCORE_BYTES = ops.DEFAULT_CPU_SCORE_BYTES
  times = _alternate({n: (lambda c=c: c(q, k, v))
                      for n, c in compiled.items()}, reps)
  print(f'attention alone, {B} x {T} tokens, {HEADS} heads of {D}, '
        f'forward + backward (median of {reps}):')
  for name, c in compiled.items():
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(grads[name], grads['whole']))
    print(f'  {name:12s} {1e3 * np.median(times[name]):7.1f} ms  temps '
          f'{c.memory_analysis().temp_size_in_bytes / 1e6:6.1f} MB  '
          f'max |grad - whole| {diff:.1e}')


def compare_steps(title: str, variants: dict, batch: dict,
                  reps: int) -> None:
  """Compiles each variant's step (``name -> (set_up, make_setup)``:
  ``set_up()`` sets the module switch, ``make_setup()`` returns a
  ``bench_core.Setup`` traced under it), then times them alternated."""
  runs, info = {}, {}
  for name, (set_up, make_setup) in variants.items():
    set_up()
    setup = make_setup()
    compiled = setup.step.lower(setup.state, setup.frozen, batch).compile()
    state = [setup.state]

    def run(c=compiled, state=state, frozen=setup.frozen):
      state[0], loss = c(state[0], frozen, batch)
      return loss
    jax.block_until_ready(run())
    runs[name] = run
    info[name] = (compiled.memory_analysis().temp_size_in_bytes / 1e6,
                  bench_core.compiled_flops(compiled) / 1e9)
  ops.CPU_SCORE_BYTES = ops.DEFAULT_CPU_SCORE_BYTES
  attention.CAUSAL_BLOCK = attention.DEFAULT_CAUSAL_BLOCK
  times = _alternate(runs, reps)
  print(f'\n{title}, alternated, {reps} steps each:')
  for name, ts in times.items():
    temps, gflops = info[name]
    print(f'  {name:14s} median {1e3 * np.median(ts):6.0f} ms  min '
          f'{1e3 * min(ts):6.0f} ms  temps {temps:7.1f} MB  XLA '
          f'{gflops:.1f} GFLOP')


def step(reps: int) -> None:
  cfg = bert_lib.BertConfig.minilm_l6(hidden_dropout=0.0,
                                      attention_dropout=0.0)
  batch = {k: jnp.asarray(x)
           for k, x in bench_core.make_batch(cfg, B, T).items()}
  make = lambda: bench_core.make_setup('lora', cfg, batch)
  compare_steps(f'MiniLM LoRA q/v step, {B} x {T}', {
      'whole batch': (lambda: setattr(ops, 'CPU_SCORE_BYTES', 0), make),
      'groups': (lambda: setattr(ops, 'CPU_SCORE_BYTES',
                                 ops.DEFAULT_CPU_SCORE_BYTES), make),
  }, batch, reps)


SMOLLM2 = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
               head_dim=64, intermediate_size=1536, vocab_size=49152)


def causal_alone(reps: int) -> None:
  cfg = llama.LlamaConfig.tiny(num_heads=9, num_kv_heads=3).replace(
      head_dim=64)
  for b, t in ((16, 128), (8, 256), (4, 512)):
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, 3, 3, 64))
    k, v = (jax.random.normal(x, (b, t, 3, 64)) for x in (kk, kv))
    g = jax.random.normal(kg, q.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    compiled, grads = {}, {}
    for blocks in (1, 2, 4, 8, 16, 'fused'):
      _use_xla(blocks != 'fused')
      if blocks != 'fused' and t // blocks < 16:
        continue
      attention.CAUSAL_BLOCK = (0 if blocks in (1, 'fused')
                                else t // blocks)
      loss = lambda q, k, v: jnp.sum(attention.attend_in_blocks(
          cfg, q, k, v, mask, causal_offset=0) * g)
      name = {1: 'whole', 'fused': 'fused'}.get(blocks, f'{blocks} blocks')
      compiled[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
          q, k, v).compile(compiler_options=lorajax.compiler_options())
      grads[name] = compiled[name](q, k, v)
    attention.CAUSAL_BLOCK = attention.DEFAULT_CAUSAL_BLOCK
    _use_xla(True)
    times = _alternate({n: (lambda c=c: c(q, k, v))
                        for n, c in compiled.items()}, reps)
    print(f'\ncausal attention alone, {b} x {t} tokens, 9 heads (3 KV) of '
          f'64, forward + backward (median of {reps}):')
    for name, c in compiled.items():
      diff = max(float(jnp.max(jnp.abs(x - y)))
                 for x, y in zip(grads[name], grads['whole']))
      print(f'  {name:10s} {1e3 * np.median(times[name]):7.1f} ms  XLA '
            f'{bench_core.compiled_flops(c) / 1e9:5.2f} GFLOP  temps '
            f'{c.memory_analysis().temp_size_in_bytes / 1e6:6.1f} MB  '
            f'max |grad - whole| {diff:.1e}')


def causal_step(reps: int) -> None:
  cfg = llama.LlamaConfig(**SMOLLM2)
  b, t = 8, 256
  ids = jax.random.randint(jax.random.key(0), (b, t), 0, cfg.vocab_size)
  model = llama.Llama(cfg)
  params = model.init(jax.random.key(1), ids[:, :4])['params']
  spec = lorajax.LoraSpec([(r'layers_\d+/attn/(q|v)_proj/kernel',
                            lorajax.Lora(rank=8, alpha=16)),
                           (r'.*', 'freeze')])

  def apply(p, x, mask):
    return model.apply({'params': p}, x, attention_mask=mask)

  def loss_of(logits, x):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], x['input_ids'][:, 1:]).mean()
  batch = {'input_ids': ids, 'attention_mask': jnp.ones((b, t), jnp.int32)}
  make = lambda: bench_core.lora_setup(
      apply, params, spec, lorajax.init(spec, params, jax.random.key(2)),
      loss_of)
  def xla_blocks(block):
    _use_xla(True)
    attention.CAUSAL_BLOCK = block
  variants = {
      'whole': (lambda: xla_blocks(0), make),
      'causal blocks': (lambda: xla_blocks(attention.DEFAULT_CAUSAL_BLOCK),
                        make),
      'fused': (lambda: _use_xla(False), make),
  }
  if _PART.value == 'fused':
    del variants['whole']
  compare_steps(f'SmolLM2-135M-shaped LoRA q/v step, {b} x {t}', variants,
                batch, reps)
  _use_xla(True)


def fused_alone(reps: int) -> None:
  """One MiniLM layer's attention, forward and backward: XLA's (in groups,
  the default) against the fused kernel (``lorajax.runtime.cpu_attention``)."""
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(x, (B, T, HEADS, D))
                for x in (kq, kk, kv, kg))
  mask = jnp.ones((B, T), bool).at[:, 3 * T // 4:].set(False)
  compiled, grads = {}, {}
  for name, xla in (('xla', True), ('fused', False)):
    _use_xla(xla)
    loss = lambda q, k, v: jnp.sum(ops.attention(q, k, v, mask) * g)
    compiled[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        q, k, v).compile(compiler_options=lorajax.compiler_options())
    grads[name] = compiled[name](q, k, v)
  times = _alternate({n: (lambda c=c: c(q, k, v))
                      for n, c in compiled.items()}, reps)
  products = 7 * 2 * B * HEADS * T * T * D
  print(f'attention alone, {B} x {T} tokens, {HEADS} heads of {D}, '
        f'forward + backward (median of {reps}):')
  _use_xla(True)
  for name, c in compiled.items():
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(grads[name], grads['xla']))
    ms = 1e3 * np.median(times[name])
    print(f'  {name:6s} {ms:7.1f} ms  {products / ms / 1e6:6.1f} GFLOP/s of '
          f'its products  temps '
          f'{c.memory_analysis().temp_size_in_bytes / 1e6:6.1f} MB  '
          f'max |grad - xla| {diff:.1e}')


def fused_step(reps: int, layers: int) -> None:
  cfg = bert_lib.BertConfig.minilm_l6(hidden_dropout=0.0,
                                      attention_dropout=0.0)
  cfg = cfg.replace(num_layers=layers)
  batch = {k: jnp.asarray(x)
           for k, x in bench_core.make_batch(cfg, B, T).items()}
  make = lambda: bench_core.make_setup('lora', cfg, batch)
  compare_steps(f'MiniLM ({layers} layers) LoRA q/v step, {B} x {T}', {
      'xla attention': (lambda: _use_xla(True), make),
      'fused': (lambda: _use_xla(False), make),
  }, batch, reps)
  _use_xla(True)


def main(argv):
  del argv
  with open('/proc/loadavg') as f:
    print('load average', ' '.join(f.read().split()[:3]))
  _use_xla(True)   # XLA's attention unless a variant says 'fused'
  if _PART.value in ('all', 'groups'):
    attention_alone(_REPS.value)
    if _STEP_REPS.value:
      step(_STEP_REPS.value)
  if _PART.value in ('all', 'fused'):
    fused_alone(_REPS.value)
    if _STEP_REPS.value:
      fused_step(_STEP_REPS.value, 6)
    if _PART.value == 'fused':
      causal_alone(_REPS.value)
      if _CAUSAL_STEP_REPS.value:
        causal_step(_CAUSAL_STEP_REPS.value)
  if _PART.value in ('all', 'causal'):
    causal_alone(_REPS.value)
    if _CAUSAL_STEP_REPS.value:
      causal_step(_CAUSAL_STEP_REPS.value)


if __name__ == '__main__':
  app.run(main)
