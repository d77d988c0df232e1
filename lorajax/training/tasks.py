"""Tasks: a model, its frozen base, the spec, the data, the loss and metrics.

``build_task(config)`` loads everything a run needs:

- ``classification``: a BERT encoder (pretrained all-MiniLM-L6-v2, or a random
  one) with a new 2-way classifier on the mean-pooled tokens (or on the
  ``[CLS]`` pooler); cross entropy; accuracy.
- ``lm``: a Llama decoder (pretrained SmolLM2-135M, or a random one) on
  packed windows of text; next-token cross entropy; perplexity.

Parameter paths are those of the inner ``'params'`` dict
(``encoder/layer_0/attention/query/kernel``, ``classifier/kernel``,
``layers_0/attn/q_proj/kernel``): the model is wrapped as
``apply(p, batch) = model.apply({'params': p}, ...)`` before ``lorajax.lora``.

Example:

  >>> task = build_task(config)  # doctest: +SKIP
  >>> loss, stats = task.loss_fn(trainable, task.frozen, batch, key)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from lorajax import assets
from lorajax.data import sources
from lorajax.data import text
from lorajax.methods import prompts as prompts_lib
from lorajax.models import bert
from lorajax.models import bert_loading
from lorajax.models import bert_tokenizer
from lorajax.models import bpe_tokenizer
from lorajax.models import llama
from lorajax.models import llama_loading
from lorajax.training import config as config_lib

PyTree = Any
Arrays = dict[str, np.ndarray]
SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass(frozen=True)
class Task:
  """What ``train_and_evaluate`` needs from a task.

  Attributes:
    kind: ``'classification'`` or ``'lm'``.
    spec: the rules (from ``config.method``).
    params: the whole base parameter tree (inner ``'params'`` dict).
    adapters: freshly initialized adapters (``{}`` without adapter rules).
    loss_fn: ``(trainable, frozen, batch, rng) -> (mean loss, stats)``.
    eval_fn: ``(trainable, frozen, batch) -> stats``.
    data: split name -> dict of ``[N, ...]`` arrays.
    model_info: JSON-able description of the architecture (checked when a
      checkpoint is restored).
    metric: the headline metric: ``'accuracy'`` (higher is better) or
      ``'perplexity'`` (lower is better).
    tokens_key: the batch entry whose sum counts real tokens.
    prompts: the learned virtual tokens of ``prompt``/``prefix`` tuning
      (``lorajax.methods.prompts``), trained as ``trainable['prompts']``;
      ``{}`` for other methods.
    model_config: the ``BertConfig`` / ``LlamaConfig`` (for PEFT and HF
      exports).
    pretrained: the base as loaded, where it differs from ``params`` (the
      PiSSA residual); None otherwise.
  """
  kind: str
  spec: lorajax.LoraSpec
  params: PyTree
  adapters: PyTree
  loss_fn: Callable[..., Any]
  eval_fn: Callable[..., Any]
  data: dict[str, Arrays]
  model_info: dict[str, Any]
  metric: str
  tokens_key: str
  prompts: PyTree = dataclasses.field(default_factory=dict)
  model_config: Any = None
  pretrained: PyTree = None

  @property
  def original_params(self) -> PyTree:
    """The pretrained base that exported adapters must fit."""
    return self.params if self.pretrained is None else self.pretrained

  def split_params(self) -> tuple[PyTree, PyTree]:
    """``(trainable, frozen)``: ``{'adapters', 'params'[, 'prompts']}`` and
    the base (quantized kernels stay in the frozen base)."""
    train, frozen = lorajax.partition(self.params, self.spec)
    trainable = {'adapters': self.adapters, 'params': train}
    if self.prompts:
      trainable['prompts'] = self.prompts
    return trainable, frozen

  @property
  def higher_is_better(self) -> bool:
    return self.metric == 'accuracy'


def summarize(stats: dict[str, float]) -> dict[str, float]:
  """Turns summed stats into metrics: loss, and accuracy or perplexity."""
  count = max(stats['count'], 1.0)
  out = {'loss': stats['loss_sum'] / count}
  if 'correct' in stats:
    out['accuracy'] = stats['correct'] / count
  else:
    out['perplexity'] = math.exp(min(out['loss'], 700.0))
  return out


def _prompt_inputs(trainable: PyTree) -> dict[str, jax.Array]:
  """``prompt=``/``prefix=`` model arguments of ``trainable['prompts']``."""
  return prompts_lib.model_inputs(trainable.get('prompts'))


def init_prompts(config, model_config: Any, embedding: jax.Array
                 ) -> PyTree:
  """The ``prompts`` tree of ``config.method`` (``{}`` for other methods).

  Args:
    config: the run config (``prompt.*``, ``prefix.*``, ``seed``).
    model_config: a ``BertConfig`` or ``LlamaConfig``.
    embedding: the word embedding table ``[vocab, hidden]``, to start the
      prompt from (``prompt.init_from_vocab``).
  """
  key = jax.random.key(config.seed + 2)
  make = (prompts_lib.for_bert if config.task == 'classification'
          else prompts_lib.for_llama)
  if config.method == 'prompt':
    return make(model_config, key, n_prompt=int(config.prompt.num_tokens),
                embedding=(embedding if config.prompt.init_from_vocab
                           else None))
  if config.method == 'prefix':
    return make(model_config, key, n_prefix=int(config.prefix.num_tokens),
                mlp_hidden=int(config.prefix.mlp_hidden) or None)
  return {}


def _quantized(config, params: PyTree, spec: lorajax.LoraSpec) -> PyTree:
  """``params`` with the kernels of a ``qlora`` spec quantized."""
  if config.method != 'qlora':
    return params
  params = lorajax.quantize_params(params, spec)
  logging.info('qlora: frozen base %d bytes with %s kernels',
               lorajax.quantized_nbytes(params), config.quant)
  return params


# ---- classification ---------------------------------------------------


def classifier_apply(module: bert.Bert, pooling: str):
  """``apply(p, batch, *, train, rng, **inputs) -> logits [B, C]`` for a
  ``Bert``; ``inputs`` are its ``prompt=``/``prefix=`` arguments."""
  if pooling not in ('mean', 'cls'):
    raise ValueError(f"pooling={pooling!r}; expected 'mean' or 'cls'")

  def apply(p, batch, *, train=False, rng=None, **inputs):
    out = module.apply({'params': p}, batch['input_ids'],
                       batch['attention_mask'], batch['token_type_ids'],
                       deterministic=not train,
                       rngs=None if rng is None else {'dropout': rng},
                       **inputs)
    if pooling == 'cls':
      return out.logits
    pooled = bert.mean_pool(out.hidden, batch['attention_mask'])
    head = p['classifier']
    return (pooled @ head['kernel'].astype(jnp.float32)
            + head['bias'].astype(jnp.float32))
  return apply


def _weights(batch: PyTree, n: int) -> jax.Array:
  return batch.get('valid', jnp.ones((n,), bool)).astype(jnp.float32)


def classification_loss(trainable, frozen, batch, rng, *, apply_fn):
  """Cross entropy; stats ``loss_sum``, ``count``, ``correct``."""
  params = lorajax.combine(trainable['params'], frozen)
  model_rng, lora_rng = jax.random.split(rng)
  logits = apply_fn(params, trainable['adapters'], batch, train=True,
                    rng=model_rng, lora_rng=lora_rng,
                    **_prompt_inputs(trainable))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  stats = {'loss_sum': jnp.sum(ce), 'count': jnp.float32(ce.shape[0]),
           'correct': jnp.sum(correct)}
  return jnp.mean(ce), stats


def classification_eval(trainable, frozen, batch, *, apply_fn):
  """Stats of a batch, padding rows (``valid`` False) weighted 0."""
  params = lorajax.combine(trainable['params'], frozen)
  logits = apply_fn(params, trainable['adapters'], batch,
                    **_prompt_inputs(trainable))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  w = _weights(batch, ce.shape[0])
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss_sum': jnp.sum(ce * w), 'count': jnp.sum(w),
          'correct': jnp.sum(correct * w)}


def _bert(config) -> tuple[bert.Bert, PyTree, dict[str, Any]]:
  m = config.model
  overrides = dict(dtype=jnp.dtype(m.dtype), hidden_dropout=m.dropout,
                   attention_dropout=m.dropout)
  key = jax.random.key(config.seed)
  if m.pretrained:
    if m.size != 'base':
      raise ValueError(f'model.size={m.size!r}: pretrained weights exist for '
                       "'base' only")
    cfg, params = bert_loading.load_minilm(2, key=key, **overrides)
  else:
    if m.size == 'tiny':
      cfg = bert.BertConfig(hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, num_labels=2, **overrides)
    elif m.size == 'base':
      cfg = bert.BertConfig.minilm_l6(num_labels=2, **overrides)
    else:
      raise ValueError(f"model.size={m.size!r}; expected 'base' or 'tiny'")
    ids = jnp.ones((1, 8), jnp.int32)
    params = bert.Bert(cfg).init(key, ids)['params']
  arch = {k: v for k, v in dataclasses.asdict(cfg).items()
          if k not in ('dtype', 'param_dtype') and 'dropout' not in k}
  return bert.Bert(cfg), params, arch


def _pissa_residual(spec, params, adapters):
  """The frozen base of a PiSSA run is the residual ``W - s·a₀·b₀``
  (recomputed from the pretrained base, so a resumed run gets it again)."""
  if not lorajax.pissa.uses_pissa(spec):
    return params
  start = time.perf_counter()
  params = lorajax.pissa.residual_base(spec, params, adapters)
  logging.info('PiSSA: residual base ready in %.1f s',
               time.perf_counter() - start)
  return params


def _classification(config) -> Task:
  if config.model.name != 'minilm':
    raise ValueError(f'model.name={config.model.name!r}; classification '
                     "supports 'minilm'")
  module, params, arch = _bert(config)
  tok = bert_tokenizer.bert_tokenizer()
  data = {}
  for split in SPLITS:
    src = sources.get_source(config.data.name, getattr(
        config.data, f'{split}_split'), config.data.dir)
    data[split] = text.encode_source(src, tok, max_len=config.data.max_len)
  spec = config_lib.make_spec(config)
  prompts = init_prompts(
      config, module.config,
      params['embeddings']['word_embeddings']['embedding'])
  params = _quantized(config, params, spec)
  apply_fn = lorajax.lora(classifier_apply(module, config.model.pooling),
                          spec)
  adapters = lorajax.init(spec, params, jax.random.key(config.seed + 1))
  pretrained = params
  params = _pissa_residual(spec, params, adapters)
  return Task('classification', spec, params, adapters,
              functools.partial(classification_loss, apply_fn=apply_fn),
              functools.partial(classification_eval, apply_fn=apply_fn),
              data, {'name': 'minilm', 'size': config.model.size, **arch},
              'accuracy', 'attention_mask', prompts, module.config,
              None if params is pretrained else pretrained)


# ---- causal language modelling ----------------------------------------


def lm_apply(module: llama.Llama):
  """``apply(p, batch, *, train, rng, **inputs) -> logits [B, T, V]`` for a
  ``Llama``; ``inputs`` are its ``prompt=``/``prefix=`` arguments."""
  def apply(p, batch, *, train=False, rng=None, **inputs):
    del train, rng  # The decoder has no dropout.
    return module.apply({'params': p}, batch['inputs'], **inputs)
  return apply


def _nll(apply_fn, trainable, frozen, batch, lora_rng):
  params = lorajax.combine(trainable['params'], frozen)
  logits = apply_fn(params, trainable['adapters'], batch, lora_rng=lora_rng,
                    **_prompt_inputs(trainable))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  mask = batch['mask'].astype(jnp.float32)
  if 'valid' in batch:
    mask = mask * batch['valid'].astype(jnp.float32)[:, None]
  return nll, mask


def lm_loss(trainable, frozen, batch, rng, *, apply_fn):
  """Mean next-token cross entropy over real targets; ``loss_sum``, ``count``."""
  nll, mask = _nll(apply_fn, trainable, frozen, batch, rng)
  total, count = jnp.sum(nll * mask), jnp.sum(mask)
  return total / jnp.maximum(count, 1.0), {'loss_sum': total, 'count': count}


def lm_eval(trainable, frozen, batch, *, apply_fn):
  nll, mask = _nll(apply_fn, trainable, frozen, batch, None)
  return {'loss_sum': jnp.sum(nll * mask), 'count': jnp.sum(mask)}


def _lm(config) -> Task:
  m = config.model
  if m.name != 'smollm2':
    raise ValueError(f"model.name={m.name!r}; lm supports 'smollm2'")
  start = time.perf_counter()
  reader = llama_loading.as_reader(
      assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
  tok = bpe_tokenizer.gguf_tokenizer(reader)
  eos = bpe_tokenizer.gguf_special_ids(reader)['eos']
  dtype = jnp.dtype(m.dtype)
  if m.pretrained:
    if m.size != 'base':
      raise ValueError(f'model.size={m.size!r}: pretrained weights exist for '
                       "'base' only")
    cfg, params = llama_loading.load_gguf_llama(reader, dtype=dtype)
  else:
    if m.size == 'tiny':
      cfg = llama.LlamaConfig.tiny(vocab_size=tok.get_vocab_size(),
                                   dtype=dtype)
    elif m.size == 'base':
      cfg = llama.LlamaConfig.smollm2_135m(dtype=dtype)
    else:
      raise ValueError(f"model.size={m.size!r}; expected 'base' or 'tiny'")
    params = llama.Llama(cfg).init(jax.random.key(config.seed),
                                   jnp.ones((1, 8), jnp.int32))['params']
  module = llama.Llama(cfg)
  data = {}
  for split in SPLITS:
    src = sources.get_source(config.data.name, getattr(
        config.data, f'{split}_split'), config.data.dir)
    texts = [src[i]['text'] for i in range(len(src))]
    data[split] = text.pack_lm(texts, tok, seq_len=config.data.max_len,
                               eos_id=eos)
  logging.info('lm task: model and %s windows ready in %.1f s',
               {s: len(d['inputs']) for s, d in data.items()},
               time.perf_counter() - start)
  spec = config_lib.make_spec(config)
  prompts = init_prompts(config, cfg, params['embed']['embedding'])
  params = _quantized(config, params, spec)
  apply_fn = lorajax.lora(lm_apply(module), spec)
  adapters = lorajax.init(spec, params, jax.random.key(config.seed + 1))
  pretrained = params
  params = _pissa_residual(spec, params, adapters)
  arch = {k: v for k, v in dataclasses.asdict(cfg).items()
          if k not in ('dtype', 'remat')}
  return Task('lm', spec, params, adapters,
              functools.partial(lm_loss, apply_fn=apply_fn),
              functools.partial(lm_eval, apply_fn=apply_fn),
              data, {'name': 'smollm2', 'size': m.size, **arch},
              'perplexity', 'mask', prompts, cfg,
              None if params is pretrained else pretrained)


def build_task(config) -> Task:
  """Loads the model, the data and the spec a config asks for."""
  if config.task == 'classification':
    return _classification(config)
  if config.task == 'lm':
    return _lm(config)
  raise ValueError(f'config.task={config.task!r}; expected one of '
                   f'{config_lib.TASKS}')
