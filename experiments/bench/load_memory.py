"""Peak host memory of ``lorajax.models.load`` on a checkpoint of >= 1 GB.

``python -m experiments.bench.load_memory [--dtype bfloat16] [--layers 8]``

The benchmark writes a random Llama-shaped Hugging Face checkpoint
(``config.json``, sharded ``model-0000k-of-0000n.safetensors`` and their
index, as ``save_pretrained`` lays them out; 2048 wide, 8 layers and a 32k
vocabulary: 542M parameters, 1.08 GB in bfloat16) into a temporary folder,
then loads it in a fresh process and reports

- ``param_bytes``: the bytes of the loaded parameters (stored dtype kept:
  a bfloat16 checkpoint must load as bfloat16),
- ``rss_before``: the process's resident memory just before ``load``
  (Python, numpy, jax and its CPU client),
- ``peak``: the process's peak resident memory after ``load`` (``ru_maxrss``),
- ``ratio = (peak - rss_before) / param_bytes``: the memory that loading
  needed per byte of parameters. One tensor at a time means a ratio near
  1; reading every tensor, then copying the lot, means about 2.

Every figure is measured in the run; nothing is assumed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# A Llama-2/TinyLlama-like width, few layers: big enough to be >= 1 GB.
_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000)


def write_checkpoint(directory: pathlib.Path, *, layers: int, dtype: str,
                     shard_bytes: int = 400 << 20) -> int:
  """Writes a random Llama checkpoint; returns its parameters' bytes."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from lorajax.models import hf_decoders  # pylint: disable=g-import-not-at-top
  from lorajax.models import llama_layout  # pylint: disable=g-import-not-at-top

  hf = dict(_SHAPE, model_type='llama', architectures=['LlamaForCausalLM'],
            num_hidden_layers=layers, max_position_embeddings=2048,
            rms_norm_eps=1e-5, tie_word_embeddings=False, dtype=dtype,
            rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})
  config = hf_decoders.decoder_config(hf)
  shapes = llama_layout.expected_shapes(config.replace(scan_layers=False))
  keys = hf_decoders.hf_keys(config, 'model.')
  tensors = {keys[p]: (s[::-1] if p.endswith('/kernel') else s)
             for p, s in shapes.items()}
  tensors['lm_head.weight'] = (config.vocab_size, config.hidden_size)
  np_dtype = ml_dtypes.bfloat16 if dtype == 'bfloat16' else np.dtype(dtype)
  rng = np.random.default_rng(0)
  shards, current, size = [], {}, 0
  for key, shape in tensors.items():
    current[key] = (rng.standard_normal(shape, np.float32) * 0.02).astype(
        np_dtype)
    size += current[key].nbytes
    if size >= shard_bytes:
      shards.append(current)
      current, size = {}, 0
  if current:
    shards.append(current)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    st_numpy.save_file(shard, str(directory / name))
    for key, value in shard.items():
      weight_map[key] = name
      total += value.nbytes
  (directory / 'model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {'total_size': total}, 'weight_map': weight_map}))
  (directory / 'config.json').write_text(json.dumps(hf))
  return total


def _rss_bytes() -> int:
  """Current resident set size (Linux ``/proc/self/statm``)."""
  pages = int(pathlib.Path('/proc/self/statm').read_text().split()[1])
  return pages * resource.getpagesize()


def measure(directory: str) -> dict[str, float]:
  """Loads ``directory`` in this process; returns the memory figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lorajax.models  # pylint: disable=g-import-not-at-top
  jnp.zeros(1).block_until_ready()  # The CPU client exists before we start.
  before = _rss_bytes()
  start = time.perf_counter()
  model = lorajax.models.load(directory)
  leaves = jax.tree.leaves(model.params)
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  param_bytes = sum(x.nbytes for x in leaves)
  return {'param_bytes': param_bytes, 'rss_before': before, 'peak': peak,
          'ratio': (peak - before) / param_bytes, 'load_s': seconds,
          'dtypes': sorted({str(x.dtype) for x in leaves}),
          'tensors': len(leaves)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtype', default='bfloat16',
                      choices=('bfloat16', 'float32'))
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--measure', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.measure:  # The fresh process.
    print(json.dumps(measure(args.measure)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    total = write_checkpoint(pathlib.Path(tmp), layers=args.layers,
                             dtype=args.dtype)
    print(f'wrote a {total / 1e9:.2f} GB {args.dtype} Llama checkpoint '
          f'({args.layers} layers) in {time.perf_counter() - start:.0f} s')
    out = subprocess.run(
        [sys.executable, '-m', 'experiments.bench.load_memory',
         '--measure', tmp], check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
  gb = 1e9
  print(f'parameters  {row["param_bytes"] / gb:.3f} GB in {row["tensors"]} '
        f'tensors, dtypes {row["dtypes"]}')
  print(f'RSS before  {row["rss_before"] / gb:.3f} GB')
  print(f'peak RSS    {row["peak"] / gb:.3f} GB')
  print(f'ratio       {row["ratio"]:.3f} (peak - before) / parameter bytes; '
        f'load {row["load_s"]:.1f} s')
  print(json.dumps(row))


if __name__ == '__main__':
  main()
