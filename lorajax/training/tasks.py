"""Tasks: a model, an attached method, data, and the loss and metrics.

A task is three separate steps put together, each usable alone:

1. ``model_loading.load_model(config)``: module, pretrained parameters,
   tokenizer;
2. ``attach.attach_method(config, model)``: spec, quantized base, adapters,
   PiSSA residual, prompts;
3. ``input_pipeline.load_splits(config, model, splits)``: only the splits
   asked for.

``build_task(config, splits=...)`` adds what the kind of task defines:

- ``classification``: a 2-way classifier on the mean-pooled tokens (or on
  the ``[CLS]`` pooler) of a BERT encoder; cross entropy; accuracy.
- ``lm``: next-token cross entropy of a Llama decoder on packed windows of
  text; perplexity.
- ``sft``: chat fine-tuning of a Llama decoder (``lorajax.training.sft``):
  conversations in the checkpoint's chat template, loss on assistant
  tokens, packed with segment ids; accuracy is the exact match of greedy
  answers.

Parameter paths are those of the inner ``'params'`` dict
(``encoder/layer_0/attention/query/kernel``, ``classifier/kernel``,
``layers_0/attn/q_proj/kernel``): the model is wrapped as
``apply(p, batch) = model.apply({'params': p}, ...)`` before ``lorajax.lora``
(a ``config.model.factory`` model brings its own ``apply``).

Example (a tiny random model and no data):

  >>> from lorajax.training import config as config_lib
  >>> config = config_lib.base_config('classification')
  >>> config.model.pretrained, config.model.size = False, 'tiny'
  >>> task = build_task(config, splits=())
  >>> trainable, frozen = task.split_params()
  >>> batch = {'input_ids': np.ones((2, 8), np.int32),
  ...          'attention_mask': np.ones((2, 8), np.int32),
  ...          'token_type_ids': np.zeros((2, 8), np.int32),
  ...          'label': np.array([0, 1])}
  >>> loss, stats = task.loss_fn(trainable, frozen, batch, jax.random.key(0))
  >>> float(stats['count']), task.data
  (2.0, {})
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from lorajax.methods import prompts as prompts_lib
from lorajax.models import bert
from lorajax.models import llama
from lorajax.models import lm_head
from lorajax.training import attach
from lorajax.training import input_pipeline
from lorajax.training import model_loading
from lorajax.training import sft

PyTree = Any
Arrays = dict[str, np.ndarray]
SPLITS = input_pipeline.SPLITS


@dataclasses.dataclass(frozen=True)
class Task:
  """What ``train_and_evaluate`` and the runners need from a task.

  Attributes:
    kind: ``'classification'`` or ``'lm'``.
    model: the loaded base model (``model_loading.Model``).
    method: the method attached to it (``attach.Method``).
    loss_fn: ``(trainable, frozen, batch, rng) -> (mean loss, stats)``.
    eval_fn: ``(trainable, frozen, batch) -> stats``.
    data: split name -> dict of ``[N, ...]`` arrays; only the splits
      ``build_task`` was asked for.
    metric: the headline metric: ``'accuracy'`` (higher is better) or
      ``'perplexity'`` (lower is better).
    tokens_key: the batch entry whose sum counts real tokens.
  """
  kind: str
  model: model_loading.Model
  method: attach.Method
  loss_fn: Callable[..., Any]
  eval_fn: Callable[..., Any]
  data: dict[str, Arrays]
  metric: str
  tokens_key: str

  @property
  def spec(self) -> lorajax.LoraSpec:
    return self.method.spec

  @property
  def params(self) -> PyTree:
    """The frozen base the adapters run on (quantized, PiSSA residual)."""
    return self.method.params

  @property
  def adapters(self) -> PyTree:
    return self.method.adapters

  @property
  def prompts(self) -> PyTree:
    return self.method.prompts

  @property
  def original_params(self) -> PyTree:
    """The pretrained base that exported adapters must fit."""
    return self.method.original_params

  @property
  def model_info(self) -> dict[str, Any]:
    return self.model.info

  @property
  def model_config(self) -> Any:
    return self.model.config

  def split_params(self) -> tuple[PyTree, PyTree]:
    """``(trainable, frozen)``; see ``attach.Method.split_params``."""
    return self.method.split_params()

  @property
  def higher_is_better(self) -> bool:
    return self.metric == 'accuracy'


def summarize(stats: dict[str, float]) -> dict[str, float]:
  """Turns summed stats into metrics: loss, and accuracy or perplexity."""
  count = max(stats['count'], 1.0)
  out = {'loss': stats['loss_sum'] / count}
  if 'exact' in stats:   # sft: greedy exact match, per conversation.
    out['accuracy'] = stats['exact'] / max(stats['examples'], 1.0)
  elif 'correct' in stats:
    out['accuracy'] = stats['correct'] / count
  else:
    out['perplexity'] = math.exp(min(out['loss'], 700.0))
  return out


def _prompt_inputs(trainable: PyTree) -> dict[str, jax.Array]:
  """``prompt=``/``prefix=`` model arguments of ``trainable['prompts']``."""
  return prompts_lib.model_inputs(trainable.get('prompts'))


# ---- classification ---------------------------------------------------


def classifier_apply(module: bert.Bert, pooling: str):
  """``apply(p, batch, *, train, rng, **inputs) -> logits [B, C]`` for a
  ``Bert``; ``inputs`` are its ``prompt=``/``prefix=`` arguments."""
  if pooling != module.config.pooling:   # the model pools (and exports)
    raise ValueError(f'pooling={pooling!r} but the model pools '
                     f'{module.config.pooling!r} (BertConfig.pooling)')

  def apply(p, batch, *, train=False, rng=None, **inputs):
    return module.apply({'params': p}, batch['input_ids'],
                        batch['attention_mask'], batch['token_type_ids'],
                        deterministic=not train,
                        rngs=None if rng is None else {'dropout': rng},
                        **inputs).logits
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


# ---- causal language modelling ----------------------------------------


def lm_apply(module: llama.Llama):
  """``apply(p, batch, *, train, rng, **inputs) -> logits [B, T, V]`` for a
  ``Llama``; ``inputs`` are its ``prompt=``/``prefix=`` arguments."""
  def apply(p, batch, *, train=False, rng=None, **inputs):
    del train, rng  # The decoder has no dropout.
    return module.apply({'params': p}, batch['inputs'], **inputs)
  return apply


def nll_apply(apply, model_config: Any, chunk: int):
  """``apply(p, batch, **kw) -> logits`` (``lm_apply``, ``sft_apply``)
  turned into ``(p, batch, **kw) -> nll [B, T]``: the decoder's hidden
  states, then its head and cross entropy over chunks of about ``chunk``
  tokens (``config.loss_chunk``, ``lorajax.models.lm_head``). The head runs
  inside this function, so ``lorajax.lora`` adapts it as in ``apply``."""
  def f(p, batch, *, train=False, rng=None, **inputs):
    hidden = apply(p, batch, train=train, rng=rng, hidden_only=True,
                   **inputs)
    return lm_head.token_nll(model_config, p, hidden, batch['targets'],
                             chunk=chunk)
  return f


def loss_chunk(config, model: model_loading.Model) -> int:
  """``config.loss_chunk``, checked against the task and the model."""
  chunk = config.get('loss_chunk', 0)
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ValueError(f'config.loss_chunk={chunk!r}: expected an integer >= '
                     '0 (0 computes the logits at once)')
  if chunk and config.task == 'classification':
    raise ValueError(f'config.loss_chunk={chunk}: task classification has '
                     'no vocabulary logits to chunk; leave it 0')
  if chunk and model.apply is not None:
    raise ValueError(f'config.loss_chunk={chunk}: model.factory='
                     f'{config.model.factory!r} gives logits, not hidden '
                     'states and a head lorajax can run in chunks; leave it '
                     '0')
  return chunk


def _nll(apply_fn, trainable, frozen, batch, lora_rng, per_token=False):
  params = lorajax.combine(trainable['params'], frozen)
  # Training (a lora_rng) hands the model its own dropout key; the Llama
  # ignores both, a model.factory model may use them.
  train = {} if lora_rng is None else {
      'train': True, 'rng': jax.random.fold_in(lora_rng, 1)}
  out = apply_fn(params, trainable['adapters'], batch, lora_rng=lora_rng,
                 **train, **_prompt_inputs(trainable))
  if per_token:  # nll_apply: the token losses themselves.
    nll = out
  else:
    logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  mask = batch['mask'].astype(jnp.float32)
  if 'valid' in batch:
    mask = mask * batch['valid'].astype(jnp.float32)[:, None]
  return nll, mask


def lm_loss(trainable, frozen, batch, rng, *, apply_fn, per_token=False):
  """Mean next-token cross entropy over real targets; ``loss_sum``,
  ``count``. ``per_token``: ``apply_fn`` gives the token losses
  (``nll_apply``), not logits."""
  nll, mask = _nll(apply_fn, trainable, frozen, batch, rng, per_token)
  total, count = jnp.sum(nll * mask), jnp.sum(mask)
  return total / jnp.maximum(count, 1.0), {'loss_sum': total, 'count': count}


def lm_eval(trainable, frozen, batch, *, apply_fn, per_token=False):
  nll, mask = _nll(apply_fn, trainable, frozen, batch, None, per_token)
  return {'loss_sum': jnp.sum(nll * mask), 'count': jnp.sum(mask)}


def build_task(config, *, splits: Iterable[str] = SPLITS,
               labels: Sequence[str] | None = None) -> Task:
  """Loads the model, attaches the method and loads ``splits`` of the data.

  Trained token rows (``config.trainable_tokens``/``new_tokens``) are
  written into the frozen base's tables inside ``loss_fn`` and ``eval_fn``
  (``_with_token_rows``), so gradients reach only ``trainable['tokens']``.

  Args:
    config: the run config.
    splits: the data splits to tokenize; an evaluation passes the one it
      scores, ``()`` loads no data.
    labels: a classifier's classes; None takes the data's
      (``input_pipeline.label_names``), a saved run passes its own.

  Raises:
    ValueError: an unknown task or model, or a method that does not fit.
  """
  return _with_token_rows(_build_task(config, splits=splits, labels=labels))


def _with_token_rows(task: Task) -> Task:
  """``task`` whose loss and eval write ``trainable['tokens']`` into the
  rows of the frozen tables first (``attach.Method.token_rows``)."""
  rows = task.method.token_rows
  if rows is None:
    return task

  def written(fn):
    def f(trainable, frozen, *args, **kwargs):
      return fn(trainable, rows.apply(frozen, trainable['tokens']), *args,
                **kwargs)
    return f
  return dataclasses.replace(task, loss_fn=written(task.loss_fn),
                             eval_fn=written(task.eval_fn))


def _build_task(config, *, splits: Iterable[str],
                labels: Sequence[str] | None) -> Task:
  """``build_task`` without the token rows."""
  if labels is None:
    labels = input_pipeline.label_names(config)
  model = model_loading.load_model(config, labels)
  chunk = loss_chunk(config, model)
  method = attach.attach_method(config, model)
  data = input_pipeline.load_splits(config, model, splits)
  if config.task == 'classification':
    apply_fn = lorajax.lora(model.apply or classifier_apply(
        model.module, config.model.pooling), method.spec)
    return Task('classification', model, method,
                functools.partial(classification_loss, apply_fn=apply_fn),
                functools.partial(classification_eval, apply_fn=apply_fn),
                data, 'accuracy', 'attention_mask')
  if config.task == 'sft':   # Trained tokens: the assistant's (mask).
    apply_fn = lorajax.lora(sft.sft_apply(model.module), method.spec)
    kw = dict(apply_fn=apply_fn, inputs_fn=_prompt_inputs)
    train_kw = kw
    if chunk:  # The exact match of sft_eval needs whole logits.
      train_kw = dict(kw, per_token=True, apply_fn=lorajax.lora(
          nll_apply(sft.sft_apply(model.module), model.config, chunk),
          method.spec))
    return Task('sft', model, method,
                functools.partial(sft.sft_loss, **train_kw),
                functools.partial(sft.sft_eval, **kw), data, 'accuracy',
                'mask')
  apply = model.apply or lm_apply(model.module)
  if chunk:
    apply = nll_apply(apply, model.config, chunk)
  apply_fn = lorajax.lora(apply, method.spec)
  kw = dict(apply_fn=apply_fn, per_token=bool(chunk))
  return Task('lm', model, method, functools.partial(lm_loss, **kw),
              functools.partial(lm_eval, **kw), data, 'perplexity', 'mask')
