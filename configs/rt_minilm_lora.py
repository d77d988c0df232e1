r"""LoRA on all-MiniLM-L6-v2 for Rotten Tomatoes sentiment: the main job.

Rank-8 adapters (alpha 16) on every attention query and value kernel, and a
new 2-way classifier on the mean-pooled tokens; the 22.7M base parameters stay
frozen (75k trained, 0.33%).

Run (5 CPU-minutes of compute; about 6 minutes on an idle 2-core machine):

  python -m experiments.train --config configs/rt_minilm_lora.py \
      --workdir /tmp/lorajax_main

Expected (measured on 2026-11-22, 190 s on an idle 2-core CPU): validation
accuracy 0.842, test accuracy 0.813; the adapter checkpoint (trainable/) is
291 KB, 881 KB with the optimizer state.

``--config configs/rt_minilm_lora.py:smoke`` shrinks it to a tiny random
model and a few steps (seconds; for tests).
"""

from lorajax.training import config as config_lib


def get_config(arg=None):
  """The config; ``arg`` may be ``'smoke'``."""
  arg = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.minilm_rotten_tomatoes()
  c.name = 'rt_minilm_lora'
  c.method = 'lora'
  c.optim.learning_rate = 1e-3
  if arg.smoke:
    config_lib.shrink(c)
  c.lock()
  return c
