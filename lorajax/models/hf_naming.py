"""How each Hugging Face family names lorajax's parameters, by ``model_type``.

``lorajax.models.load`` reads a checkpoint of a family into lorajax's Flax
modules; the way back (a merged checkpoint, a PEFT adapter, PEFT target
names such as ``'all-linear'``) needs the same correspondence in the other
direction. A ``Family`` holds it as data: the key map of each head
(``'causal_lm'``, ``'classification'``, ``'base'``), the reader of
``config.json``, the prefix of the base model's keys, the head's modules and
PEFT's default LoRA targets. Export and import code is written once against
this record, so a new family plugs in with one entry of ``FAMILIES`` (its key
map and config reader) and no new export code; a ``model_type`` without an
entry is refused by name (``family``).

Example:

  >>> fam = family('qwen2')
  >>> fam.prefix('causal_lm'), fam.prefix('base'), fam.default_targets
  ('model.', '', ('q_proj', 'v_proj'))
  >>> family('gpt2')  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: model_type='gpt2': lorajax has no Hugging Face key map for this family (it maps [...]); export and PEFT import need one
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from lorajax.models import bert_loading
from lorajax.models import hf_decoders
from lorajax.models import hf_encoders
from lorajax.models import hf_moe
from lorajax.models import llama_layout

# PEFT's own default LoRA targets by model type (the module names its
# ``LoraConfig(target_modules=None)`` picks); families it has none for
# (Phi-3) have none here either.
PEFT_DEFAULT_TARGETS = {
    'llama': ('q_proj', 'v_proj'), 'mistral': ('q_proj', 'v_proj'),
    'mixtral': ('q_proj', 'v_proj'), 'qwen2': ('q_proj', 'v_proj'),
    'qwen3': ('q_proj', 'v_proj'), 'gemma': ('q_proj', 'v_proj'),
    'gemma2': ('q_proj', 'v_proj'), 'bert': ('query', 'value'),
    'roberta': ('query', 'value'), 'xlm-roberta': ('query', 'value'),
}
# transformers' class-name stem of a family, when the source config.json
# names no architecture to take it from.
CLASS_STEMS = {
    'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2', 'qwen3': 'Qwen3',
    'gemma': 'Gemma', 'gemma2': 'Gemma2', 'phi3': 'Phi3',
    'mixtral': 'Mixtral', 'qwen3_moe': 'Qwen3Moe', 'bert': 'Bert',
    'roberta': 'Roberta', 'xlm-roberta': 'XLMRoberta',
    'distilbert': 'DistilBert',
}
# Modules of a family's sequence-classification head beyond ``classifier``:
# PEFT's wrapper saves every module whose name ends in ``classifier``
# (DistilBERT's ``pre_classifier`` too), so no LoRA can go there.
EXTRA_HEAD_MODULES = {'distilbert': ('pre_classifier',)}
# The class-name suffix of each head.
HEAD_SUFFIXES = {'causal_lm': 'ForCausalLM',
                 'classification': 'ForSequenceClassification',
                 'base': 'Model'}
# PEFT's task type of each head (a bare model has none).
TASK_TYPES = {'causal_lm': 'CAUSAL_LM', 'classification': 'SEQ_CLS',
              'base': None}
# Config fields that do not change a trained model's outputs (precision,
# layout, dropout, initialization): not compared with config.json.
FREE_FIELDS = ('dtype', 'param_dtype', 'scan_layers', 'remat', 'lean_backward',
               'save_attention_probs', 'hidden_dropout', 'attention_dropout',
               'classifier_dropout', 'initializer_range', 'num_labels')


def _torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  """A Flax ``[in, out]`` Dense kernel as PyTorch's ``[out, in]``."""
  if path.endswith('/kernel'):
    if value.ndim != 2:
      raise ValueError(f'{path} is a {value.ndim}-D kernel; this family\'s '
                       'entry has no rule for writing it as a Linear weight')
    return value.T
  return value


