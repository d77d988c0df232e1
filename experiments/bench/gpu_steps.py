r"""bf16 LoRA and full train steps of decoders on an accelerator: step time,
tokens/s, XLA FLOPs and MFU, peak device memory.

One script for a lent GPU (issue 18): it builds each decoder with random
weights, compiles its LoRA (q/v, rank 8) and full fine-tuning steps in
bfloat16 compute (float32 parameters and AdamW state), times ``--steps``
steps after two of warm-up, and prints one Markdown row and one JSON line
per step kind::

  python -m experiments.bench.gpu_steps --out=/tmp/gpu_steps.jsonl
  python -m experiments.bench.gpu_steps --models=smollm2 --kinds=lora \
      --batch=8 --seq=2048

MFU is XLA's FLOP count of the compiled step ÷ its median time ÷ the
device's dense bf16 peak (``PEAK_TFLOPS`` by ``device_kind``, or
``--peak_tflops``). ``--tiny`` shrinks every model to two narrow layers so
the script runs on a CPU in seconds (what the tests do); its figures mean
nothing.

Models (random weights, the published shapes):

- ``smollm2``: SmolLM2-135M (576 wide, 30 layers, 9 heads / 3 KV heads,
  vocabulary 49,152, tied embeddings);
- ``llama1b``: a 1B-class Llama (Llama-3.2-1B's shape: 2,048 wide, 16
  layers, 32 / 8 heads, MLP 8,192, vocabulary 128,256, tied embeddings).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

import lorajax
from experiments.bench import bench_core
from lorajax.models import llama

# Dense bfloat16 peak of a device, TFLOP/s (vendor figures, without sparsity).
PEAK_TFLOPS = {
    'NVIDIA H200': 989.5,
    'NVIDIA H100 80GB HBM3': 989.5,
    'NVIDIA H100 PCIe': 756.5,
    'NVIDIA A100-SXM4-80GB': 312.0,
    'NVIDIA A100-SXM4-40GB': 312.0,
    'NVIDIA L4': 121.0,
}

MODELS = {
    'smollm2': dict(hidden_size=576, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, intermediate_size=1536,
                    vocab_size=49152, tie_embeddings=True),
    'llama1b': dict(hidden_size=2048, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, intermediate_size=8192,
                    vocab_size=128256, tie_embeddings=True,
                    rope_base=500000.0),
}
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=256)
KINDS = ('lora', 'full')

def _define_flags() -> dict[str, Any]:
  """The script's flags, defined only when it runs (the tests import this
  module next to others that define ``--steps``)."""
  return {
      'models': flags.DEFINE_list('models', list(MODELS), 'Decoders to run.'),
      'kinds': flags.DEFINE_list('kinds', list(KINDS),
                                 'Steps: lora and/or full.'),
      'batch': flags.DEFINE_integer('batch', 8, 'Sequences a step.'),
      'seq': flags.DEFINE_integer('seq', 2048, 'Tokens a sequence.'),
      'steps': flags.DEFINE_integer('steps', 10,
                                    'Timed steps (after 2 warm-up).'),
      'remat': flags.DEFINE_enum('remat', 'none', ['none', 'layer', 'dots'],
                                 'LlamaConfig.remat.'),
      'peak': flags.DEFINE_float('peak_tflops', None, "The device's dense "
                                 'bf16 peak; default: PEAK_TFLOPS by device '
                                 'kind.'),
      'tiny': flags.DEFINE_bool('tiny', False,
                                'Two narrow layers (a CPU check).'),
      'out': flags.DEFINE_string('out', None, 'Append JSON lines here too.'),
  }


def peak_tflops(device: Any, given: float | None) -> float:
  """``given``, else the table's figure for ``device``.

  Raises:
    ValueError: neither, naming the device kind.
  """
  if given:
    return given
  if device.device_kind in PEAK_TFLOPS:
    return PEAK_TFLOPS[device.device_kind]
  raise ValueError(f'no bf16 peak known for device_kind='
                   f'{device.device_kind!r}; pass --peak_tflops')


def build(model: str, kind: str, batch: int, seq: int, *, tiny: bool,
          remat: str = 'none') -> tuple[Any, Any, Any, dict[str, Any], int]:
  """(jitted step, state, frozen, batch, trainable parameter count)."""
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}; expected one of {KINDS}')
  fields = dict(MODELS[model], **(TINY if tiny else {}))
  cfg = llama.LlamaConfig(**fields, dtype=jnp.bfloat16, remat=remat)
  net = llama.Llama(cfg)
  ids = jax.random.randint(jax.random.key(0), (batch, seq), 0,
                           cfg.vocab_size)
  x = {'input_ids': ids, 'attention_mask': jnp.ones_like(ids)}
  params = jax.jit(net.init)(jax.random.key(1), ids[:, :8])['params']

  def apply(p, i, m):
    return net.apply({'params': p}, i, attention_mask=m)

  def loss_of(logits, x):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), x['input_ids'][:, 1:]).mean()

  if kind == 'lora':
    spec = lorajax.LoraSpec([
        (r'layers_\d+/attn/(q|v)_proj/kernel', lorajax.Lora(rank=8,
                                                            alpha=16)),
        (r'.*', 'freeze')])
    s = bench_core.lora_setup(apply, params, spec,
                              lorajax.init(spec, params, jax.random.key(2)),
                              loss_of, dtype=jnp.bfloat16)
    return s.step, s.state, s.frozen, x, s.trainable_params

  def loss(t, frozen, x):
    del frozen
    return loss_of(apply(t, x['input_ids'], x['attention_mask']), x)

  tx = bench_core.adamw()
  step = bench_core.jit_step(bench_core.lora_train_step(loss, tx),
                             dtype=jnp.bfloat16)
  count = sum(v.size for v in jax.tree.leaves(params))
  return step, (params, tx.init(params)), {}, x, count


def measure(model: str, kind: str, *, batch: int, seq: int, steps: int,
            tiny: bool, remat: str, peak: float) -> dict[str, Any]:
  """Compiles and times one step kind of ``model``."""
  t0 = time.perf_counter()
  step, state, frozen, x, trainable = build(model, kind, batch, seq,
                                            tiny=tiny, remat=remat)
  compiled = step.lower(state, frozen, x).compile()
  flops = bench_core.compiled_flops(compiled)
  compile_s = time.perf_counter() - t0
  times, losses = [], []
  for i in range(steps + 2):
    t = time.perf_counter()
    state, loss = compiled(state, frozen, x)
    losses.append(float(jax.block_until_ready(loss)))
    if i >= 2:
      times.append(time.perf_counter() - t)
  median = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  peak_bytes = stats.get('peak_bytes_in_use')
  return {
      'model': model, 'kind': kind, 'tiny': tiny, 'batch': batch, 'seq': seq,
      'remat': remat, 'device': jax.devices()[0].device_kind,
      'trainable_params': int(trainable), 'compile_s': round(compile_s, 1),
      'step_ms_median': round(median * 1e3, 2),
      'step_ms_min': round(min(times) * 1e3, 2),
      'step_ms_max': round(max(times) * 1e3, 2),
      'tokens_per_s': round(batch * seq / median, 1),
      'xla_flops_per_step': flops,
      'mfu': round(flops / median / (peak * 1e12), 4),
      'peak_tflops': peak,
      'peak_device_gb': (None if peak_bytes is None
                         else round(peak_bytes / 2**30, 2)),
      'losses': [round(v, 5) for v in losses],
  }


def row(m: dict[str, Any]) -> str:
  mem = '' if m['peak_device_gb'] is None else f"{m['peak_device_gb']:.1f}"
  return (f"| {m['model']} | {m['kind']} | {m['batch']}×{m['seq']} | "
          f"{m['step_ms_median']:,.1f} ({m['step_ms_min']:,.1f}–"
          f"{m['step_ms_max']:,.1f}) | {m['tokens_per_s']:,.0f} | "
          f"{m['xla_flops_per_step'] / 1e12:.2f} | {m['mfu']:.1%} | {mem} |")


def main(argv, f: dict[str, Any]):
  del argv
  for model in f['models'].value:
    if model not in MODELS:
      raise app.UsageError(f'--models has {model!r}; expected some of '
                           f'{sorted(MODELS)}')
  for kind in f['kinds'].value:
    if kind not in KINDS:
      raise app.UsageError(f'--kinds has {kind!r}; expected some of {KINDS}')
  peak = peak_tflops(jax.devices()[0], f['peak'].value)
  print(f'device {jax.devices()[0].device_kind}, bf16 peak {peak} TFLOP/s, '
        f'jax {jax.__version__}', flush=True)
  print('| model | step | tokens | ms (min–max) | tokens/s | XLA TFLOP | '
        'MFU | peak GB |\n|---|---|---|---:|---:|---:|---:|---:|', flush=True)
  for model in f['models'].value:
    for kind in f['kinds'].value:
      m = measure(model, kind, batch=f['batch'].value, seq=f['seq'].value,
                  steps=f['steps'].value, tiny=f['tiny'].value,
                  remat=f['remat'].value, peak=peak)
      print(row(m), flush=True)
      if f['out'].value:
        with open(f['out'].value, 'a') as out:
          out.write(json.dumps(m) + '\n')


if __name__ == '__main__':
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
