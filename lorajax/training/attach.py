"""Attaching a config's method to a loaded model: the one place it happens.

``attach_method(config, model)`` runs the sequence every task, evaluation and
export shares::

  spec (config.method) -> quantize (qlora) -> init adapters
      -> PiSSA residual base (lora.init='pissa') -> prompts (prompt/prefix)

It reads no data, but for EVA (``lora.init='eva'``, ``eva_run``: training
batches). What it returns is deterministic in ``config.seed``, so a
resumed run, an evaluation and an export all rebuild the same frozen base and
the same initial adapters the training run started from (the PiSSA residual
and ``pissa.to_lora`` need the latter).

Example:

  >>> config = config_lib.base_config('classification')
  >>> config.model.pretrained, config.model.size = False, 'tiny'
  >>> method = attach_method(config, model_loading.load_model(config))
  >>> trainable, frozen = method.split_params()
  >>> sorted(trainable['adapters']['encoder']['layer_0']['attention'])
  ['query', 'value']
  >>> sorted(trainable['params'])
  ['classifier']
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

import lorajax
from lorajax.io import hf_models
from lorajax.io import hf_targets
from lorajax.methods import prompts as prompts_lib
from lorajax.methods import ptuning as ptuning_lib
from lorajax.methods import tokens as tokens_lib
from lorajax.methods import vera as vera_lib
from lorajax.models import moe
from lorajax.training import config as config_lib
from lorajax.training import eva_run
from lorajax.training import model_loading
from lorajax.training import trainable_tokens

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Method:
  """A method attached to a model: the spec and what it adds and changes.

  Attributes:
    spec: the rules (``config_lib.make_spec``).
    params: the frozen base the adapters run on: the loaded parameters, with
      ``qlora`` kernels quantized and, under PiSSA, the residual.
    adapters: freshly initialized adapters (``{}`` without adapter rules).
    prompts: the learned virtual tokens of ``prompt``/``prefix`` tuning
      (``lorajax.methods.prompts``); ``{}`` for other methods.
    pretrained: the base before the PiSSA residual was taken, where it
      differs from ``params``; None otherwise.
    tokens: the trained token rows' values ``{'embed': [n, d][, 'head']}``
      (``trainable_tokens``); ``{}`` without ``config.trainable_tokens`` /
      ``new_tokens``.
    token_rows: the ``TrainableTokens`` they are written into, or None.
  """
  spec: lorajax.LoraSpec
  params: PyTree
  adapters: PyTree
  prompts: PyTree = dataclasses.field(default_factory=dict)
  pretrained: PyTree = None
  tokens: PyTree = dataclasses.field(default_factory=dict)
  token_rows: tokens_lib.TrainableTokens | None = None

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
    if self.tokens:
      trainable['tokens'] = self.tokens
    return trainable, frozen


def init_prompts(config, model: model_loading.Model) -> PyTree:
  """The ``prompts`` tree of ``config.method`` (``{}`` for other methods).

  Prompt tokens start as embeddings of random vocabulary tokens of
  ``model.embedding`` when ``config.prompt.init_from_vocab``.
  """
  key = jax.random.key(config.seed + 2)
  make = (prompts_lib.for_bert if config.task == 'classification'
          else prompts_lib.for_llama)
  if config.method == 'prompt':
    return make(model.config, key, n_prompt=int(config.prompt.num_tokens),
                embedding=(model.embedding if config.prompt.init_from_vocab
                           else None))
  if config.method == 'ptuning':
    return ptuning_lib.for_config(config, model, key)
  if config.method == 'prefix':
    return make(model.config, key, n_prefix=int(config.prefix.num_tokens),
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


def _pissa_residual(spec: lorajax.LoraSpec, params: PyTree,
                    adapters: PyTree) -> PyTree:
  """The frozen base of a PiSSA run is the residual ``W - s·a₀·b₀``
  (recomputed from the pretrained base, so a resumed run gets it again)."""
  if not lorajax.pissa.uses_pissa(spec):
    return params
  start = time.perf_counter()
  params = lorajax.pissa.residual_base(spec, params, adapters)
  logging.info('PiSSA: residual base ready in %.1f s',
               time.perf_counter() - start)
  return params


def hf_origin(config) -> dict[str, Any]:
  """``source``/``head`` keywords of ``lorajax.io``'s Hugging Face
  functions for the run's model: the checkpoint directory
  ``config.model.path`` and the head the task trains; ``{}`` for the
  shipped models."""
  if not config.model.get('path'):
    return {}
  return {'source': config.model.path,
          'head': ('classification' if config.task == 'classification'
                   else 'causal_lm')}


def lora_targets(config, model: model_loading.Model) -> str:
  """``config.lora.targets`` as a regex over ``model.params``' paths
  (``'all-linear'`` and ``'default'`` resolved by the model's Hugging Face
  naming, as PEFT resolves them).

  Raises:
    ValueError: a shorthand for a model without Hugging Face naming.
  """
  targets = config.lora.targets
  if targets not in hf_targets.SHORTHANDS:
    return targets
  try:
    hf = hf_models.hf_model(model.config, **hf_origin(config))
  except TypeError as e:
    raise ValueError(f'lora.targets={targets!r} needs a Hugging Face family '
                     f'to name the kernels ({e}); give a regex over '
                     'parameter paths') from None
  resolved = hf_targets.lora_targets(targets, hf, model.params)
  logging.info('lora.targets=%r: %s', targets, resolved)
  return resolved


def attach_method(config, model: model_loading.Model) -> Method:
  """spec -> quantize -> init -> PiSSA residual -> prompts, for ``model``.

  Args:
    config: the run config (``method``, ``lora.*``, ``quant*``,
      ``bottleneck.*``, ``prompt.*``, ``prefix.*``, ``*_rules``, ``seed``).
    model: from ``model_loading.load_model``.

  Returns:
    The ``Method``; ``model`` is not changed.

  Raises:
    ValueError: from ``make_spec`` (unknown method, bad rules) or from the
      spec not fitting ``model.params``.
  """
  spec = config_lib.make_spec(
      config, lora_targets=(lora_targets(config, model)
                            if config.method in config_lib.LOW_RANK_METHODS
                            else None))
  params = _quantized(config, model.params, spec)
  # MoE expert kernels are [E, in, out]: their axes come from the model.
  traced = (dict(fn=lambda p, ids: model.module.apply({'params': p}, ids),
                 args=(jnp.zeros((1, 2), jnp.int32),))
            if isinstance(model.config, moe.MoeConfig) else {})
  spec = vera_lib.bind_projections(spec, params, **traced)  # VeRA's shared A, B
  eva = eva_run.fit(config, model, spec)  # lora.init='eva': ranks, a from data
  # From the float kernels: LoftQ's factors need W (lora.init='loftq'; its
  # quantize_params above ran the same loop for the base).
  adapters = eva.adapters if eva is not None else lorajax.init(
      spec, model.params, jax.random.key(config.seed + 1), **traced)
  spec = eva.spec if eva is not None else spec
  base = _pissa_residual(spec, params, adapters)
  rows = trainable_tokens.for_model(config, model, spec)
  return Method(spec, base, adapters, init_prompts(config, model),
                None if base is params else params,
                trainable_tokens.init_values(rows, params), rows)
