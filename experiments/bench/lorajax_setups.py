"""The lorajax step of each benchmark row, built from the driver's files.

One builder per model of ``experiments.bench.bench_inputs.MODELS``, each
``(request) -> (bench_core.Setup, batch)``:

- ``bert``: lorajax's shipped ``Bert`` (``bench_core.make_setup``);
- ``flaxbert``: a user's own plain Flax BERT (``experiments.bench.flax_bert``)
  with LoRA through ``lorajax.lora`` only;
- ``llama``: the Hugging Face checkpoint read by ``lorajax.models.load``
  (compute dtype and ``remat`` as its overrides), next-token cross entropy.
  A ``remat`` row runs what a long-sequence config runs (``config.remat =
  'layer'``, ``config.attn_chunk = ATTN_CHUNK``, ``config.loss_chunk =
  LOSS_CHUNK``): attention over blocks of queries and the head and cross
  entropy over chunks of tokens; the loss is the same. A row with
  ``loss_chunk`` (``smollm2_lc``) runs the head and cross entropy over
  chunks of that many tokens without remat (``config.loss_chunk``).

Every LoRA ``a`` is the file's PEFT ``lora_A`` transposed, so both
frameworks start from the same adapters. The request's ``dtype`` is the
compute dtype (parameters, adapters and optimizer state stay float32, as
``config.model.dtype='bfloat16'`` runs); ``jit`` is ``'xla'`` for
``lorajax.compiler_options()`` or ``'plain'`` for a bare ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from safetensors import safe_open

import lorajax
from experiments.bench import bench_core
from experiments.bench import flax_bert
from lorajax import models
from lorajax import spec as spec_lib
from lorajax.models import bert as bert_lib
from lorajax.models import bert_loading
from lorajax.models import hf_decoders
from lorajax.models import lm_head

PyTree = Any
Batch = dict[str, jax.Array]

# What a user writes to target the kernels of each ``targets`` choice.
BERT_VARIANT = {'qv': 'lora', 'all': 'lora_all'}
LLAMA_TARGETS = {
    'qv': r'layers_\d+/attn/(q|v)_proj/kernel',
    # PEFT's 'all-linear' on a Llama: every projection of the blocks.
    'all': r'layers_\d+/(attn|mlp)/\w+_proj/kernel',
}


def read_batch(path: str, names: tuple[str, ...]) -> Batch:
  """``batch.<name>`` tensors of the driver's file."""
  with safe_open(path, framework='numpy') as f:
    return {k: jnp.asarray(f.get_tensor(f'batch.{k}')) for k in names}


def load_adapters(path: str, adapters: PyTree,
                  module_of: Callable[[str], str]) -> PyTree:
  """Replaces each adapter's ``a`` by the file's PEFT ``lora_A`` (``a.T``).

  Args:
    path: the driver's file with ``lora.<module>.A`` ``[r, in]`` tensors.
    adapters: ``lorajax.init``'s tree (``<kernel path>/a``, ``.../b``).
    module_of: kernel path -> Hugging Face module name.
  """
  out: dict[str, Any] = {}
  with safe_open(path, framework='numpy') as f:
    for leaf_path, value in spec_lib.flatten_paths(adapters):
      kernel_path, name = leaf_path.rsplit('/', 1)
      if name == 'a':
        value = jnp.asarray(f.get_tensor(f'lora.{module_of(kernel_path)}.A').T)
      spec_lib.set_by_path(out, leaf_path, value)
  return out


def _lora(req: dict[str, Any]) -> lorajax.Lora:
  return lorajax.Lora(rank=req['rank'], alpha=req['alpha'])


def _bert_hf_key(flax_key: str) -> str:
  """The ``BertForSequenceClassification`` key of a ``bert_loading`` name."""
  return flax_key if flax_key.startswith('classifier') else 'bert.' + flax_key


def _load_bert_params(path: str, config: bert_lib.BertConfig) -> PyTree:
  """``Bert`` parameters from Hugging Face tensors, read one at a time."""
  params: dict[str, Any] = {}
  with safe_open(path, framework='numpy') as f:
    for flax_path, hf in bert_loading.hf_key_map(config).items():
      value = f.get_tensor(_bert_hf_key(hf))
      if flax_path.endswith('/kernel'):
        value = value.T
      spec_lib.set_by_path(params, flax_path,
                           jnp.asarray(value, config.param_dtype))
  return params


def bert(req: dict[str, Any]) -> tuple[bench_core.Setup, Batch]:
  """lorajax's shipped BERT classifier."""
  config = bert_lib.BertConfig(
      vocab_size=req['vocab_size'], hidden_size=req['hidden_size'],
      num_layers=req['num_layers'], num_heads=req['num_heads'],
      intermediate_size=req['intermediate_size'],
      max_position=req['max_position'], num_labels=req['num_labels'],
      hidden_dropout=0.0, attention_dropout=0.0,
      dtype=jnp.dtype(req['dtype']))
  variant = BERT_VARIANT[req['targets']]
  batch = read_batch(req['weights'], ('input_ids', 'attention_mask', 'label'))
  params = _load_bert_params(req['weights'], config)
  hf_of = bert_loading.hf_key_map(config)
  adapters = load_adapters(
      req['weights'],
      lorajax.init(bench_core.lora_spec(variant), params, jax.random.key(0)),
      lambda p: _bert_hf_key(hf_of[p]).removesuffix('.weight'))
  setup = bench_core.make_setup(variant, config, batch, params=params,
                                adapters=adapters,
                                xla_options=req['jit'] == 'xla')
  # PEFT's step runs the last layer for every token; count that work too.
  whole = bench_core.make_setup(variant, config.replace(cls_readout=False),
                                batch, params=params, adapters=adapters,
                                xla_options=req['jit'] == 'xla')
  return dataclasses.replace(setup, reference_twin=whole), batch


