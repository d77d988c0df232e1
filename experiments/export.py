r"""Exports a trained run's adapter: ``python -m experiments.export``.

  python -m experiments.export --config configs/rt_minilm_lora.py \
      --workdir /tmp/lorajax_main --out /tmp/rt_peft --format peft

Pass the run's own ``--config`` (and ``--config.*`` overrides) and workdir.
``--format`` is ``lorajax`` (safetensors + spec + base fingerprint, for
``lorajax.io.load_adapter``), ``peft`` (for ``PeftModel.from_pretrained``) or
``merged`` (an HF checkpoint with the adapters folded in). A PiSSA run is
converted to a plain LoRA of the pretrained model on the way out.

``peft`` and ``merged`` reproduce the run's logits in transformers (to 1e-4)
or stop with an error that says what the format cannot express, writing
nothing: a classifier on mean-pooled tokens (``model.pooling='mean'``;
``BertForSequenceClassification`` reads ``[CLS]`` through its pooler),
bottleneck adapters, or, for ``peft``, a QLoRA run (PEFT would put the
adapter on the float base; ``merged`` folds it into the dequantized one).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from lorajax.training import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/rt_minilm_lora.py', 'The run\'s config (path[:arg]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run\'s workdir.',
                               required=True)
_OUT = flags.DEFINE_string('out', None, 'Directory to write.', required=True)
_FORMAT = flags.DEFINE_enum('format', 'lorajax', list(train.EXPORT_FORMATS),
                            'What to write.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the '
                             'latest complete one).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  out = train.export_checkpoint(_CONFIG.value, _WORKDIR.value, _OUT.value,
                                _FORMAT.value, _STEP.value)
  print(f'wrote {_FORMAT.value} adapter of {_WORKDIR.value} to {out}')


if __name__ == '__main__':
  app.run(main)
