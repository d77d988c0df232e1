r"""Writes a finished run's adapter as a file: ``python -m lorajax.cli.export``.

  python -m lorajax.cli.export --workdir /tmp/lorajax_main --format peft \
      --out /tmp/rt_peft

The run's config is read from its checkpoint (no override is typed again;
``--config`` with overrides still replaces it, for a checkpoint written
without one), and no data is read. ``--format`` is ``lorajax``
(safetensors + spec + base fingerprint, for ``lorajax.io.load_adapter``),
``peft`` (for ``PeftModel.from_pretrained``) or ``merged`` (an HF checkpoint
with the adapters folded in; a classifier's classes are its ``id2label``). A
PiSSA run is converted to a plain LoRA of the pretrained model on the way
out. ``--step`` is a step number, ``best`` or, by default, the latest.

A run on a Hugging Face folder (``config.model.path``, any family
``lorajax.models.load`` reads) exports for that folder: ``peft`` records it
as ``base_model_name_or_path``, and ``merged`` keeps its ``config.json``
(RoPE, sliding window, every field) with the trained head's
``architectures`` and copies its tokenizer files.

``peft`` and ``merged`` reproduce the run's logits in transformers (to 1e-4)
or stop with an error that says what the format cannot express, writing
nothing: a classifier on mean-pooled tokens (``model.pooling='mean'``;
``BertForSequenceClassification`` reads ``[CLS]`` through its pooler) or
bottleneck adapters. A QLoRA or LoftQ run's ``peft`` export also writes the
base it ran on, dequantized, to ``<out>/base`` (the adapter's
``base_model_name_or_path``; ``lorajax.io.peft_dequantized``): on the float
base PEFT's logits would differ by the quantization error.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from lorajax.training import console
from lorajax.training import finished
from lorajax.training import saved_run

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The run\'s config (path[:arg]); default: the one saved '
    'in the workdir\'s checkpoint.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run\'s workdir.',
                               required=True)
_OUT = flags.DEFINE_string('out', None, 'Directory to write.', required=True)
_FORMAT = flags.DEFINE_enum('format', 'lorajax', list(finished.EXPORT_FORMATS),
                            'What to write.')
_STEP = flags.DEFINE_string('step', None, 'Checkpoint step, or "best"; '
                            'default the latest.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    step = saved_run.parse_step(_STEP.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with console.capture_logs(_WORKDIR.value):   # Library logs to info.log.
    config = _CONFIG.value or saved_run.run_config(_WORKDIR.value, step)
    out = finished.export_checkpoint(config, _WORKDIR.value, _OUT.value,
                                     _FORMAT.value, step)
  print(f'wrote {_FORMAT.value} adapter of {_WORKDIR.value} to {out}')


def run() -> None:
  """The ``lorajax-export`` console script."""
  app.run(main)


if __name__ == '__main__':
  run()
