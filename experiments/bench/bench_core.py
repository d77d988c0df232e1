"""What a LoRA step costs against full fine-tuning, on a MiniLM-shaped BERT.

Variants (batch 32 × 128 tokens, float32, AdamW, random weights):

  full               every parameter trained
  lora               rank 8, alpha 16 on query/value; classifier trained
  lora_all           rank 8 on every dense kernel of the encoder; classifier
  lora_materialized  lora, but W + s·a·b is formed inside the step (the naive
                     way), for reference

FLOPs come from XLA (``compile().cost_analysis()``), step times are medians
of interleaved repetitions in this process, peak RSS is measured in a fresh
process per variant (``--variant``) so variants do not share an allocator.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from lorajax.models import bert as bert_lib
from lorajax.runtime import cpu_attention
from lorajax.training import step as step_lib

VARIANTS = ('full', 'lora', 'lora_all', 'lora_materialized')
QV = r'encoder/layer_\d+/attention/(query|value)/kernel'
ALL = (r'encoder/layer_\d+/(attention/(query|key|value|output)|intermediate|'
       r'output)/kernel')


@dataclasses.dataclass(frozen=True)
class Setup:
  """A compiled-ready step for one variant.

  ``flops_twin``: where ``step`` runs loops (attention blocks, loss chunks)
  whose bodies XLA's cost analysis counts once, the same step written
  without them, compiled only to count the step's FLOPs.

  ``reference_twin``: where ``step`` skips work the transformers model does
  (the shipped BERT's one-query last layer for ``[CLS]``), the same step
  doing that work, compiled only to count the FLOPs of PEFT's step.
  """
  step: Callable[..., Any]
  state: Any
  frozen: Any
  trainable_params: int
  flops_twin: 'Setup | None' = None
  reference_twin: 'Setup | None' = None


def lora_spec(variant: str) -> lorajax.LoraSpec:
  if variant == 'full':
    return lorajax.LoraSpec([(r'.*', 'train')])
  target = ALL if variant == 'lora_all' else QV
  return lorajax.LoraSpec([(target, lorajax.Lora(rank=8, alpha=16)),
                           (r'classifier/.*', 'train'),
                           (r'.*', 'freeze')])


def lora_train_step(loss_fn: Callable[[Any, Any, Any], jax.Array],
                    tx: optax.GradientTransformation):
  """The step every benchmark row times: ``(state, frozen, batch) ->
  (state, loss)``, ``state = (trainable, opt_state)``, differentiating
  ``loss_fn(trainable, frozen, batch)`` in the trainable tree only."""
  def step(state, frozen, x):
    t, opt_state = state
    value, grads = jax.value_and_grad(loss_fn)(t, frozen, x)
    updates, opt_state = tx.update(grads, opt_state, t)
    return (optax.apply_updates(t, updates), opt_state), value
  return step


def jit_step(step, *, xla_options: bool = True, dtype: Any = None):
  """``jax.jit`` with the state donated; ``xla_options`` adds
  ``lorajax.compiler_options(dtype=dtype)``, False is a plain ``jax.jit``."""
  options = lorajax.compiler_options(dtype=dtype) if xla_options else None
  return jax.jit(step, donate_argnums=0, compiler_options=options)


def several_steps(step, k: int, *, xla_options: bool = True,
                  dtype: Any = None):
  """``k`` steps of ``step`` (a ``jit_step`` result) in one compiled call,
  as a run with ``config.steps_per_call = k`` does
  (``lorajax.training.step.scan_steps``, every step active):
  ``(state, frozen, batches [k, ...]) -> (state, [k] losses)``."""
  fun = step.__wrapped__   # jax.jit keeps the function it was given

  def steps(state, frozen, batches):
    return step_lib.scan_steps(fun, state, frozen, batches,
                               jnp.ones((k,), bool))
  return jit_step(steps, xla_options=xla_options, dtype=dtype)


def adamw() -> optax.GradientTransformation:
  """AdamW of every benchmark (lr 1e-4, weight decay 0.01)."""
  return optax.adamw(1e-4, weight_decay=0.01)


def classification_loss(logits: jax.Array, x: dict[str, Any]) -> jax.Array:
  """Mean cross entropy of ``[B, labels]`` logits against ``x['label']``."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), x['label']).mean()


def lora_setup(apply: Callable[..., jax.Array], params: Any,
               spec: lorajax.LoraSpec, adapters: Any,
               loss_of: Callable[[jax.Array, Any], jax.Array], *,
               xla_options: bool = True, dtype: Any = None) -> Setup:
  """The LoRA step of any model, as a user writes it with lorajax.

  Args:
    apply: ``apply(params, input_ids, attention_mask) -> logits``.
    params: the model's parameters.
    spec: adapted, trained and frozen leaves.
    adapters: ``lorajax.init(spec, params, key)``'s tree (or values for it).
    loss_of: ``(logits, batch) -> scalar loss``.
    xla_options: jit with ``lorajax.compiler_options(dtype=dtype)``.
    dtype: the model's compute dtype.
  """
  train, frozen = lorajax.partition(params, spec)
  trainable = {'adapters': adapters, 'params': train}
  adapted = lorajax.lora(apply, spec)

  def loss(t, frozen, x):
    logits = adapted(lorajax.combine(t['params'], frozen), t['adapters'],
                     x['input_ids'], x['attention_mask'])
    return loss_of(logits, x)

  tx = adamw()
  step = jit_step(lora_train_step(loss, tx), xla_options=xla_options,
                  dtype=dtype)
  return Setup(step, (trainable, tx.init(trainable)), frozen,
               lorajax.count(trainable))


def make_setup(variant: str, config: bert_lib.BertConfig, batch: dict[str, Any],
               seed: int = 0, *, params: Any = None,
               adapters: Any = None, xla_options: bool = True) -> Setup:
  """Builds the train step of ``variant`` (not yet compiled).

  Args:
    variant: one of ``VARIANTS``.
    config: the model's shape (and compute dtype).
    batch: an example batch (for initialization shapes).
    seed: seeds the parameters and adapters that are not given.
    params: the model's parameters; ``None`` initializes them randomly.
    adapters: the LoRA adapters (``lorajax.init``'s layout); ``None``
      initializes them.
    xla_options: jit with ``lorajax.compiler_options()``.
  """
  model = bert_lib.Bert(config)
  if params is None:
    params = model.init(jax.random.key(seed), batch['input_ids'])['params']

  def apply(p, ids, mask):
    return model.apply({'params': p}, ids, mask).logits

  spec = lora_spec(variant)
  if variant != 'full' and adapters is None:
    adapters = lorajax.init(spec, params, jax.random.key(seed + 1))
  if variant in ('lora', 'lora_all'):
    return lora_setup(apply, params, spec, adapters, classification_loss,
                      xla_options=xla_options, dtype=config.dtype)
  if variant == 'full':
    trainable, frozen = params, {}

    def loss(t, frozen, x):
      del frozen
      return classification_loss(
          apply(t, x['input_ids'], x['attention_mask']), x)
  else:  # lora_materialized: W + s·a·b formed inside the step.
    train, frozen = lorajax.partition(params, spec)
    trainable = {'adapters': adapters, 'params': train}

    def loss(t, frozen, x):
      p = lorajax.merge(lorajax.combine(t['params'], frozen), t['adapters'],
                        spec)
      return classification_loss(
          apply(p, x['input_ids'], x['attention_mask']), x)

  tx = adamw()
  step = jit_step(lora_train_step(loss, tx), xla_options=xla_options,
                  dtype=config.dtype)
  return Setup(step, (trainable, tx.init(trainable)), frozen,
               lorajax.count(trainable))


def make_batch(config: bert_lib.BertConfig, batch_size: int, seq_len: int,
               seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      'input_ids': rng.integers(0, config.vocab_size, (batch_size, seq_len),
                                dtype=np.int32),
      'attention_mask': np.ones((batch_size, seq_len), np.int32),
      'label': rng.integers(0, config.num_labels, (batch_size,),
                            dtype=np.int32),
  }


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of a compiled function (``cost_analysis()``), with
  the products of lorajax's fused CPU attention calls added
  (``cpu_attention.step_flops``: XLA counts a custom call as -1)."""
  return float(cpu_attention.step_flops(compiled))


def flops(setup: Setup, batch) -> float:
  return compiled_flops(
      setup.step.lower(setup.state, setup.frozen, batch).compile())


def peak_rss_in_subprocess(variant: str, batch_size: int, seq_len: int,
                           steps: int) -> float:
  """Peak RSS (MB) of a fresh process that runs ``steps`` steps."""
  cmd = [sys.executable, '-m', 'experiments.bench', 'core', '--variant',
         variant, '--batch_size', str(batch_size), '--seq_len', str(seq_len),
         '--steps', str(steps)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  for line in out.stdout.splitlines():
    if line.startswith('{'):
      return float(json.loads(line)['peak_rss_mb'])
  raise RuntimeError(f'no measurement in output of {cmd}: {out.stderr[-800:]}')


def peak_rss_mb() -> float:
  """Peak resident memory of this process image, in MB.

  Reads ``VmHWM`` from ``/proc/self/status``: unlike ``ru_maxrss``, it starts
  afresh at ``exec``, so a child process does not inherit its parent's peak.
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_one_variant(variant: str, batch_size: int, seq_len: int,
                        steps: int) -> dict[str, Any]:
  """Runs in a fresh process: compile and run ``steps`` steps, report RSS."""
  config = bert_lib.BertConfig.minilm_l6()
  batch = make_batch(config, batch_size, seq_len)
  setup = make_setup(variant, config, batch)
  state = setup.state
  for _ in range(steps):
    state, value = setup.step(state, setup.frozen, batch)
  jax.block_until_ready(value)
  return {'variant': variant, 'peak_rss_mb': round(peak_rss_mb(), 1)}


def run(variants=VARIANTS, *, batch_size: int = 32, seq_len: int = 128,
        reps: int = 5, memory_steps: int = 3, log=print) -> list[dict[str, Any]]:
  """Measures every variant; returns one dict per variant."""
  config = bert_lib.BertConfig.minilm_l6()
  batch = make_batch(config, batch_size, seq_len)
  setups, results = {}, {}
  for v in variants:
    setups[v] = make_setup(v, config, batch)
    results[v] = {'variant': v, 'flops_per_step': flops(setups[v], batch),
                  'trainable_params': setups[v].trainable_params}
    log(f'compiled {v}: {results[v]["flops_per_step"] / 1e9:.1f} GFLOP/step')
  states = {v: setups[v].state for v in variants}
  for v in variants:  # warm-up: first execution
    states[v], value = setups[v].step(states[v], setups[v].frozen, batch)
    jax.block_until_ready(value)
  times = {v: [] for v in variants}
  for r in range(reps):
    for v in variants:
      t0 = time.perf_counter()
      states[v], value = setups[v].step(states[v], setups[v].frozen, batch)
      jax.block_until_ready(value)
      times[v].append(time.perf_counter() - t0)
    log(f'repetition {r + 1}/{reps}: ' + ', '.join(
        f'{v} {times[v][-1] * 1e3:.0f} ms' for v in variants))
  del setups, states
  for v in variants:
    results[v]['step_ms_median'] = round(statistics.median(times[v]) * 1e3, 1)
    results[v]['step_ms_min'] = round(min(times[v]) * 1e3, 1)
    results[v]['step_ms_max'] = round(max(times[v]) * 1e3, 1)
    log(f'measuring peak RSS of {v} in a fresh process')
    results[v]['peak_rss_mb'] = peak_rss_in_subprocess(
        v, batch_size, seq_len, memory_steps)
  return [results[v] for v in variants]


def table(rows: list[dict[str, Any]]) -> str:
  """A markdown table with ratios against ``full``."""
  ref = next((r for r in rows if r['variant'] == 'full'), rows[0])
  lines = ['| variant | trainable params | GFLOP/step | × full | step ms '
           '(median) | × full | peak RSS MB | × full |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
        f"| {r['variant']} | {r['trainable_params']:,d} | "
        f"{r['flops_per_step'] / 1e9:.1f} | "
        f"{r['flops_per_step'] / ref['flops_per_step']:.3f} | "
        f"{r['step_ms_median']:.0f} | "
        f"{r['step_ms_median'] / ref['step_ms_median']:.3f} | "
        f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.3f} |")
  return '\n'.join(lines)