def flaxbert(req: dict[str, Any]) -> tuple[bench_core.Setup, Batch]:
  """A user's own plain Flax BERT, LoRA through ``lorajax.lora``."""
  model = flax_bert.FlaxBert(
      hidden_size=req['hidden_size'], num_layers=req['num_layers'],
      num_heads=req['num_heads'], intermediate_size=req['intermediate_size'],
      vocab_size=req['vocab_size'], max_position=req['max_position'],
      num_labels=req['num_labels'], dtype=jnp.dtype(req['dtype']))
  batch = read_batch(req['weights'], ('input_ids', 'attention_mask', 'label'))
  params = flax_bert.load_params(model, req['weights'])
  spec = lorajax.LoraSpec([(flax_bert.TARGETS[req['targets']], _lora(req)),
                           (r'classifier/.*', 'train'), (r'.*', 'freeze')])
  adapters = load_adapters(
      req['weights'], lorajax.init(spec, params, jax.random.key(0)),
      lambda p: flax_bert.hf_key(p).removesuffix('.weight'))

  def apply(p, ids, mask):
    return model.apply({'params': p}, ids, mask)

  setup = bench_core.lora_setup(apply, params, spec, adapters,
                                bench_core.classification_loss,
                                xla_options=req['jit'] == 'xla',
                                dtype=req['dtype'])
  return setup, batch


def causal_lm_loss(logits: jax.Array, x: Batch) -> jax.Array:
  """Mean next-token cross entropy of ``[B, T, V]`` logits on
  ``x['input_ids']``, over the ``B * (T - 1)`` predicted tokens (what
  transformers computes with ``labels=input_ids``)."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), x['input_ids'][:, 1:]).mean()


# What a remat row's lorajax side sets (a long-sequence config's fields).
ATTN_CHUNK, LOSS_CHUNK = 256, 512


def chunked_causal_lm(loaded: Any, chunk: int = LOSS_CHUNK
                      ) -> Callable[..., jax.Array]:
  """``apply(params, ids, mask) -> [B, T]`` next-token losses (the last
  position's is 0): the decoder's hidden states and
  ``lm_head.token_nll`` over chunks of ``chunk`` tokens, so the
  ``[B, T, V]`` logits never exist whole."""
  def apply(params, input_ids, attention_mask):
    hidden = loaded.module.apply({'params': params}, input_ids,
                                 attention_mask=attention_mask,
                                 hidden_only=True)
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    nll = lm_head.token_nll(loaded.config, params, hidden, targets,
                            chunk=chunk)
    return nll.at[:, -1].set(0.0)
  return apply


def chunked_loss(nll: jax.Array, x: Batch) -> jax.Array:
  """``causal_lm_loss`` from ``chunked_causal_lm``'s per-token losses."""
  del x
  return nll[:, :-1].mean()


def llama(req: dict[str, Any]) -> tuple[bench_core.Setup, Batch]:
  """The checkpoint through ``lorajax.models.load``, LoRA, causal LM."""
  long = bool(req['remat'])
  loss_chunk = LOSS_CHUNK if long else int(req.get('loss_chunk') or 0)
  loaded = models.load(req['checkpoint'], dtype=jnp.dtype(req['dtype']),
                       remat='layer' if long else 'none',
                       attn_chunk=ATTN_CHUNK if long else 0)
  batch = read_batch(req['inputs'], ('input_ids', 'attention_mask'))
  spec = lorajax.LoraSpec([(LLAMA_TARGETS[req['targets']], _lora(req)),
                           (r'.*', 'freeze')])
  hf_of = hf_decoders.hf_keys(loaded.config)
  adapters = load_adapters(
      req['inputs'], lorajax.init(spec, loaded.params, jax.random.key(0)),
      lambda p: hf_of[p].removesuffix('.weight'))
  apply, loss = ((chunked_causal_lm(loaded, loss_chunk), chunked_loss)
                 if loss_chunk else (loaded.apply, causal_lm_loss))
  setup = bench_core.lora_setup(apply, loaded.params, spec, adapters, loss,
                                xla_options=req['jit'] == 'xla',
                                dtype=req['dtype'])
  if loss_chunk:   # XLA counts a loop's body once: count the loop-free step
    whole = loaded.module.clone(config=loaded.config.replace(attn_chunk=0))
    def whole_apply(params, input_ids, attention_mask):
      return whole.apply({'params': params}, input_ids,
                         attention_mask=attention_mask)
    setup = dataclasses.replace(setup, flops_twin=bench_core.lora_setup(
        whole_apply, loaded.params, spec, adapters, causal_lm_loss,
        xla_options=req['jit'] == 'xla', dtype=req['dtype']))
  return setup, batch


BUILDERS = {'bert': bert, 'flaxbert': flaxbert, 'llama': llama}
