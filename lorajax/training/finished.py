"""A run's saved checkpoint, used: evaluated on a split, or exported.

``evaluate_checkpoint`` puts the adapter a run saved onto its base and scores
a split; ``export_checkpoint`` writes it as a lorajax file, a PEFT folder or
a merged Hugging Face checkpoint. Both need only the run's config and
workdir (``lorajax.training.saved_run`` reads the config back). ``evaluate``
is the evaluation loop the training loop uses too.

Example:

  >>> config = saved_run.run_config('/tmp/run')  # doctest: +SKIP
  >>> out = export_checkpoint(config, '/tmp/run', '/tmp/peft', 'peft')
  ... # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

import lorajax
from lorajax import io as io_lib
from lorajax.data import loader
from lorajax.io import digests
from lorajax.io import peft_dequantized
from lorajax.io import peft_prompts
from lorajax.training import attach
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib
from lorajax.training import model_factory
from lorajax.training import model_loading
from lorajax.training import optim
from lorajax.training import parallel
from lorajax.training import saved_run
from lorajax.training import step as step_lib
from lorajax.training import tasks
from lorajax.training import trainable_tokens

PyTree = Any


def run_meta(config, spec: lorajax.LoraSpec, model_info: dict[str, Any],
          trainable: PyTree) -> dict[str, Any]:
  """The meta every checkpoint of the run carries (``checkpoint.make_meta``):
  the spec, the model, the whole config and the lorajax version."""
  return ckpt_lib.make_meta(
      spec, model_info, trainable,
      config=json.loads(config.to_json_best_effort()),
      lorajax_version=lorajax.__version__)


def rows(arrays: dict[str, np.ndarray]) -> int:
  """The number of examples in a split's arrays."""
  return len(next(iter(arrays.values())))


def evaluate(runner: parallel.Runner, trainable: PyTree, frozen: PyTree,
             arrays: dict[str, np.ndarray], *, batch_size: int,
             max_batches: int | None = None) -> dict[str, float]:
  """Metrics of ``trainable`` over one split (padded last batch, no drops)."""
  n = rows(arrays)
  if max_batches is not None:
    n = min(n, max_batches * batch_size)
    arrays = {k: v[:n] for k, v in arrays.items()}
  if n == 0:
    return {}
  it = loader.BatchIterator(arrays, batch_size=batch_size, train=False,
                            pad_last=True)
  total = None
  for batch in it:
    stats = runner.eval_step(trainable, frozen, runner.put_batch(batch))
    total = step_lib.sum_stats(total, stats)
  return tasks.summarize(total)


def _checkpoint_dir(workdir: str, step: int | str | None
                    ) -> tuple[str, int | None]:
  """``(folder, step)``: ``step='best'`` is the best validation checkpoint."""
  if step == 'best':
    return os.path.join(workdir, ckpt_lib.BEST_DIR), None
  return os.path.join(workdir, 'checkpoints'), step


def evaluate_checkpoint(config, workdir: str, split: str = 'test',
                        step: int | str | None = None) -> dict[str, float]:
  """Puts a run's saved adapter (``trainable/``) onto its base; evaluates.

  ``step`` None takes the latest checkpoint, ``'best'`` the best validation
  step's (what ``summary.json``'s ``test`` scored).

  No optimizer state is read, and only ``split`` of the data is loaded. The
  base comes from ``config`` (the pretrained loaders), so the checkpoint
  holds only what was trained.

  Raises:
    FileNotFoundError: no complete checkpoint in ``<workdir>/checkpoints``.
    ValueError: the checkpoint belongs to another spec or model.
  """
  task = tasks.build_task(config, splits=(split,),
                          labels=saved_run.labels(workdir, step))
  trainable, frozen = task.split_params()
  folder, step = _checkpoint_dir(workdir, step)
  trainable, _ = ckpt_lib.restore_trainable(
      folder, trainable,
      run_meta(config, task.spec, task.model_info, trainable), step)
  tx, _ = optim.from_config(config.optim, int(config.num_train_steps))
  runner = parallel.runner_from_config(config, task, tx)
  state, frozen = runner.place(
      step_lib.create_state(trainable, tx, config.seed), frozen)
  return evaluate(runner, state.trainable, frozen, task.data[split],
                  batch_size=config.eval_batch_size,
                  max_batches=config.data.max_eval_batches)


EXPORT_FORMATS = ('lorajax', 'peft', 'merged')


def _name_labels(path: str, labels) -> None:
  """Writes the classes' names as ``id2label``/``label2id`` of an exported
  ``config.json`` (``io.export_merged`` writes ``LABEL_i``): a new version
  of the folder, swapped in whole with a new digest (``io.digests``)."""
  with open(path, encoding='utf-8') as f:
    hf = json.load(f)
  hf['id2label'] = {str(i): name for i, name in enumerate(labels)}
  hf['label2id'] = {name: i for i, name in enumerate(labels)}
  with digests.writing(os.path.dirname(path)) as staging:
    with open(staging / os.path.basename(path), 'w', encoding='utf-8') as f:
      json.dump(hf, f, indent=2)


