r"""QLoRA on SmolLM2-135M for Shakespeare: LoRA on an NF4 base, on a CPU.

The run of ``shakespeare_smollm2_lora.py`` (rank-8 adapters, alpha 16, on
every attention q and v projection of the 30 layers; same data, steps,
batch and optimizer), with the frozen base stored quantized: every
projection kernel of every layer (q, k, v, o, gate, up, down) as NF4 with
block-wise absmax scales (block 64) and double-quantized scales, about 4.13
bits per parameter, dequantized at each product. The tied embedding, the
norms and the adapters stay float32; checkpoints hold only the adapters.

Run:

  python -m experiments.train --config configs/shakespeare_smollm2_qlora.py \
      --workdir /tmp/lorajax_shakespeare_qlora

and compare its validation perplexity with the LoRA run's
(``configs/shakespeare_smollm2_lora.py``). ``--config.quant=int8`` stores the
base as int8 instead.

Measured here (80 steps, 34 minutes at load 10-14): validation perplexity
77.0 at the start (the float32 base: 61.7) and 45.6 after training (LoRA on
the float32 base: 40.5); test 46.5 (LoRA: 40.3). Same adapter (460,800
parameters, 1.8 MB); the process peak RSS was the same, 2.8 GB, because the
float32 base is loaded before it is quantized.
"""

from lorajax.training import config as config_lib


def get_config(arg=None):
  """The config; ``arg`` may be ``'smoke'``."""
  arg = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.smollm2_shakespeare()
  c.name = 'shakespeare_smollm2_qlora'
  c.method = 'qlora'
  c.quant = 'nf4'
  if arg.smoke:
    config_lib.shrink(c)
  c.lock()
  return c
