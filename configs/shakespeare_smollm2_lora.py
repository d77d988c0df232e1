r"""LoRA on SmolLM2-135M for Shakespeare: causal-LM fine-tuning on a CPU.

Rank-8 adapters (alpha 16) on every attention q and v projection of the 30
layers; windows of 128 tokens packed from the plays (split by play).
Validation perplexity on a fixed slice is measured before the first step and
after training.

Run (about 4.5 CPU-minutes of compute):

  python -m experiments.train --config configs/shakespeare_smollm2_lora.py \
      --workdir /tmp/lorajax_shakespeare

Expected (measured): validation perplexity 61.7 before the first step, 41.7
after 40 steps and 40.5 after 80 (test 40.3); adapter 1.7 MB.
"""

from lorajax.training import config as config_lib


def get_config(arg=None):
  """The config; ``arg`` may be ``'smoke'``."""
  arg = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.smollm2_shakespeare()
  c.name = 'shakespeare_smollm2_lora'
  c.method = 'lora'
  if arg.smoke:
    config_lib.shrink(c)
  c.lock()
  return c