def _check_prompt_export(config, fmt: str) -> None:
  """Raises ValueError unless a prompt-learning run exports as ``fmt``:
  only ``'peft'``, where PEFT computes the method as lorajax does
  (``io.peft_prompts``)."""
  try:
    if fmt != 'peft':
      raise ValueError(f'format {fmt!r} has no place for them')
    peft_prompts.check_method(
        peft_prompts.METHOD_TYPES[config.method],
        'classification' if config.task == 'classification' else
        'causal_lm')
    if config.train_rules:
      raise ValueError(f'train_rules={config.train_rules!r} trained more '
                       'than the virtual tokens PEFT\'s file holds')
  except ValueError as e:
    raise ValueError(f'method {config.method!r} trains virtual tokens, '
                     'which training writes to <workdir>/prompts.npz; '
                     f'they cannot be exported as {fmt!r}: {e}') from None


def export_checkpoint(config, workdir: str, out: str, fmt: str = 'lorajax',
                      step: int | str | None = None) -> str:
  """Writes a run's saved adapter as a file its users can load elsewhere.

  Formats: ``'lorajax'`` (``io.save_adapter``: safetensors + spec +
  base fingerprint), ``'peft'`` (``adapter_config.json`` +
  ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``) and
  ``'merged'`` (an HF checkpoint with the adapters folded in). A PiSSA run
  is converted first (``lorajax.pissa.to_lora``), so its file fits the
  pretrained base, not the residual it trained on.

  Args:
    config: the run's config.
    workdir: the run's workdir (``checkpoints/`` inside).
    out: the directory to write.
    fmt: one of ``EXPORT_FORMATS``.
    step: the checkpoint step; None takes the latest complete one,
      ``'best'`` the best validation step's.

  Returns:
    ``out``.

  Raises:
    ValueError: an unknown format, a prompt-learning run other than a
      causal LM's prompt or P-tuning as ``peft`` (``io.peft_prompts``; its
      virtual tokens are in ``prompts.npz``), ``peft``/``merged`` of a
      ``model.factory`` model, or a checkpoint of another spec or model.
  """
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f'format {fmt!r}; expected one of {EXPORT_FORMATS}')
  model_factory.check_export(config, fmt)   # no HF class for your model
  trainable_tokens.check_export(config, fmt)   # token rows: peft or merged
  if config.method in config_lib.PROMPT_METHODS:
    _check_prompt_export(config, fmt)
  # No data: export scores none; a classifier's classes are in the meta.
  labels = saved_run.labels(workdir, step) or ()
  model = model_loading.load_model(config, labels)
  method = attach.attach_method(config, model)
  trainable, frozen = method.split_params()
  folder, step = _checkpoint_dir(workdir, step)
  trainable, _ = ckpt_lib.restore_trainable(
      folder, trainable,
      run_meta(config, method.spec, model.info, trainable), step)
  trainable = jax.device_get(trainable)
  if config.method in config_lib.PROMPT_METHODS:   # PEFT's prompt_embeddings
    return str(peft_prompts.export_peft_prompt(
        out, model.config, trainable['prompts'], **attach.hf_origin(config)))
  spec, adapters = method.spec, trainable['adapters']
  tuned = lorajax.combine(trainable['params'], frozen)   # what it ran with
  rows = method.token_rows   # trained token rows, written or exported
  tokens = None if rows is None else (rows, trainable['tokens'])
  if fmt == 'merged':
    if rows is not None:
      tuned = rows.merge(tuned, trainable['tokens'])
    io_lib.export_merged(out, model.config, tuned, adapters, spec,
                         **attach.hf_origin(config))
    if labels:
      _name_labels(os.path.join(out, 'config.json'), labels)
    trainable_tokens.write_tokenizer(out, config, model)
    return out
  base = lorajax.combine(trainable['params'],
                         lorajax.partition(method.original_params, spec)[1])
  if lorajax.pissa.uses_pissa(spec):
    spec, adapters = lorajax.pissa.to_lora(spec, base, adapters,
                                           start=method.adapters)
  if fmt == 'peft':   # QLoRA/LoftQ: with the dequantized base it ran on
    export = (peft_dequantized.export_peft_dequantized
              if config.method == 'qlora' else io_lib.export_peft)
    export(out, model.config, spec, adapters, base, tokens=tokens,
           **attach.hf_origin(config))
    trainable_tokens.write_tokenizer(out, config, model)
  else:
    io_lib.save_adapter(out, spec, adapters, base,
                        metadata={'config': config.name, 'workdir': workdir})
  return out
