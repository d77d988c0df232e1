"""SmolLM2's LoRA step with XLA's own CPU products against YNNPACK's.

``python -m experiments.bench.ynn_dots [--reps 4]``

``lorajax.compiler_options()`` keeps YNNPACK out of float32 steps (its
fusions keep full-size constants alive; ``lorajax.runtime.compiler``). This
asks whether handing YNNPACK only the products
(``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``,
what a bfloat16 step uses) would make a float32 step faster. It compiles the
benchmark's SmolLM2-135M step (8 × 256 tokens, LoRA r8 on q/v, AdamW;
``experiments.bench.lorajax_setups.llama`` on the files
``experiments.bench.bench_inputs`` writes) both ways and runs them
alternately in one process, the order flipped every repetition. It prints
one JSON object: the median step of each, XLA's temporaries, the losses
(they must agree), the machine's float32 GEMM ceiling from the same run and
the load average. Run it alone (``chrt -f 1``): both cores are timed.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax

import lorajax
from experiments.bench import bench_inputs
from experiments.bench import gemm_ceiling
from experiments.bench import lorajax_setups

_REPS = flags.DEFINE_integer('reps', 4, 'Timed steps of each form.')
_WORKDIR = flags.DEFINE_string(
    'workdir', os.path.join(tempfile.gettempdir(), 'lorajax_ynn_dots'),
    'Where the checkpoint and batch are written (once).')

YNN_DOTS = {'xla_cpu_experimental_ynn_fusion_type':
            'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def main(argv):
  del argv
  row = bench_inputs.rows(['smollm2'], ['qv'], ['float32'])[0]
  os.makedirs(_WORKDIR.value, exist_ok=True)
  req = dict(bench_inputs.write_inputs(row, _WORKDIR.value, 8),
             model='llama', targets='qv', dtype='float32', jit='xla',
             remat=False, rank=8, alpha=16.0)
  setup, batch = lorajax_setups.llama(req)
  step = setup.step.__wrapped__   # jax.jit keeps the function it was given
  base = lorajax.compiler_options('cpu')
  forms = {'xla products': base, 'ynnpack products': {**base, **YNN_DOTS}}
  compiled, temps, states = {}, {}, {}
  for name, options in forms.items():
    compiled[name] = jax.jit(step, compiler_options=options).lower(
        setup.state, setup.frozen, batch).compile()
    temps[name] = compiled[name].memory_analysis().temp_size_in_bytes / 2**20
    states[name], loss = compiled[name](setup.state, setup.frozen, batch)
    jax.block_until_ready(loss)   # the first call maps the buffers
  times = {n: [] for n in forms}
  losses = {n: [] for n in forms}
  for rep in range(_REPS.value):
    for name in (list(forms) if rep % 2 == 0 else list(forms)[::-1]):
      t0 = time.perf_counter()
      states[name], loss = compiled[name](states[name], setup.frozen, batch)
      jax.block_until_ready(loss)
      times[name].append(time.perf_counter() - t0)
      losses[name].append(float(loss))
  ceiling = gemm_ceiling.measure('float32', reps=5)['gflops_median']
  print(json.dumps({
      'ceiling_gflops': ceiling,
      'load_avg_1m': float(open('/proc/loadavg').read().split()[0]),
      **{n: {'step_ms_median': 1e3 * statistics.median(times[n]),
             'xla_temp_mb': temps[n], 'losses': losses[n]} for n in forms}}))


if __name__ == '__main__':
  app.run(main)
