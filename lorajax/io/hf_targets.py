"""LoRA targets by PEFT's names: ``'all-linear'`` and the family's defaults.

A run's ``lora.targets`` is a regex over Flax parameter paths, or one of
``SHORTHANDS``, resolved here against the model's Hugging Face naming
(``hf_models.HfModel``) into the exact regex of the kernels PEFT would pick
on the same transformers model:

- ``'all-linear'``: every Linear of the model but the task head's
  (``lm_head``; the ``classifier`` that PEFT's sequence classification saves
  whole), as ``LoraConfig(target_modules='all-linear')`` resolves it — which
  includes BERT's ``pooler.dense``, a Linear of the base model;
- ``'default'``: PEFT's default targets of the family
  (``LoraConfig(target_modules=None)``: ``q_proj``/``v_proj``,
  ``query``/``value``); refused by name for a family PEFT has none for.

Example:

  >>> hf = hf_models.hf_model(config)                        # doctest: +SKIP
  >>> lora_targets('all-linear', hf, params)                 # doctest: +SKIP
  'layers_\\\\d+/(?:attn/k_proj/kernel|attn/o_proj/kernel|...)'
"""

from __future__ import annotations

import re
from typing import Any

from lorajax import spec as spec_lib
from lorajax import spec_paths
from lorajax.io import hf_models

PyTree = Any
SHORTHANDS = ('all-linear', 'default')


def target_modules(shorthand: str, hf: hf_models.HfModel) -> list[str]:
  """The HF module names ``shorthand`` selects on ``hf``'s model.

  Raises:
    ValueError: an unknown shorthand, or ``'default'`` for a family PEFT
      has no default targets for.
  """
  if shorthand == 'all-linear':
    return hf.linear_modules()
  if shorthand == 'default':
    names = hf.naming.default_targets
    if not names:
      raise ValueError(
          f"lora.targets='default': PEFT has no default LoRA targets for "
          f'model_type={hf.family!r}; name them (a regex over parameter '
          f"paths, or 'all-linear')")
    return [m for m in hf.linear_modules() if m.split('.')[-1] in names]
  raise ValueError(f'lora.targets={shorthand!r}: expected a regex over '
                   f'parameter paths or one of {SHORTHANDS}')


def lora_targets(shorthand: str, hf: hf_models.HfModel, params: PyTree
                 ) -> str:
  """The regex over ``params``' paths of the kernels ``shorthand`` selects.

  Args:
    shorthand: one of ``SHORTHANDS``.
    hf: the model's naming (``hf_models.hf_model``).
    params: the model's parameters (scanned layers give ``layers/...``).

  Returns:
    A pattern whose ``re.fullmatch`` selects exactly those kernels.
  """
  kernels = hf.kernel_modules()
  paths = {kernels[m] for m in target_modules(shorthand, hf)}
  if hf.scanned:
    paths = {re.sub(r'^layers_\d+/', 'layers/', p) for p in paths}
  universe = [p for p, _ in spec_lib.flatten_paths(params)]
  missing = sorted(paths - set(universe))
  if missing:
    raise ValueError(f'lora.targets={shorthand!r}: the params lack '
                     f'{missing[:4]}')
  return spec_paths.exact_regex(paths, universe)
