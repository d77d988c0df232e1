"""A QLoRA or LoftQ adapter for PEFT, with the base it was trained on.

A ``QLora`` adapter runs on ``deq(Q)``, not on the float kernels: PEFT
would put it on the float checkpoint and its logits would differ by the
quantization error, and a LoftQ adapter (``QLora(init='loftq')``) was chosen
to cancel that very error. So ``export_peft`` refuses a quantized base, and
this module writes what PEFT needs instead, as PEFT's own LoftQ recipe does
(``save_pretrained`` of the modified base, then the adapter on it)::

  out/                  adapter_config.json + adapter_model.safetensors
                        (plain LoRA; base_model_name_or_path -> out/base)
  out/base/             config.json + model.safetensors: the dequantized
                        base as a Hugging Face checkpoint

``PeftModel.from_pretrained(AutoModel...from_pretrained(out / 'base'), out)``
then computes what lorajax computes (tests/test_loftq.py). The base is as
large as the float model (float32 or its dtype), not 4-bit.

Example:

  >>> export_peft_dequantized('/tmp/loftq', config, spec, adapters,
  ...                         qparams)                      # doctest: +SKIP
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from lorajax import spec as spec_lib
from lorajax.io import digests
from lorajax.io import hf_models
from lorajax.io import peft_export
from lorajax.methods import low_rank
from lorajax.methods import qlora
from lorajax.methods import quant

PyTree = Any
BASE_DIR = 'base'


def lora_spec(spec: spec_lib.LoraSpec) -> spec_lib.LoraSpec:
  """``spec`` with ``QLora`` rules as the ``Lora`` they compute on the
  dequantized base and ``Quantized`` rules frozen."""
  rules = []
  for pattern, action in spec.rules:
    if isinstance(action, qlora.QLora):
      action = low_rank.Lora(rank=action.rank, alpha=action.alpha,
                             use_rslora=action.use_rslora,
                             dropout=action.dropout,
                             batch_axes=action.batch_axes)
    elif isinstance(action, qlora.Quantized):
      action = spec_lib.FREEZE
    rules.append((pattern, action))
  return spec_lib.LoraSpec(rules)


def export_peft_dequantized(directory: str | os.PathLike[str], config: Any,
                            spec: spec_lib.LoraSpec, adapters: PyTree,
                            params: PyTree, *,
                            source: str | os.PathLike[str] | None = None,
                            head: str | None = None,
                            **peft_kwargs: Any) -> pathlib.Path:
  """Writes the dequantized base to ``directory/base``, then the adapter.

  Args:
    directory: the PEFT adapter directory (created if needed).
    config: the model's config.
    spec: the run's spec (``QLora``, ``Quantized`` and other rules).
    adapters: the adapters.
    params: the base they run on, quantized kernels in place (trained
      leaves such as a classifier head in place too: they are saved as
      ``modules_to_save``).
    source: the Hugging Face directory the model was loaded from (its
      config and tokenizer files are kept in ``base/``).
    head: the head to write (default: the source's own).
    **peft_kwargs: more keywords of ``export_peft``.

  Returns:
    ``directory``.

  Raises:
    PeftFormatError, ValueError: from ``export_peft`` and ``export_merged``
      (what PEFT or transformers cannot express); nothing is written.
  """
  directory = pathlib.Path(directory).absolute()
  dense = quant.dequantize_params(params)
  plain = lora_spec(spec)
  # Both in one staging folder: a refusal or a failure writes nothing.
  with digests.writing(directory) as staging:
    hf_models.export_merged(staging / BASE_DIR, config, dense, source=source,
                            head=head)
    peft_export.export_peft(staging, config, plain, adapters, dense,
                            base_model_name_or_path=str(directory / BASE_DIR),
                            source=source, head=head, **peft_kwargs)
  return directory


__all__ = ['BASE_DIR', 'export_peft_dequantized', 'lora_spec']
