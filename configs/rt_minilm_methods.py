r"""The PEFT methods compared on all-MiniLM-L6-v2 for Rotten Tomatoes.

One run per method, at similar trainable-parameter budgets (~75k, every run
also trains the 770-parameter classifier), on the data of
``rt_minilm_lora.py`` (batch 32, max_len 48, AdamW, cosine) cut to
STEPS steps and one validation at the end:

- ``lora``: rank 8, alpha 16 on every attention query and value (74.5k);
- ``dora``: the same, plus a magnitude per output unit (79.1k);
- ``qlora``: the same LoRA on a base whose encoder kernels are all stored
  NF4 (double-quantized scales), dequantized at each product (74.5k);
- ``bottleneck``: Pfeiffer adapters of size 16 after every FFN output
  (76.9k);
- ``prefix``: 16 learned key/value positions in every layer (74.5k);
- ``prompt``: 20 learned input embeddings (8.5k: prompt tuning cannot reach
  the budget without making every sequence 4 times longer);
- ``loha``: LoHa of rank 8, alpha 16 on the same kernels (two factor pairs:
  148k);
- ``ia3``: learned scales of every key and value output and FFN input
  (14.6k; 1e-2);
- ``full`` fine-tuning (22.5M, AdamW 5e-5) and ``head`` only (770, 1e-2),
  the references.

Learning rates: 40 steps are few, so the adapter methods take 5e-3 (at
1e-3, LoRA reached only 0.59 test accuracy in 40 steps), prefix and prompt
tuning 1e-2 and 3e-2 (as in their papers), full fine-tuning 5e-5 and the
head 1e-2 (as ``rt_minilm_full.py`` and ``rt_minilm_head.py``). Validation
and test read their first 512 sentences.

Sizing, measured with ``experiments.train`` on this 2-core machine while
other engineers' jobs kept the load at 10-12: the LoRA run at STEPS=40 with
full validation and test sets took 3.2 minutes (1.5 of them training);
with 512-sentence evaluations about 2.5 at that load, so the 8 runs should
take about 25 minutes; at load 14 they took 45.

Run (resumable: the same command skips finished runs, resumes the rest):

  python -m experiments.sweep --config configs/rt_minilm_methods.py \
      --workdir workdirs/rt_minilm_methods

then ``results.md`` and ``results.csv`` are in the workdir. Any one run alone
is the command printed for it, e.g.

  python -m experiments.train --config=configs/rt_minilm_methods.py \
      --workdir=workdirs/rt_minilm_methods/method=dora,optim.learning_rate=0.005 \
      --config.method=dora --config.optim.learning_rate=0.005

Measured here before ``loha`` and ``ia3`` joined (not yet re-run with
them; test accuracy on 512 sentences, ±0.02 standard error):
lora 0.772, dora 0.770, prefix 0.764, qlora 0.758, bottleneck 0.750, head
0.746, prompt 0.744, full 0.623 (5e-5 is too small a rate for 40 steps).
After so few steps every adapter method is within noise of the others and
only 1-3 points above head-only. The whole sweep took 45 minutes at load
10-15; step times in its table follow the machine's load, not the method.

``:smoke`` shrinks every run to a tiny random model and a few steps.
"""

from lorajax.training import config as config_lib

# Optimizer steps of each run (1,280 examples, about a seventh of an epoch).
STEPS = 40
# (method, learning rate) of each run, in the order of the table.
RUNS = (('lora', 5e-3), ('dora', 5e-3), ('qlora', 5e-3),
        ('bottleneck', 5e-3), ('prefix', 1e-2), ('prompt', 3e-2),
        ('ptuning', 1e-2), ('loha', 5e-3), ('lokr', 5e-3), ('vera', 1e-2),
        ('oft', 5e-3), ('ia3', 1e-2), ('full', 5e-5), ('head', 1e-2))
# Fields a method's run sets beyond the base config: VeRA's shared random
# projections have PEFT's default rank 256 (only its two scaling vectors per
# kernel train, 7.7k parameters on query/value).
RUN_FIELDS = {'vera': {'lora.rank': 256}}


def get_config(arg=None):
  """The base run of the comparison (LoRA); ``arg`` may be ``'smoke'``."""
  arg = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.minilm_rotten_tomatoes()
  c.name = 'rt_minilm_methods'
  c.method = 'lora'
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.quant = 'nf4'
  c.bottleneck.size = 16
  c.bottleneck.style = 'pfeiffer'
  c.prompt.num_tokens = 20
  c.prefix.num_tokens = 16
  c.optim.learning_rate = 5e-3
  c.num_train_steps = STEPS
  # Validation and test on their first 512 sentences (4 batches of 128).
  c.data.max_eval_batches = 4
  c.optim.warmup_steps = 4
  c.eval_every = STEPS
  c.checkpoint_every = STEPS
  c.max_to_keep = 1
  c.log_every = 5
  c.progress_bar = False
  if arg.smoke:
    config_lib.shrink(c)
  c.lock()
  return c


def sweep(add, arg=None):
  """One run per method, each with its learning rate."""
  del arg  # The smoke sweep has the same runs, each shrunk.
  for method, learning_rate in RUNS:
    add(method=method, **{'optim.learning_rate': learning_rate},
        **RUN_FIELDS.get(method, {}))
