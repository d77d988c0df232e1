"""Prompt tuning and P-tuning in Hugging Face PEFT's format, both ways.

PEFT saves the prompt-learning methods as the tensor they feed the model,
``prompt_embeddings`` in ``adapter_model.safetensors``: ``[n, hidden]``
virtual input embeddings for ``PROMPT_TUNING`` and ``P_TUNING`` (the prompt
encoder's output; a lorajax P-tuning run is folded on the way out), and
``[n, layers * 2 * kv_heads * head_dim]`` past keys and values for
``PREFIX_TUNING`` (per virtual token: layer-major, then key before value,
then heads). ``PeftModel.from_pretrained`` loads them in inference mode and
uses that tensor as is.

Only what reproduces lorajax's numbers in PEFT is written or read; the rest
is refused with the reason (measured against PEFT 0.21.2 and transformers
on tiny random models, ``tests/test_prompt_peft.py``):

- a causal LM with a prompt (prompt tuning, P-tuning): PEFT prepends the
  prompt to the input embeddings and numbers every position from 0, the
  virtual tokens first, as lorajax's decoders do: supported.
- a sequence classifier with a prompt: PEFT's ``*ForSequenceClassification``
  pools the first position, which is then virtual token 0; lorajax's
  classifier reads the input's own first token (``[CLS]``): refused.
- prefix tuning, every family: PEFT hands the prefix to the model as a
  cached past, so the real tokens' positions start at ``num_virtual_tokens``
  (BERT's learned position embeddings, Llama's RoPE); lorajax's models
  number them from 0: refused. ``prefix_to_peft``/``prefix_from_peft``
  give the tensor layout (checked with the positions offset by hand).
- heads other than ``causal_lm`` (a bare model's hidden states include the
  virtual tokens in PEFT), and embeddings scaled by ``sqrt(d)`` (Gemma):
  refused.

Example:

  >>> export_peft_prompt('/tmp/out', model.config, {'prompt': p},
  ...                    source='/ckpt')            # doctest: +SKIP
  >>> import_peft_prompt('/tmp/out', model.config,
  ...                    source='/ckpt')            # doctest: +SKIP
  {'prompt': Array[n, d]}
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from safetensors import numpy as st_numpy

from lorajax.io import hf_models
from lorajax.methods import prompts as prompts_lib
from lorajax.methods import ptuning

PyTree = Any
CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
KEY = 'prompt_embeddings'
# lorajax prompts-tree key -> PEFT's peft_type.
PEFT_TYPES = {'prompt': 'PROMPT_TUNING', 'prompt_encoder': 'P_TUNING',
              'prefix': 'PREFIX_TUNING', 'prefix_mlp': 'PREFIX_TUNING'}
# config.method -> PEFT's peft_type.
METHOD_TYPES = {'prompt': 'PROMPT_TUNING', 'ptuning': 'P_TUNING',
                'prefix': 'PREFIX_TUNING'}
_PREFIX_REASON = (
    'PEFT passes the prefix to the model as a cached past, so the real '
    "tokens' positions start at num_virtual_tokens (position embeddings, "
    "RoPE), where lorajax's models number them from 0; the logits would "
    'differ')


class PeftPromptError(ValueError):
  """A prompt-learning adapter PEFT would compute differently."""


def _geometry(config: Any) -> tuple[int, int, int, int]:
  """``(hidden, layers, kv_heads, head_dim)`` of a BERT or Llama config."""
  kv = getattr(config, 'num_kv_heads', None) or config.num_heads
  return (int(config.hidden_size), int(config.num_layers), int(kv),
          int(config.head_dim))


def prefix_to_peft(prefix: jax.Array) -> np.ndarray:
  """lorajax's ``[L, 2, n, kv, hd]`` prefix as PEFT's ``[n, L*2*kv*hd]``."""
  p = np.asarray(prefix)
  return p.transpose(2, 0, 1, 3, 4).reshape(p.shape[2], -1)


def prefix_from_peft(embeddings: np.ndarray, config: Any) -> np.ndarray:
  """PEFT's ``[n, L*2*kv*hd]`` prefix as lorajax's ``[L, 2, n, kv, hd]``.

  Raises:
    PeftPromptError: a width other than ``L*2*kv*hd`` of ``config``.
  """
  _, layers, kv, hd = _geometry(config)
  e = np.asarray(embeddings)
  if e.ndim != 2 or e.shape[1] != layers * 2 * kv * hd:
    raise PeftPromptError(f'{KEY} has shape {e.shape}; a prefix of this '
                          f'model is [n, {layers}*2*{kv}*{hd}]')
  return e.reshape(e.shape[0], layers, 2, kv, hd).transpose(1, 2, 0, 3, 4)


def check_method(peft_type: str, head: str, architecture: str = 'the model'
                 ) -> None:
  """Raises ``PeftPromptError`` unless PEFT computes ``peft_type`` with a
  ``head`` model as lorajax does (see the module doc); needs no weights.

  Args:
    peft_type: ``'PROMPT_TUNING'``, ``'P_TUNING'`` or ``'PREFIX_TUNING'``.
    head: ``'causal_lm'``, ``'classification'`` or ``'base'``.
    architecture: the transformers class, for the message.
  """
  if peft_type == 'PREFIX_TUNING':
    raise PeftPromptError(f'peft_type={peft_type!r} on {architecture}: '
                          f'{_PREFIX_REASON}')
  if peft_type not in ('PROMPT_TUNING', 'P_TUNING'):
    raise PeftPromptError(f'peft_type={peft_type!r}; expected one of '
                          "('PROMPT_TUNING', 'P_TUNING', 'PREFIX_TUNING')")
  if head == 'classification':
    raise PeftPromptError(
        f'{peft_type} with head={head!r} ({architecture}): PEFT prepends '
        'the prompt and the classifier pools the first position, virtual '
        "token 0; lorajax's classifier reads the input's own first token. "
        'The logits would differ')
  if head != 'causal_lm':
    raise PeftPromptError(
        f'{peft_type} with head={head!r} ({architecture}): only '
        "'causal_lm' gives lorajax's outputs in PEFT (a bare model's hidden "
        'states include the virtual tokens there)')


def check_expressible(hf: hf_models.HfModel, peft_type: str) -> None:
  """``check_method`` for ``hf`` (from ``hf_models.hf_model``), and its
  embedding scale.

  Raises:
    PeftPromptError: see ``check_method``; embeddings scaled by
      ``sqrt(d)`` (Gemma), which no test compares with PEFT.
  """
  check_method(peft_type, hf.head, hf.architecture)
  if getattr(hf.config, 'scale_embeddings', False):
    raise PeftPromptError(
        f'{peft_type} on {hf.architecture} with scale_embeddings=True: the '
        "sqrt(d) embedding scale is not checked against PEFT's prompt")


def _tree_type(prompts: PyTree) -> str:
  keys = sorted(prompts or {})
  types = {PEFT_TYPES.get(k) for k in keys}
  if not keys or None in types or len(keys) > 1:
    raise PeftPromptError(
        f'prompts has keys {keys}; PEFT saves one method: one of '
        f'{sorted(PEFT_TYPES)}')
  return types.pop()


def export_peft_prompt(directory: str | os.PathLike[str], config: Any,
                       prompts: PyTree, *,
                       source: str | os.PathLike[str] | None = None,
                       head: str | None = None,
                       base_model_name_or_path: str | None = None
                       ) -> pathlib.Path:
  """Writes a prompt-learning result for ``PeftModel.from_pretrained``.

  Args:
    directory: created if needed; written only once every check passed.
    config: the model's ``LlamaConfig`` (or a family's config).
    prompts: the run's ``prompts`` tree: ``{'prompt': [n, d]}`` (prompt
      tuning) or ``{'prompt_encoder': ...}`` (P-tuning; its prompt is
      computed and saved, with the encoder's type and width recorded).
    source: the Hugging Face checkpoint directory the model was loaded from;
      None for the shipped models.
    head: the head PEFT will wrap (default the source's own).
    base_model_name_or_path: recorded for PEFT; default ``source``.

  Returns:
    The directory.

  Raises:
    PeftPromptError: before writing: a tree of several methods, prefix
      tuning, a head or model PEFT computes differently (module doc).
  """
  peft_type = _tree_type(prompts)
  hf = hf_models.hf_model(config, source=source, head=head)
  check_expressible(hf, peft_type)
  hidden, layers, _, _ = _geometry(config)
  embeddings = np.asarray(jax.device_get(
      prompts_lib.model_inputs(prompts)['prompt']), np.float32)
  if embeddings.ndim != 2 or embeddings.shape[1] != hidden:
    raise PeftPromptError(f'the prompt has shape {embeddings.shape}; PEFT '
                          f'saves one [n, {hidden}] for every batch row')
  cfg = {'peft_type': peft_type, 'task_type': hf.task_type,
         'num_virtual_tokens': int(embeddings.shape[0]),
         'token_dim': hidden, 'num_transformer_submodules': 1,
         'num_attention_heads': int(config.num_heads), 'num_layers': layers,
         'inference_mode': True,
         'base_model_name_or_path': (base_model_name_or_path
                                     or (str(source) if source else None))}
  if peft_type == 'PROMPT_TUNING':
    cfg['prompt_tuning_init'] = 'RANDOM'
  else:
    cfg.update(ptuning.describe(prompts['prompt_encoder']))
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  st_numpy.save_file({KEY: np.ascontiguousarray(embeddings)},
                     str(out / WEIGHTS_NAME), metadata={'format': 'pt'})
  (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2),
                                 encoding='utf-8')
  return out


def import_peft_prompt(directory: str | os.PathLike[str], config: Any, *,
                       source: str | os.PathLike[str] | None = None,
                       head: str | None = None) -> PyTree:
  """Reads a PEFT prompt-tuning or P-tuning adapter as a ``prompts`` tree.

  Args:
    directory: with ``adapter_config.json`` and
      ``adapter_model.safetensors``.
    config: the lorajax model's config.
    source, head: as for ``export_peft_prompt``.

  Returns:
    ``{'prompt': [n, hidden] float32}`` (a P-tuning adapter is saved as the
    prompt its encoder computed, so it arrives folded).

  Raises:
    PeftPromptError: another peft_type, prefix tuning, a head PEFT computes
      differently, or a tensor or field that does not fit the model (named).
  """
  directory = pathlib.Path(directory)
  cfg = json.loads((directory / CONFIG_NAME).read_text(encoding='utf-8'))
  peft_type = cfg.get('peft_type')
  hf = hf_models.hf_model(config, source=source, head=head)
  check_expressible(hf, peft_type)
  if cfg.get('task_type') != hf.task_type:
    raise PeftPromptError(f"task_type={cfg.get('task_type')!r} in "
                          f'{CONFIG_NAME}; this model is {hf.task_type!r}')
  if peft_type == 'P_TUNING':   # the saved prompt is the encoder's output
    ptuning.check_encoder_type(cfg.get('encoder_reparameterization_type',
                                       'MLP'))
  for field in ('num_transformer_submodules',):
    if cfg.get(field) not in (None, 1):
      raise PeftPromptError(f'{field}={cfg[field]!r}; expected 1 (a decoder)')
  tensors = st_numpy.load_file(str(directory / WEIGHTS_NAME))
  if set(tensors) != {KEY}:
    raise PeftPromptError(f'{WEIGHTS_NAME} has {sorted(tensors)}; expected '
                          f'[{KEY!r}]')
  emb = tensors[KEY]
  hidden = _geometry(config)[0]
  n = cfg.get('num_virtual_tokens')
  if emb.shape != (n, hidden):
    raise PeftPromptError(f'{KEY} has shape {emb.shape}; expected '
                          f'[num_virtual_tokens={n}, hidden={hidden}]')
  return {'prompt': jax.numpy.asarray(emb, jax.numpy.float32)}