@dataclasses.dataclass(frozen=True)
class Family:
  """One ``model_type``'s correspondence with lorajax's parameters.

  Attributes:
    model_type: ``config.json``'s ``model_type``.
    heads: the heads lorajax loads for it.
    prefixes: head -> prefix of the base model's keys (``'model.'``,
      ``'bert.'``; ``''`` for the bare model).
    read_config: ``config.json`` dict (and overrides) -> lorajax config.
    key_map: ``(config, head)`` -> ``{flax path: HF key}`` of every
      parameter that head's checkpoint holds (unscanned paths).
    shapes: lorajax config -> ``{flax path: shape}`` (unscanned).
    head_modules: HF modules of the task heads (saved whole by PEFT,
      never LoRA targets of ``'all-linear'``).
    default_targets: PEFT's default LoRA module names, or ``()``.
    to_torch: ``(flax path, array)`` -> the HF tensor.
    unused: head -> flax path prefixes that head does not compute with
      (a bare encoder's classifier).
    renamed: source key -> True for tensors the loader reads under other
      names (per-expert MoE weights), which an export never copies as
      they are.
  """
  model_type: str
  heads: tuple[str, ...]
  prefixes: dict[str, str]
  read_config: Callable[..., Any]
  key_map: Callable[[Any, str], dict[str, str]]
  shapes: Callable[[Any], dict[str, tuple[int, ...]]]
  head_modules: tuple[str, ...]
  default_targets: tuple[str, ...] = ()
  to_torch: Callable[[str, np.ndarray], np.ndarray] = _torch_layout
  unused: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  renamed: Callable[[str], bool] = lambda key: False

  def prefix(self, head: str) -> str:
    return self.prefixes[head]


def _decoder_keys(config: Any, head: str) -> dict[str, str]:
  if head == 'base':
    return hf_decoders.hf_keys(config.replace(tie_embeddings=True,
                                              scan_layers=False), '')
  return hf_decoders.hf_keys(config.replace(scan_layers=False), 'model.')


def _decoder(model_type: str) -> Family:
  return Family(
      model_type, heads=('causal_lm', 'base'),
      prefixes={'causal_lm': 'model.', 'base': ''},
      read_config=hf_decoders.decoder_config, key_map=_decoder_keys,
      shapes=lambda c: llama_layout.expected_shapes(
          c.replace(scan_layers=False)),
      head_modules=('lm_head',),
      default_targets=PEFT_DEFAULT_TARGETS.get(model_type, ()))


def _encoder(model_type: str) -> Family:
  base = hf_encoders.ENCODER_TYPES[model_type] + '.'

  def key_map(config, head):
    if head == 'base':
      return {p: k for p, k in hf_encoders.hf_keys(config, '').items()
              if not p.startswith('classifier/')}
    return hf_encoders.hf_keys(config, base)

  return Family(
      model_type, heads=('classification', 'base'),
      prefixes={'classification': base, 'base': ''},
      read_config=hf_encoders.encoder_config, key_map=key_map,
      shapes=bert_loading.expected_shapes,
      head_modules=('classifier',) + EXTRA_HEAD_MODULES.get(model_type, ()),
      default_targets=PEFT_DEFAULT_TARGETS.get(model_type, ()),
      unused={'base': ('classifier/',)})


def _moe(model_type: str) -> Family:
  return Family(
      model_type, heads=('causal_lm', 'base'),
      prefixes={'causal_lm': 'model.', 'base': ''},
      read_config=hf_moe.moe_config, key_map=hf_moe.key_map,
      shapes=lambda c: hf_moe.expected_shapes(c.replace(scan_layers=False)),
      head_modules=('lm_head',), to_torch=hf_moe.to_torch,
      renamed=hf_moe.is_per_expert_key,
      default_targets=PEFT_DEFAULT_TARGETS.get(model_type, ()))


# model_type -> Family: every family lorajax.models.load reads.
FAMILIES = {**{t: _decoder(t) for t in hf_decoders.DECODER_TYPES},
            **{t: _moe(t) for t in hf_moe.MOE_TYPES},
            **{t: _encoder(t) for t in hf_encoders.ENCODER_TYPES}}


def family(model_type: str) -> Family:
  """The ``Family`` of ``model_type``.

  Raises:
    ValueError: naming the model type when no entry maps it.
  """
  if model_type not in FAMILIES:
    raise ValueError(
        f'model_type={model_type!r}: lorajax has no Hugging Face key map for '
        f'this family (it maps {sorted(FAMILIES)}); export and PEFT import '
        'need one')
  return FAMILIES[model_type]


def architecture(hf: dict[str, Any], head: str) -> str:
  """The transformers class of ``head`` for the family of ``hf``
  (``config.json``): the stem of its own ``architectures`` entry, else the
  family's known stem, plus the head's suffix.

  Raises:
    ValueError: the stem cannot be told (no ``architectures`` of a known
      head and no known stem), naming the field.
  """
  for arch in hf.get('architectures') or ():
    for suffix in HEAD_SUFFIXES.values():
      if arch.endswith(suffix) and len(arch) > len(suffix):
        return arch[:-len(suffix)] + HEAD_SUFFIXES[head]
  model_type = hf.get('model_type')
  if model_type in CLASS_STEMS:
    return CLASS_STEMS[model_type] + HEAD_SUFFIXES[head]
  raise ValueError(f'config.json architectures={hf.get("architectures")!r}: '
                   f'cannot tell the transformers class of model_type='
                   f'{model_type!r}')
