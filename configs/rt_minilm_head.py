r"""Head-only training on frozen all-MiniLM-L6-v2: the linear-probe baseline.

Only the new classifier on the mean-pooled sentence vector is trained (770
parameters), with the data, steps and batch of ``rt_minilm_lora.py``.

Run:

  python -m experiments.train --config configs/rt_minilm_head.py \
      --workdir /tmp/lorajax_head

Expected (measured): validation accuracy 0.786, test accuracy 0.746, about 7
points below LoRA.
"""

from lorajax.training import config as config_lib


def get_config(arg=None):
  """The config; ``arg`` may be ``'smoke'``."""
  arg = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.minilm_rotten_tomatoes()
  c.name = 'rt_minilm_head'
  c.method = 'head'
  c.optim.learning_rate = 1e-2
  if arg.smoke:
    config_lib.shrink(c)
  c.lock()
  return c
