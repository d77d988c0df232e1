"""EVA in a config run: ``lora.init='eva'`` and the ``config.eva`` fields.

EVA (``lorajax.eva``) is the one initialization made from data, so for it
``attach.attach_method`` reads the first ``eva.num_batches`` batches of the
training split, in the run's own shuffled order (``config.seed``,
``config.batch_size``), and hands them to ``lorajax.eva.init`` with the
model's forward pass and its token mask: ``attention_mask`` for a
classifier, the loss ``mask`` for ``lm`` and ``sft``. The per-kernel ranks
and ``a`` it returns replace the config's uniform rank. Every attach of the
run (a resume, an evaluation, an export) computes them again from the same
batches, so they are the same; a checkpoint of other ranks is refused as
"another spec" by the checkpoint's own check. An evaluation or an export of
an EVA run thus reads the training split too.

Example:

  >>> config = config_lib.base_config('classification')       # doctest: +SKIP
  >>> config.lora.init = 'eva'                                # doctest: +SKIP
  >>> method = attach.attach_method(config, model)            # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging

import lorajax
from lorajax.data import loader
from lorajax.training import input_pipeline
from lorajax.training import model_loading
from lorajax.training import sft

PyTree = Any


def eva_config(config) -> lorajax.eva.EvaConfig:
  """``config.eva`` as ``lorajax.eva.EvaConfig`` (its errors name the
  config fields)."""
  e = config.eva
  try:
    return lorajax.eva.EvaConfig(
        rho=float(e.rho), tau=float(e.tau), whiten=bool(e.whiten),
        adjust_scaling_factors=bool(e.adjust_scaling_factors),
        max_steps=int(e.max_steps))
  except ValueError as err:
    raise ValueError(f'config.eva: {err}') from None


def forward(config, model: model_loading.Model):
  """``(fn(params, batch), token_mask(batch))`` of the run's task."""
  if model.apply is not None:      # a model.factory model
    fn = lambda p, batch: model.apply(p, batch)
  elif config.task == 'classification':
    def fn(p, batch):
      return model.module.apply(
          {'params': p}, batch['input_ids'], batch['attention_mask'],
          batch['token_type_ids'], deterministic=True).logits
  elif config.task == 'sft':
    fn = sft.sft_apply(model.module)
  else:
    fn = lambda p, batch: model.module.apply({'params': p}, batch['inputs'])
  key = 'attention_mask' if config.task == 'classification' else 'mask'
  return fn, lambda batch: batch[key]


def fit(config, model: model_loading.Model, spec: lorajax.LoraSpec
        ) -> lorajax.eva.EvaResult | None:
  """EVA's spec and adapters for ``spec``'s ``Lora(init='eva')`` rules, or
  None when it has none.

  Raises:
    ValueError: bad ``config.eva`` fields, an empty training split, or what
      ``lorajax.eva.init`` refuses (no convergence, scanned kernels).
  """
  if not lorajax.eva.uses_eva(spec):
    return None
  settings = eva_config(config)
  n = int(config.eva.num_batches)
  if n < 1:
    raise ValueError(f'config.eva.num_batches={n}: expected >= 1')
  start = time.perf_counter()
  train = input_pipeline.load_split(config, model, 'train')
  it = loader.BatchIterator(train, batch_size=int(config.batch_size),
                            seed=int(config.seed), train=True)
  if not it.steps_per_epoch:
    raise ValueError(f'config.data.train_split={config.data.train_split!r} '
                     f'has no full batch of {config.batch_size} rows for '
                     'EVA')
  batches = [next(it) for _ in range(min(n, it.steps_per_epoch))]
  fn, mask = forward(config, model)
  result = lorajax.eva.init(spec, model.params, batches, fn=fn,
                            token_mask=mask, config=settings)
  logging.info('EVA: ranks %s after %d passes over %d batches (%.1f s)',
               result.ranks, result.steps, len(batches),
               time.perf_counter() - start)
  return result
