"""Where the time of a user's own Flax BERT LoRA step goes.

``python -m experiments.bench.user_bert_where``: the ``flaxbert`` row's
model (``experiments.bench.flax_bert`` at MiniLM shape, random weights,
32 × 128 tokens with padding, LoRA r8 q/v through ``lorajax.lora``, jitted
with ``lorajax.compiler_options()``), compiled once; prints XLA's
temporaries, the step's FLOPs (``cpu_attention.step_flops``) and
``lorajax.profiling.op_time.breakdown``'s categories as JSON, then the ten
ops with the most time. Run it with ``LORAJAX_CPU_ATTENTION=xla
LORAJAX_ELEMENTWISE_REMAT=off`` for the step without the rewrite's fused
attention and activation regions. Run alone: the times are wall times.
"""

import json

import jax
import jax.numpy as jnp

import lorajax
from experiments.bench import bench_core
from experiments.bench import flax_bert
from lorajax.profiling import op_time
from lorajax.runtime import cpu_attention


def main() -> None:
  model = flax_bert.FlaxBert(hidden_size=384, num_layers=6, num_heads=12,
                             intermediate_size=1536, vocab_size=30522)
  b, t = 32, 128
  ids = jax.random.randint(jax.random.key(1), (b, t), 0, 30522)
  lens = jax.random.randint(jax.random.key(3), (b,), 40, t + 1)
  mask = (jnp.arange(t)[None] < lens[:, None]).astype(jnp.int32)
  batch = {'input_ids': ids, 'attention_mask': mask,
           'label': jnp.zeros((b,), jnp.int32)}
  params = model.init(jax.random.key(0), ids[:1], mask[:1])['params']
  spec = lorajax.LoraSpec([
      (flax_bert.TARGETS['qv'], lorajax.Lora(rank=8, alpha=16)),
      (r'classifier/.*', 'train'), (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, jax.random.key(2))

  def apply(p, i, m):
    return model.apply({'params': p}, i, m)

  setup = bench_core.lora_setup(apply, params, spec, adapters,
                                bench_core.classification_loss)
  compiled = setup.step.lower(setup.state, setup.frozen, batch).compile()
  print('temp MB', compiled.memory_analysis().temp_size_in_bytes / 2**20,
        'GFLOP', cpu_attention.step_flops(compiled) / 1e9)
  state = [setup.state]

  def run():
    state[0], value = compiled(state[0], setup.frozen, batch)
    return value

  result = op_time.breakdown(compiled.as_text(), run, steps=5)
  print(json.dumps({k: v for k, v in result.items() if k != 'top'},
                   indent=1))
  for row in result['top']:
    print(row)


if __name__ == '__main__':
  main()
