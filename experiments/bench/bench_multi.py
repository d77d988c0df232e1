r"""Per-example adapters: a batch mixing 4 adapters vs one merged adapter.

  python -m experiments.bench.bench_multi               # MiniLM and SmolLM2
  python -m experiments.bench.bench_multi --models=minilm --reps=9 --json

For each model, four random LoRA adapters (rank ``--rank``, on ``--targets``)
are stacked into ``MultiLora`` and one batch whose examples cycle through the
four is run in one compiled function (``mixed4-gather`` and ``mixed4-dense``,
the two ways ``MultiLora`` computes the low-rank path; its default ``'auto'``
picks ``dense`` for these shapes). The reference is the
same batch with adapter 0 merged into the kernels (``merged``: the plain
model, no LoRA cost at all); ``lora-1`` runs one unmerged adapter for context.

Workloads: MiniLM encodes ``B x T`` tokens; SmolLM2 prefills ``B x T`` tokens
and decodes one token per example against a KV cache. Variants are timed in
interleaved repetitions (each repetition times every variant once, in turn)
and the medians are compared; ratio = merged time / variant time, i.e. the
mixed batch's throughput relative to the merged one (1.0 = no cost).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import lorajax
from lorajax.methods import multi
from lorajax.models import bert
from lorajax.models import bert_loading
from lorajax.models import llama
from lorajax.models import llama_loading

_MODELS = flags.DEFINE_list('models', ['minilm', 'smollm2'],
                            'Models to measure: minilm, smollm2.')
_REPS = flags.DEFINE_integer('reps', 7, 'Interleaved repetitions.')
_INNER = flags.DEFINE_integer('inner', 3, 'Calls timed per repetition.')
_RANK = flags.DEFINE_integer('rank', 8, 'LoRA rank of each adapter.')
_TARGETS = flags.DEFINE_enum('targets', 'qv', ['qv', 'all'],
                             'qv: query/value projections; all: every '
                             'projection of the blocks.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON line per row.')

TARGETS = {
    ('minilm', 'qv'): r'.*/attention/(query|value)/kernel',
    ('minilm', 'all'): r'encoder/.*/kernel',
    ('smollm2', 'qv'): r'.*/attn/(q|v)_proj/kernel',
    ('smollm2', 'all'): r'layers_\d+/.*_proj/kernel',
}
SHAPES = {'minilm': dict(batch=32, seq=128), 'smollm2': dict(batch=8, seq=64)}
N_ADAPTERS = 4


def _adapters(spec, params, n: int) -> list[Any]:
  out = []
  for i in range(n):
    rng = np.random.default_rng(i)
    ad = lorajax.init(spec, params, jax.random.key(i))
    out.append(jax.tree.map(
        lambda x, rng=rng: jnp.asarray(
            np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32)),
        ad))
  return out


def _variants(apply_fn, params, spec, adapters, batch: int
              ) -> dict[str, Callable[..., Any]]:
  """name -> f(*args, **kwargs) running the batch that way (jitted)."""
  merged = lorajax.merge(params, adapters[0], spec)
  base = jax.jit(apply_fn)
  one = jax.jit(lorajax.lora(apply_fn, spec))
  idx = jnp.arange(batch, dtype=jnp.int32) % N_ADAPTERS
  out = {'merged': lambda *a, **k: base(merged, *a, **k),
         'lora-1': lambda *a, **k: one(params, adapters[0], *a, **k)}
  for mode in ('gather', 'dense'):
    mspec, stacked = multi.stack_adapters(
        [(ad, spec) for ad in adapters], params, mode=mode)
    fn = jax.jit(lorajax.lora(apply_fn, mspec))
    out[f'mixed4-{mode}'] = (
        lambda *a, fn=fn, stacked=stacked, **k: fn(params, stacked, *a,
                                                   lora_context=idx, **k))
  return out


def _time(variants: dict[str, Callable[[], Any]], reps: int, inner: int
          ) -> dict[str, list[float]]:
  """Seconds per call, ``reps`` interleaved repetitions of ``inner`` calls."""
  for f in variants.values():          # compile and warm up
    jax.block_until_ready(f())
    jax.block_until_ready(f())
  times = {name: [] for name in variants}
  for _ in range(reps):
    for name, f in variants.items():
      start = time.perf_counter()
      for _ in range(inner):
        out = f()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / inner)
  return times


def _rows(model: str, workload: str, tokens: int, times) -> list[dict]:
  ref = statistics.median(times['merged'])
  rows = []
  for name, ts in times.items():
    med = statistics.median(ts)
    rows.append(dict(model=model, workload=workload, variant=name,
                     median_ms=1e3 * med, min_ms=1e3 * min(ts),
                     max_ms=1e3 * max(ts), tokens_per_s=tokens / med,
                     ratio_vs_merged=ref / med))
  return rows


def bench_minilm(targets: str, rank: int, reps: int, inner: int) -> list[dict]:
  config, params = bert_loading.load_minilm(num_labels=2)
  model = bert.Bert(config)
  apply_fn = lambda p, *a: model.apply({'params': p}, *a).logits
  spec = lorajax.LoraSpec([(TARGETS['minilm', targets],
                            lorajax.Lora(rank=rank, alpha=2 * rank)),
                           ('.*', 'freeze')])
  b, t = SHAPES['minilm']['batch'], SHAPES['minilm']['seq']
  ids = jax.random.randint(jax.random.key(0), (b, t), 1000, 20000)
  variants = _variants(apply_fn, params, spec,
                       _adapters(spec, params, N_ADAPTERS), b)
  times = _time({k: (lambda f=f: f(ids)) for k, f in variants.items()},
                reps, inner)
  return _rows('minilm', f'encode {b}x{t}', b * t, times)


def bench_smollm2(targets: str, rank: int, reps: int, inner: int
                  ) -> list[dict]:
  config, params = llama_loading.load_smollm2()
  model = llama.Llama(config)
  apply_fn = lambda p, *a, **k: model.apply({'params': p}, *a, **k)
  spec = lorajax.LoraSpec([(TARGETS['smollm2', targets],
                            lorajax.Lora(rank=rank, alpha=2 * rank)),
                           ('.*', 'freeze')])
  b, t = SHAPES['smollm2']['batch'], SHAPES['smollm2']['seq']
  tokens = jax.random.randint(jax.random.key(0), (b, t), 100, 40000)
  variants = _variants(apply_fn, params, spec,
                       _adapters(spec, params, N_ADAPTERS), b)
  rows = []
  times = _time({k: (lambda f=f: f(tokens)) for k, f in variants.items()},
                reps, inner)
  rows += _rows('smollm2', f'prefill {b}x{t}', b * t, times)
  _, cache = jax.jit(apply_fn, static_argnames='cache_len')(
      params, tokens, cache_len=t + 8)
  step = tokens[:, :1]
  ones = jnp.ones((b, 1), bool)
  times = _time({k: (lambda f=f: f(step, attention_mask=ones, cache=cache))
                 for k, f in variants.items()}, reps, 4 * inner)
  rows += _rows('smollm2', f'decode {b}x1 (cache {t})', b, times)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  benches = {'minilm': bench_minilm, 'smollm2': bench_smollm2}
  rows = []
  for name in _MODELS.value:
    if name not in benches:
      raise app.UsageError(f'--models: {name!r} is not one of '
                           f'{sorted(benches)}')
    rows += benches[name](_TARGETS.value, _RANK.value, _REPS.value,
                          _INNER.value)
  if _JSON.value:
    for r in rows:
      print(json.dumps(r))
    return
  print(f'\n{N_ADAPTERS} adapters, LoRA rank {_RANK.value} on {_TARGETS.value}'
        f', float32, {jax.devices()[0].platform}; medians of {_REPS.value} '
        f'interleaved repetitions (x{_INNER.value} calls); ratio = merged '
        f'time / variant time (mixed-batch throughput relative to one merged '
        f'adapter)\n')
  print(f'{"model":8} {"workload":22} {"variant":14} {"median ms":>10} '
        f'{"min-max ms":>17} {"tokens/s":>10} {"ratio":>6}')
  for r in rows:
    print(f'{r["model"]:8} {r["workload"]:22} {r["variant"]:14} '
          f'{r["median_ms"]:10.2f} {r["min_ms"]:8.2f}-{r["max_ms"]:<8.2f} '
          f'{r["tokens_per_s"]:10.0f} {r["ratio_vs_merged"]:6.2f}')


if __name__ == '__main__':
  app.run(main)
