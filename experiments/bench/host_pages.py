r"""A LoRA step with and without lorajax's block cache, alone, per step.

With ``LORAJAX_HOST_PAGES=kept``, lorajax's commands start with a block
cache preloaded that keeps a step's buffers mapped. This runs the same step
in fresh processes with it and with glibc's defaults (``--modes``),
alternated, and prints for each
step its wall time, minor page faults, user and system CPU time and the
process's peak RSS (``getrusage``)::

  python -m experiments.bench.host_pages --model=minilm --steps=7 --runs=2
  python -m experiments.bench.host_pages --model=smollm2 --steps=5

``minilm``: the shipped BERT at MiniLM shape, LoRA q/v, 32x128 tokens;
``smollm2``: a SmolLM2-135M-shaped Llama with random weights, LoRA q/v,
8x256 tokens (~5.5 GB). The first step of each process is left out of the
medians (it maps everything for the first time).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from lorajax.runtime import host_memory

_MODEL = flags.DEFINE_enum('model', 'minilm', ['minilm', 'smollm2'],
                           'The step to run.')
_STEPS = flags.DEFINE_integer('steps', 6, 'Steps per process.')
_RUNS = flags.DEFINE_integer('runs', 2, 'Processes per setting, alternated.')
_MODES = flags.DEFINE_list(
    'modes', ['kept', 'default'],
    'Settings to alternate: kept (LORAJAX_HOST_PAGES=kept, the block '
    'cache), default (glibc defaults).')
_CHILD = flags.DEFINE_bool('child', False, 'Run the steps in this process '
                           'and print one JSON line per step.')


def _build(model: str):
  """(compiled step, state, frozen, batch) of ``model``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import lorajax  # pylint: disable=g-import-not-at-top
  from experiments.bench import bench_core  # pylint: disable=g-import-not-at-top
  if model == 'minilm':
    from lorajax.models import bert  # pylint: disable=g-import-not-at-top
    cfg = bert.BertConfig(vocab_size=30522, hidden_size=384, num_layers=6,
                          num_heads=12, intermediate_size=1536,
                          max_position=512, num_labels=2, hidden_dropout=0.0,
                          attention_dropout=0.0)
    batch = {k: jnp.asarray(v)
             for k, v in bench_core.make_batch(cfg, 32, 128).items()}
    s = bench_core.make_setup('lora', cfg, batch)
  else:
    from lorajax.models import llama  # pylint: disable=g-import-not-at-top
    cfg = llama.LlamaConfig(hidden_size=576, num_layers=30, num_heads=9,
                            num_kv_heads=3, head_dim=64,
                            intermediate_size=1536, vocab_size=49152)
    ids = jax.random.randint(jax.random.key(0), (8, 256), 0, cfg.vocab_size)
    net = llama.Llama(cfg)
    params = net.init(jax.random.key(1), ids[:, :4])['params']
    spec = lorajax.LoraSpec([
        (r'layers_\d+/attn/(q|v)_proj/kernel', lorajax.Lora(rank=8, alpha=16)),
        (r'.*', 'freeze')])
    batch = {'input_ids': ids, 'attention_mask': jnp.ones_like(ids)}
    s = bench_core.lora_setup(
        lambda p, x, m: net.apply({'params': p}, x, attention_mask=m),
        params, spec, lorajax.init(spec, params, jax.random.key(2)),
        lambda lg, x: optax.softmax_cross_entropy_with_integer_labels(
            lg[:, :-1], x['input_ids'][:, 1:]).mean())
  compiled = s.step.lower(s.state, s.frozen, batch).compile(
      compiler_options=lorajax.compiler_options())
  return compiled, s.state, s.frozen, batch


def _child(model: str, steps: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  compiled, state, frozen, batch = _build(model)
  for i in range(steps):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    state, loss = compiled(state, frozen, batch)
    jax.block_until_ready(loss)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        'step': i, 'ms': round(wall * 1e3, 1),
        'minor_faults': r1.ru_minflt - r0.ru_minflt,
        'user_s': round(r1.ru_utime - r0.ru_utime, 2),
        'sys_s': round(r1.ru_stime - r0.ru_stime, 2),
        'peak_rss_mb': r1.ru_maxrss // 1024, 'loss': float(loss)}),
          flush=True)


def _run(model: str, steps: int, which: str) -> list[dict]:
  env = host_memory.without(dict(os.environ, JAX_PLATFORMS='cpu'))
  if which == 'kept':
    env = host_memory.environ(env)
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.bench.host_pages', '--child',
       f'--model={model}', f'--steps={steps}'],
      env=env, capture_output=True, text=True, check=True)
  return [json.loads(line) for line in out.stdout.splitlines()
          if line.startswith('{')]


def main(argv):
  del argv
  if _CHILD.value:
    _child(_MODEL.value, _STEPS.value)
    return
  why = host_memory.unsupported({'JAX_PLATFORMS': 'cpu'})
  if why is not None:
    raise app.UsageError(f'the block cache does not apply here: {why}')
  for which in _MODES.value:
    if which not in ('kept', 'default'):
      raise app.UsageError(f'--modes has {which!r}; expected kept and/or '
                           'default')
  runs = {m: [] for m in _MODES.value}
  for r in range(_RUNS.value):
    for which in _MODES.value:
      steps = _run(_MODEL.value, _STEPS.value, which)
      runs[which].append(steps)
      for s in steps:
        print(f'run {r + 1} {which:8s} step {s["step"]}: {s["ms"]:9,.0f} ms'
              f'  faults {s["minor_faults"]:9,d}  user {s["user_s"]:6.2f} s'
              f'  sys {s["sys_s"]:5.2f} s  peak RSS {s["peak_rss_mb"]:,} MB',
              flush=True)
  print(f'\n{_MODEL.value}, load average {os.getloadavg()[0]:.2f}: median '
        f'of steps 2..{_STEPS.value} of each process')
  for which in _MODES.value:
    for r, steps in enumerate(runs[which]):
      rest = steps[1:]
      print(f'  {which:8s} run {r + 1}: '
            f'{statistics.median(s["ms"] for s in rest):9,.0f} ms, '
            f'{statistics.median(s["minor_faults"] for s in rest):11,.0f} '
            f'faults, sys {statistics.median(s["sys_s"] for s in rest):.2f} '
            f's, peak RSS {steps[-1]["peak_rss_mb"]:,} MB')


if __name__ == '__main__':
  app.run(main)
