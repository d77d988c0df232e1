r"""Full fine-tuning of all-MiniLM-L6-v2 on Rotten Tomatoes: LoRA's reference.

Every parameter but the unused [CLS] pooler is trained (22.5M), with the data,
steps and batch of ``rt_minilm_lora.py``.

Run:

  python -m experiments.train --config configs/rt_minilm_full.py \
      --workdir /tmp/lorajax_full

Expected (measured): validation accuracy 0.859, test accuracy 0.831 (LoRA:
0.838 / 0.815, within 2 points); the checkpoint's trainable/ is 79.6 MB.
"""

from lorajax.training import config as config_lib


def get_config(arg=None):
  """The config; ``arg`` may be ``'smoke'``."""
  arg = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.minilm_rotten_tomatoes()
  c.name = 'rt_minilm_full'
  c.method = 'full'
  c.optim.learning_rate = 5e-5
  if arg.smoke:
    config_lib.shrink(c)
  c.lock()
  return c
