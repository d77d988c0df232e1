r"""Instruction tuning: Rotten Tomatoes as chat on SmolLM2-135M-Instruct.

Every review becomes a conversation in the checkpoint's own chat template
(the GGUF's, with SmolLM2's default system prompt):

  user:      Is this review positive or negative? Answer with one word.
             <review>
  assistant: positive | negative

Rank-8 LoRA (alpha 16) on every attention q and v projection; the loss is
on the assistant tokens only (the answer and its <|im_end|>), with several
conversations packed in each 128-token row (segment ids: no attention
across conversations, positions restart). The score is the exact match of
the greedy answer (answer then end of turn, nothing else), computed in one
forward pass (``lorajax.training.sft``). Validation before the first step is
the zero-shot score.

Sized for minutes on a loaded 2-core CPU: ~24 steps of 4 packed rows
(~170 training conversations), scored on the first 96 validation and 200
test reviews (the full splits are 1,415 and 1,155).

Run:

  python -m experiments.train --config configs/rt_smollm2_sft.py \
      --workdir /tmp/lorajax_rt_sft

Expected (measured on 2026-11-30 at f991b32, load 5.6-8.6 on the shared
2-core machine: 779 s wall, 385 s user CPU, of which 286 s training):
validation exact match 0.000 zero-shot (step 0) -> 0.823 after 24 steps;
test 0.835 (test[:200]); adapter 1.7 MB. Zero-shot the model answers in
sentences ("This review is positive"), so strict exact match is 0 (first
word right: 0.06 on test[:32]). Decoding for real
(``python -m experiments.sft_answers --workdir ... --n 32``) gives the same
exact match as the one-pass score on test[:32] (0.688 both). The MiniLM
classifier (configs/rt_minilm_lora.py) scores 0.810 on the whole test split
after 400 steps. Packing: 10,238 training conversations fill 7,241 rows
(78% of slots real tokens) against 55% one a row, so a step trains 1.41x
the conversations at the same cost; summary tokens/s counts trained
(assistant) tokens only: 2 a conversation here, ~1/s.
Measured at 2026-11-30 (load 1.5-2, 8 steps each, first-step compile
included): packed 2.99 trained tokens/s, unpacked 1.70 (1.76x; of which
1.41x is more conversations a row, the rest step-time noise over 8 steps):
``--config configs/rt_smollm2_sft.py:steps=8,test=16
--config.sft.packing=False --config.eval_at_start=False``.

``--config configs/rt_smollm2_sft.py:smoke`` shrinks it to a tiny random
model and a few steps (seconds; for tests).
"""

from lorajax.training import config as config_lib


def get_config(arg=None):
  """The config; ``arg`` may be ``'smoke'``, ``'steps=N'``, ``'test=N'``."""
  arg = config_lib.parse_arg(arg, smoke=False, steps=24, test=200)
  c = config_lib.base_config('sft')
  c.name = 'rt_smollm2_sft'
  c.method = 'lora'
  c.data.name = 'rotten_tomatoes'
  c.data.train_split = 'train'
  c.data.validation_split = 'validation[:96]'
  c.data.test_split = f'test[:{arg.test}]'
  # The longest conversation of the corpus is 125 tokens.
  c.data.max_len = 128
  c.sft.prompt_format = ('Is this review positive or negative? Answer with '
                         'one word.\n\n{text}')
  c.sft.label_names = 'negative,positive'
  c.batch_size = 4
  c.eval_batch_size = 16
  c.num_train_steps = arg.steps
  c.eval_every = arg.steps
  c.eval_at_start = True
  c.log_every = 4
  c.checkpoint_every = arg.steps
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 4
  if arg.smoke:
    config_lib.shrink(c)
  c.lock()
  return c
