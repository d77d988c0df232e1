r"""Bytes and validation perplexity of SmolLM2-135M's frozen base, quantized.

Run (a few minutes on a 2-core CPU):

  python -m experiments.bench.quant_report [--num_sequences=8] \
      [--out=report.json]

The 210 projection kernels of the 30 layers (q, k, v, o, gate, up, down) are
stored as float32, bfloat16, int8 (absmax per output unit) or NF4 (blocks of
64, double-quantized scales). The tied embedding (which is also the LM head,
a gather the kernel rewrite cannot adapt) and the norms stay float32 in the
quantized formats. Perplexity is next-token perplexity on the first
``num_sequences`` packed windows of ``seq_len`` tokens of the Shakespeare
validation split (held-out plays), each format evaluated through
``lorajax.lora`` with the ``Quantized`` provider (dequantized at each
``dot_general``), computed in float32. For float32, int8 and NF4 the
compiled (not run) LoRA / QLoRA gradient step is also measured: XLA's
argument and temporary bytes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import lorajax
from lorajax import assets
from lorajax.data import sources
from lorajax.data import text
from lorajax.methods import qlora
from lorajax.methods import quant
from lorajax.models import bpe_tokenizer
from lorajax.models import llama
from lorajax.models import llama_loading

_NUM_SEQUENCES = flags.DEFINE_integer(
    'num_sequences', 8, 'Validation windows to evaluate.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per window.')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Shakespeare split.')
_OUT = flags.DEFINE_string('out', None, 'Optional JSON file for the figures.')

KERNELS = r'layers/(attn|mlp)/\w+_proj/kernel'
FORMATS = ('float32', 'bfloat16', 'int8', 'nf4')


def _windows(reader: Any) -> dict[str, np.ndarray]:
  tok = bpe_tokenizer.gguf_tokenizer(reader)
  eos = bpe_tokenizer.gguf_special_ids(reader)['eos']
  src = sources.get_source('shakespeare', _SPLIT.value)
  texts, data = [], None
  for i in range(len(src)):  # Tokenize only as many plays as needed.
    texts.append(src[i]['text'])
    data = text.pack_lm(texts, tok, seq_len=_SEQ_LEN.value, eos_id=eos)
    if len(data['inputs']) >= _NUM_SEQUENCES.value:
      break
  return {k: v[:_NUM_SEQUENCES.value] for k, v in data.items()}


def _perplexity(fn, params, data) -> float:
  logits = fn(params, jnp.asarray(data['inputs']))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, jnp.asarray(data['targets'])[..., None],
                             -1)[..., 0]
  mask = jnp.asarray(data['mask'], jnp.float32)
  return float(jnp.exp(jnp.sum(nll * mask) / jnp.sum(mask)))


def _kernel_stats(params: Any, spec: lorajax.LoraSpec) -> tuple[int, int]:
  """(bytes, parameters) of the targeted kernels as stored."""
  paths = lorajax.resolve(spec, params).adapted
  leaves = dict(lorajax.spec.flatten_paths(params))
  nbytes = sum(quant.quantized_nbytes(leaves[p]) for p in paths)
  count = sum(int(np.prod(lorajax.Quantized().kernel_aval(leaves[p]).shape))
              for p in paths)
  return nbytes, count


def _step_memory(model, stored, spec, data) -> tuple[int, int]:
  """(argument, temp) bytes of a compiled LoRA training step (not run)."""
  batch = {k: jnp.asarray(v[:2]) for k, v in data.items()}
  adapters = lorajax.init(spec, stored, jax.random.key(0), fn=model.apply,
                          args=(batch['inputs'],))
  fn = lorajax.lora(model.apply, spec)

  def step(adapters, frozen, batch):
    def loss(ad):
      logits = fn(frozen, ad, batch['inputs'])
      logp = jax.nn.log_softmax(logits, -1)
      nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)
      return jnp.mean(nll)
    return jax.grad(loss)(adapters)

  mem = jax.jit(step).lower(adapters, stored, batch).compile(
  ).memory_analysis()
  return mem.argument_size_in_bytes, mem.temp_size_in_bytes


def main(argv: Sequence[str]) -> None:
  del argv
  start = time.perf_counter()
  reader = llama_loading.as_reader(
      assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
  cfg, params = llama_loading.load_gguf_llama(reader, scan_layers=True)
  params = {'params': params}
  model = llama.Llama(cfg)
  data = _windows(reader)
  logging.info('model and %d windows of %d tokens in %.1f s',
               len(data['inputs']), _SEQ_LEN.value,
               time.perf_counter() - start)
  example = jnp.asarray(data['inputs'][:1])
  rows = []
  for fmt in FORMATS:
    t0 = time.perf_counter()
    if fmt in ('int8', 'nf4'):
      spec = lorajax.LoraSpec([(f'params/{KERNELS}', lorajax.Quantized(fmt)),
                               (r'.*', 'freeze')])
      stored = qlora.quantize_params(params, spec, fn=model.apply,
                                     args=(example,))
      fn = jax.jit(lambda p, x, spec=spec: lorajax.lora(model.apply, spec)(
          p, None, x))
    else:
      spec = lorajax.LoraSpec([(f'params/{KERNELS}', lorajax.Lora(rank=1)),
                               (r'.*', 'freeze')])
      stored = jax.tree.map(lambda x: x.astype(fmt), params)
      fn = jax.jit(lambda p, x: model.apply(
          jax.tree.map(lambda v: v.astype(jnp.float32), p), x))
    kernel_bytes, n_kernel = _kernel_stats(stored, spec)
    row = {'format': fmt, 'kernel_bytes': kernel_bytes,
           'bits_per_param': 8.0 * kernel_bytes / n_kernel,
           'base_bytes': quant.quantized_nbytes(stored),
           'perplexity': _perplexity(fn, stored, data)}
    if fmt != 'bfloat16':
      lora_rule = (lorajax.QLora(rank=8, alpha=16, quant=fmt)
                   if fmt in ('int8', 'nf4') else lorajax.Lora(8, 16))
      row['step_argument_bytes'], row['step_temp_bytes'] = _step_memory(
          model, stored, lorajax.LoraSpec([(f'params/{KERNELS}', lora_rule),
                                           (r'.*', 'freeze')]), data)
    rows.append(row)
    logging.info('%s done in %.1f s', fmt, time.perf_counter() - t0)

  n_all = lorajax.count(params)
  print(f'SmolLM2-135M frozen base: {n_all:,d} parameters, of which '
        f'{n_kernel:,d} in the 210 projection kernels '
        f'({n_all - n_kernel:,d} in the tied embedding and norms)')
  print(f'perplexity: Shakespeare {_SPLIT.value}, {len(data["inputs"])} x '
        f'{_SEQ_LEN.value} tokens\n')
  print('| format | kernels MiB | bits/param | whole base MiB | perplexity '
        '| LoRA step args MiB | LoRA step temp MiB |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    mem = ' | '.join(f'{r[k] / 2**20:.1f}' if k in r else '-' for k in (
        'step_argument_bytes', 'step_temp_bytes'))
    print(f'| {r["format"]} | {r["kernel_bytes"] / 2**20:.2f} | '
          f'{r["bits_per_param"]:.3f} | {r["base_bytes"] / 2**20:.2f} | '
          f'{r["perplexity"]:.3f} | {mem} |')
  print('\nLoRA step: rank 8 on all 210 kernels (QLoRA for int8 / nf4), '
        'batch 2, gradient only; XLA memory analysis of the compiled step.')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'parameters': n_all, 'kernel_parameters': n_kernel,
                 'windows': len(data['inputs']), 'seq_len': _SEQ_LEN.value,
                 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
