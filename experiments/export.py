r"""Exports a trained run's adapter: ``python -m experiments.export``.

  python -m experiments.export --workdir /tmp/lorajax_main \
      --out /tmp/rt_peft --format peft

The same command as ``python -m lorajax.cli.export`` (kept here for old
command lines): the run's config is read from its checkpoint, or from
``--config`` (and ``--config.*`` overrides) where given. ``--format`` is
``lorajax`` (safetensors + spec + base fingerprint, for
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

from lorajax.cli import export

if __name__ == '__main__':
  export.run()
