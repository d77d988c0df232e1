"""Shared pieces of the training configs, and the spec a config asks for.

Every file in ``configs/`` starts from ``base_config(task)`` and changes a few
fields, so each config reads as the handful of choices that define its run.
The spec is data in the config, not code:

  config.method = 'lora'                  # one of METHODS
  config.lora.targets = r'.*/attention/(query|value)/kernel'
  config.train_rules = r'classifier/.*'   # also trained (the new head)
  config.frozen_rules = r'pooler/.*'      # never trained, even by 'full'

and ``make_spec(config)`` turns it into a ``lorajax.LoraSpec``.

Example:

  >>> config = base_config('classification')
  >>> make_spec(config).rules[-1]
  ('.*', 'freeze')
"""

from __future__ import annotations

from typing import Any

from ml_collections import config_dict

import lorajax
from lorajax.io import hf_targets

METHODS = ('lora', 'dora', 'qlora', 'loha', 'lokr', 'vera', 'oft', 'ia3',
           'adalora', 'bottleneck', 'prompt', 'prefix', 'ptuning', 'full',
           'head')
# Methods whose adapters come from the config.lora fields.
LOW_RANK_METHODS = ('adalora', 'lora', 'dora', 'qlora',
                    'loha', 'lokr', 'vera', 'oft')
# lora.targets values that name kernels the Hugging Face way (resolved
# against the model by attach.attach_method).
LORA_TARGET_SHORTHANDS = hf_targets.SHORTHANDS
# Methods that train a 'prompts' tree (lorajax.methods.prompts).
PROMPT_METHODS = ('prompt', 'prefix', 'ptuning')
# The bottleneck rule helpers' name of each model.
_ARCH = {'minilm': 'bert', 'smollm2': 'llama'}
TASKS = ('classification', 'lm', 'sft')
MODES = ('jit', 'pmap', 'mesh')  # See lorajax.training.parallel.


def base_config(task: str) -> config_dict.ConfigDict:
  """The fields every run has, with defaults for ``task``; not locked.

  Args:
    task: ``'classification'`` (BERT/MiniLM), ``'lm'`` or ``'sft'``
      (Llama/SmolLM2).

  Returns:
    An unlocked ``ConfigDict``; the caller edits it and locks it.
  """
  if task not in TASKS:
    raise ValueError(f'task {task!r}; expected one of {TASKS}')
  c = config_dict.ConfigDict()
  # Name of the run, shown in the summary.
  c.name = task
  # What is learned: 'classification' (sentence label), 'lm' (next token)
  # or 'sft' (assistant replies of conversations).
  c.task = task
  # How steps run (lorajax.training.parallel): 'jit' on one device, 'pmap'
  # data parallel over local devices, or 'mesh' (jit over a data x model
  # Mesh: batch over 'data', kernels FSDP over 'model', across processes).
  c.mode = 'jit'
  # Train steps per compiled call (mode 'jit'): k > 1 runs k steps in one
  # lax.scan, so a CPU run maps and zeroes its step's temporaries once per
  # k steps instead of every step (lorajax.training.step.scan_steps). Chunks
  # end at every evaluation and checkpoint; a stop signal is answered at the
  # end of a chunk. Same math, up to float rounding.
  c.steps_per_call = 1
  # Compile the train step with lorajax.compiler_options() (jit and mesh;
  # on CPU a memory-minded schedule, same math: ~6% less peak memory for
  # LoRA, but full fine-tuning at small batches can be slower; figures in
  # lorajax/runtime/compiler.py).
  c.xla_options = True
  # Rematerialization of every layer of the model (BERT family, Llama
  # family, MoE): 'none'; 'layer' (keep each layer's input, run the layer
  # again in the backward pass); 'dots' (keep its projections' outputs, run
  # the rest again). Same losses and gradients, less memory, more FLOPs
  # (lorajax.models.remat; figures: experiments/bench/lm_memory.py).
  c.remat = 'none'
  # Tasks lm and sft: run the LM head and the cross entropy over chunks of
  # about this many tokens, so that the [B, T, vocab] logits never exist
  # whole (lorajax.models.lm_head); 0 computes them at once.
  c.loss_chunk = 0
  # Decoders (tasks lm and sft): attention over blocks of this many queries,
  # so that a long sequence's [heads, T, T] scores are never whole in memory
  # (LlamaConfig.attn_chunk; equal outputs and gradients); 0: all at once.
  c.attn_chunk = 0
  # The device mesh of mode 'mesh'.
  c.mesh = config_dict.ConfigDict()
  # Size of the 'data' axis (batch rows); -1 takes the devices left.
  c.mesh.data = -1
  # Size of the 'model' axis (one axis of each kernel, and its adapters).
  c.mesh.model = 1
  # Seed of adapter init, the new head, dropout and the data order.
  c.seed = 0

  # The model and its pretrained weights.
  c.model = config_dict.ConfigDict()
  # 'minilm' (all-MiniLM-L6-v2) or 'smollm2' (SmolLM2-135M-Instruct).
  c.model.name = 'minilm' if task == 'classification' else 'smollm2'
  # A local Hugging Face checkpoint directory (config.json, safetensors,
  # tokenizer.json) to train instead of model.name: an encoder (BERT,
  # RoBERTa, XLM-R) for classification, a decoder (Llama, Mistral, Qwen2,
  # Qwen3) for lm/sft (lorajax.models.load); '' uses model.name.
  c.model.path = ''
  # Your own Flax model instead: 'pkg.module:make_model', a function called
  # as make_model(key=..., num_labels=..., **model.factory_kwargs) that
  # returns params and a module or apply (lorajax.training.model_factory;
  # classification and lm; model.name, pretrained, size, dtype, dropout and
  # pooling are the other models' fields); '' uses model.path or model.name.
  c.model.factory = ''
  # Keyword arguments of model.factory; set them in your config file
  # (c.model.factory_kwargs = ConfigDict({'width': 64})), then
  # --config.model.factory_kwargs.width=32 overrides one.
  c.model.factory_kwargs = config_dict.ConfigDict()
  # Load the pretrained weights; False gives a random model of that shape.
  c.model.pretrained = True
  # 'base' is the real architecture; 'tiny' a 2-layer toy for tests.
  c.model.size = 'base'
  # Compute dtype: 'float32', or 'bfloat16' for mixed precision (params,
  # adapters and optimizer state stay float32).
  c.model.dtype = 'float32'
  # Dropout of the base model's hidden states during training.
  c.model.dropout = 0.1
  # Sentence vector for the classifier: 'mean' over tokens, or 'cls' (the
  # pooler on [CLS]). Unused by the LM.
  c.model.pooling = 'mean'

  # Chat fine-tuning (task 'sft', lorajax.training.sft); unused otherwise.
  c.sft = config_dict.ConfigDict()
  # Jinja chat template; '' takes the checkpoint's own (SmolLM2: the GGUF's
  # tokenizer.chat_template, with its default system prompt).
  c.sft.template = ''
  # Train on the assistant tokens only (the replies and their end-of-turn
  # token); False trains every token of the rendered conversation.
  c.sft.assistant_only = True
  # Pack several conversations a training row (segment ids: attention and
  # positions never cross one); False puts one a row, padded.
  c.sft.packing = True
  # A system message put first in every conversation; None keeps the
  # template's default.
  c.sft.system = config_dict.placeholder(str)
  # Labeled data (text + label) as instructions: the user turn, with
  # {text}; '' when rows are messages or prompt/completion.
  c.sft.prompt_format = ''
  # The assistant's answer for each label id, comma-separated.
  c.sft.label_names = ''

  # The rules: method, adapter targets, extra trained and frozen leaves.
  # 'lora', 'dora', 'qlora' or 'loha' (adapters on lora.targets +
  # train_rules; loha and lokr take lora.rank and lora.alpha only, vera
  # lora.rank only: its update has no scale, its shared frozen projections
  # are drawn from config.seed), 'oft' (rotations of the inputs of
  # lora.targets, sized by the oft fields; no other lora field is read),
  # 'adalora' (SVD-form adapters on lora.targets whose rank the allocator
  # lowers from adalora.init_r to adalora.target_r; lora.alpha and
  # lora.dropout as PEFT's lora_alpha and lora_dropout),
  # 'ia3' (learned scales on ia3.targets + train_rules),
  # 'bottleneck' (adapters after output projections + train_rules),
  # 'prompt', 'ptuning' (prompt tokens from an MLP encoder) or 'prefix'
  # (learned virtual tokens + train_rules), 'full'
  # (every leaf but frozen_rules) or 'head' (only train_rules).
  c.method = 'lora'
  c.lora = config_dict.ConfigDict()
  # Regex over parameter paths of the kernels that get adapters, or PEFT's
  # names: 'all-linear' (every Linear but the head's) or 'default' (the
  # family's PEFT defaults, e.g. q_proj and v_proj).
  c.lora.targets = (r'.*/attention/(query|value)/kernel'
                    if task == 'classification'
                    else r'.*/attn/(q_proj|v_proj)/kernel')
  # Rank r of every adapter.
  c.lora.rank = 8
  # Scale numerator: the update is (alpha / rank) * x·a·b.
  c.lora.alpha = 16.0
  # Scale by alpha / sqrt(rank) instead (rsLoRA).
  c.lora.rslora = False
  # Dropout on the adapter input.
  c.lora.dropout = 0.0
  # Start of the factors: 'kaiming' (a uniform, b zero; PEFT's default),
  # 'gaussian', 'pissa' (a·b = the kernel's top-r singular part) or
  # 'olora' (a, b from the kernel's QR decomposition); with the last two the
  # frozen base holds the residual (method 'lora' only); 'loftq' (method
  # 'qlora' only: the quantized base and a, b chosen together so that
  # deq(Q) + s·a·b is close to the float kernel; lorajax.methods.loftq) or
  # 'eva' (method 'lora' only: a from the principal directions of each
  # kernel's inputs over training batches, ranks redistributed by explained
  # variance, b zero; lorajax.training.eva_run and the eva fields).
  c.lora.init = 'kaiming'
  # AdaLoRA (method 'adalora', PEFT's AdaLoraConfig; its total_step is
  # num_train_steps).
  c.adalora = config_dict.ConfigDict()
  # Triplets (rank) each adapted kernel starts with.
  c.adalora.init_r = 12
  # Average triplets a kernel keeps at the end (<= init_r).
  c.adalora.target_r = 8
  # Steps before the budget starts to fall, and steps at the end with the
  # final budget; tinit + tfinal < num_train_steps.
  c.adalora.tinit = 0
  c.adalora.tfinal = 0
  # Steps between two allocations while the budget falls.
  c.adalora.deltaT = 1
  # EMA decays of the importance (sensitivity) and of its uncertainty.
  c.adalora.beta1 = 0.85
  c.adalora.beta2 = 0.85
  # Weight of the penalty ||AAᵀ - I|| + ||BᵀB - I|| added to the loss.
  c.adalora.orth_reg_weight = 0.5
  # LoftQ's alternations of quantization and rank-r SVD (lora.init='loftq').
  c.lora.loftq_iter = 1
  c.eva = config_dict.ConfigDict()
  # A kernel's EVA rank is at most round(lora.rank * rho); 1 keeps every
  # kernel at lora.rank (PEFT's EvaConfig.rho).
  c.eva.rho = 2.0
  # A component has converged when its cosine similarity with the previous
  # batch's is at least tau (PEFT's EvaConfig.tau).
  c.eva.tau = 0.99
  # Divide each a column by the square root of its singular value.
  c.eva.whiten = False
  # Scale a kernel's alpha by its EVA rank / lora.rank (alpha / rank kept).
  c.eva.adjust_scaling_factors = True
  # Training batches read (the run's first ones), cycled until convergence.
  c.eva.num_batches = 32
  # Forward passes before EVA gives up with an error (not converged).
  c.eva.max_steps = 512
  # Format of the frozen base under method 'qlora': 'nf4' (4-bit NormalFloat,
  # double-quantized block scales) or 'int8' (one scale per output unit).
  c.quant = 'nf4'
  # Regex of the other frozen kernels stored quantized under 'qlora' (the
  # lora.targets kernels always are); '' for the adapted kernels only. It
  # must match a kernel that lora.targets does not.
  c.quant_targets = (r'encoder/layer_\d+/.*/kernel'
                     if task == 'classification'
                     else r'layers_\d+/(attn|mlp)/\w+_proj/kernel')
  c.oft = config_dict.ConfigDict()
  # Side b of OFT's rotation blocks (PEFT's oft_block_size; it must divide
  # every target's input size), or 0 when oft.r gives the blocks instead.
  c.oft.block_size = 32
  # Number of blocks of each kernel's input (PEFT's r), or 0 (oft.block_size).
  c.oft.r = 0
  # One rotation block shared by all blocks of a kernel.
  c.oft.block_share = False
  # The Cayley–Neumann series (PEFT's default) instead of the exact Cayley
  # transform.
  c.oft.cayley_neumann = True
  # Terms of that series (PEFT's num_cayley_neumann_terms).
  c.oft.neumann_terms = 5
  c.ia3 = config_dict.ConfigDict()
  # Regex of the kernels whose output IA3 scales (keys and values) or, if
  # ia3.feedforward matches them too, whose input it scales. PEFT's default
  # targets: key, value and the feed-forward output projection.
  c.ia3.targets = (r'.*/attention/(key|value)/kernel|.*layer_\d+/output/kernel'
                   if task == 'classification'
                   else r'.*/(attn/(k_proj|v_proj)|mlp/down_proj)/kernel')
  # Regex of the feed-forward kernels among ia3.targets: their input is
  # scaled ('' for none).
  c.ia3.feedforward = (r'.*layer_\d+/output/kernel' if task == 'classification'
                       else r'.*/mlp/down_proj/kernel')
  c.bottleneck = config_dict.ConfigDict()
  # Width of every bottleneck adapter.
  c.bottleneck.size = 64
  # Activation between the down and up projection ('relu', 'gelu', ...).
  c.bottleneck.act = 'relu'
  # 'houlsby' (after the attention output and the FFN output of every
  # layer) or 'pfeiffer' (after the FFN output only).
  c.bottleneck.style = 'pfeiffer'
  c.prompt = config_dict.ConfigDict()
  # Learned virtual input tokens prepended to the embeddings ('prompt').
  c.prompt.num_tokens = 20
  # Start them as embeddings of random vocabulary tokens (else N(0, 0.02)).
  c.prompt.init_from_vocab = True
  c.prefix = config_dict.ConfigDict()
  # Learned key/value positions prepended in every layer ('prefix').
  c.prefix.num_tokens = 16
  # Width of the MLP that reparameterizes the prefix during training (folded
  # into the plain prefix at the end); 0 trains the prefix directly.
  c.prefix.mlp_hidden = 0
  c.ptuning = config_dict.ConfigDict()
  # Virtual input tokens computed by a prompt encoder ('ptuning'), folded
  # into plain prompt tokens at the end.
  c.ptuning.num_tokens = 20
  # Width of the encoder's MLP; 0 takes the model's hidden size (PEFT's
  # default encoder_hidden_size).
  c.ptuning.encoder_hidden = 0
  # PEFT's encoder_reparameterization_type: 'MLP' (3 layers) or 'LSTM'
  # (bidirectional LSTM, then a 2-layer MLP).
  c.ptuning.encoder = 'MLP'
  # Layers of the 'LSTM' encoder (PEFT's encoder_num_layers).
  c.ptuning.lstm_layers = 2
  # Regex of leaves trained as they are (besides adapters); '' for none.
  c.train_rules = r'classifier/.*' if task == 'classification' else ''
  # Regex of leaves that no method trains; '' for none.
  c.frozen_rules = ''
  # Token ids whose rows of the word embedding (and of an untied LM head)
  # are trained, comma-separated ('5,17'), next to the method's adapters
  # (PEFT's trainable_token_indices; lorajax.training.trainable_tokens).
  # Only the [n, d] rows are trained, saved and exported; '' for none.
  c.trainable_tokens = ''
  # Strings added to the tokenizer as special tokens, comma-separated
  # ('<|tool|>,<|/tool|>'); the vocabulary grows (new rows drawn as
  # transformers' resize_token_embeddings draws them) and their rows are
  # trained as trainable_tokens' are; '' for none.
  c.new_tokens = ''

  # The data.
  c.data = config_dict.ConfigDict()
  # Dataset name in lorajax.data.sources.REGISTRY.
  c.data.name = 'shakespeare' if task == 'lm' else 'rotten_tomatoes'
  # TFDS data dir; None builds/reads the offline corpora in the default.
  c.data.dir = config_dict.placeholder(str)
  # TFDS split names (slices such as 'train[:256]' work).
  c.data.train_split = 'train'
  c.data.validation_split = 'validation'
  c.data.test_split = 'test'
  # Tokens per example (classification: truncated/padded; LM: window).
  c.data.max_len = 64 if task == 'classification' else 128
  # Number of evaluation batches read from each split; None reads all.
  c.data.max_eval_batches = config_dict.placeholder(int)
  # Rows from your own files instead of data.name: a file, a glob or a
  # directory of JSONL, CSV/TSV, Parquet or plain-text (one row a line)
  # files, converted once into array_record (lorajax.data.files); '' uses
  # data.name.
  c.data.path = ''
  # 'jsonl', 'csv', 'tsv', 'parquet' or 'text'; '' from each extension.
  c.data.format = ''
  # Field (column) of the text, and of a second text for sentence pairs
  # ('' for none).
  c.data.text_field = 'text'
  c.data.text_pair_field = ''
  # Field of the label (classification): ints 0..K-1 or strings.
  c.data.label_field = 'label'
  # The classes in id order, comma-separated ('neg,pos'); '' takes int
  # labels as they are and string labels sorted, from the training rows.
  c.data.label_names = ''
  # Validation / test rows from their own files; '' carves them from
  # data.path by a seeded split of these fractions.
  c.data.validation_path = ''
  c.data.test_path = ''
  c.data.validation_fraction = 0.1
  c.data.test_fraction = 0.1
  # Seed of that split (apart from config.seed: the test set stays put).
  c.data.split_seed = 0
  # Rows with the same value of this field stay in one split ('' by row).
  c.data.group_field = ''
  # Skip and count bad rows (missing field, unknown label, empty text,
  # undecodable bytes); False stops at the first, naming file and line.
  c.data.skip_bad_rows = False

  # The schedule of the run.
  # Examples per optimizer step.
  c.batch_size = 32
  # Examples per evaluation batch.
  c.eval_batch_size = 128
  # Optimizer steps of the run.
  c.num_train_steps = 400
  # Evaluate on validation every this many steps (and at the end).
  c.eval_every = 100
  # Evaluate on validation before the first step too.
  c.eval_at_start = False
  # Write training metrics every this many steps.
  c.log_every = 10
  # Save a checkpoint every this many steps (and at the end).
  c.checkpoint_every = 100
  # Checkpoints kept on disk.
  c.max_to_keep = 2
  # Write checkpoints in a background thread.
  c.async_checkpoint = True
  # Show progress: a tqdm bar when stdout is a terminal, else a plain line
  # every ~10% of the run (lorajax.training.console.Progress).
  c.progress_bar = True
  # Resume from a checkpoint whose run-defining fields (all but how often to
  # log, evaluate and save) differ from this config's: the changes are
  # listed and recorded in the run's checkpoints; False refuses such a
  # resume (lorajax.training.validate).
  c.allow_config_change = False

  # The optimizer: AdamW with warmup, decay, clipping and accumulation.
  c.optim = config_dict.ConfigDict()
  # Peak learning rate.
  c.optim.learning_rate = 1e-3
  # Steps of linear warmup from 0 to the peak.
  c.optim.warmup_steps = 20
  # Decay after warmup: 'cosine', 'linear' or 'constant'.
  c.optim.decay = 'cosine'
  # Final learning rate as a fraction of the peak.
  c.optim.end_factor = 0.0
  # AdamW decoupled weight decay (on leaves of 2 or more axes only).
  c.optim.weight_decay = 0.01
  # Adam moment decays and epsilon.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  # Clip gradients to this global norm; 0 turns clipping off.
  c.optim.clip_norm = 1.0
  # Per-path learning-rate factors, 'regex=factor,...' over the trainable
  # paths ('params/classifier/.*=10', or LoRA+: 'adapters/.*/b=16');
  # the first matching rule wins, unmatched leaves keep factor 1.
  c.optim.lr_factors = ''
  # Split each batch into this many micro-batches and average their
  # gradients (same update, less memory).
  c.optim.accum_steps = 1
  return c


def make_spec(config: config_dict.ConfigDict, *,
              lora_targets: str | None = None) -> lorajax.LoraSpec:
  """The ``LoraSpec`` of ``config.method`` and its rules.

  ``frozen_rules`` come first, then the method's rules, then a catch-all
  ``freeze`` (``full`` ends with a catch-all ``train`` instead). ``prompt``
  and ``prefix`` add no rule: what they train is the task's ``prompts``
  tree.

  Args:
    config: the run config.
    lora_targets: the regex ``lora.targets`` resolves to when it is a
      shorthand of the model's (``'all-linear'``, ``'default'``;
      ``attach.attach_method`` resolves it, ``lorajax.io.hf_targets``).

  Raises:
    ValueError: for an unknown method or bottleneck style, ``head``
      without ``train_rules``, or an unresolved ``lora.targets`` shorthand.
  """
  method = config.method
  if method not in METHODS:
    raise ValueError(f'config.method={method!r}; expected one of {METHODS}')
  rules = []
  if config.frozen_rules:
    rules.append((config.frozen_rules, lorajax.FREEZE))
  if method == 'full':
    return lorajax.LoraSpec(rules + [(r'.*', lorajax.TRAIN)])
  if method in LOW_RANK_METHODS:
    targets = lora_targets or config.lora.targets
    if targets in LORA_TARGET_SHORTHANDS:
      raise ValueError(f'lora.targets={targets!r} names kernels by the '
                       'model\'s Hugging Face family; resolve it with the '
                       'model (attach.attach_method), or give a regex')
    rules.extend(_low_rank_rules(config, targets))
  elif method == 'ia3':
    if config.ia3.feedforward:
      rules.append((config.ia3.feedforward, lorajax.Ia3(feedforward=True)))
    rules.append((config.ia3.targets, lorajax.Ia3()))
  elif method == 'bottleneck':
    rules.extend(_bottleneck_rules(config))
  elif method == 'head' and not (config.train_rules or config.get(
      'trainable_tokens') or config.get('new_tokens')):
    raise ValueError("config.method='head' trains only config.train_rules "
                     '(and token rows), which are empty')
  if config.train_rules:
    rules.append((config.train_rules, lorajax.TRAIN))
  return lorajax.LoraSpec(rules + [(r'.*', lorajax.FREEZE)])


def _low_rank_rules(config: config_dict.ConfigDict, targets: str
                    ) -> list[tuple[str, Any]]:
  """The ``lora``/``dora``/``qlora``/``loha`` rules of ``config.lora``,
  on the kernels ``targets`` (a regex) selects."""
  kw = dict(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
            use_rslora=bool(config.lora.rslora),
            dropout=float(config.lora.dropout),
            init=str(config.lora.get('init', 'kaiming')))
  if kw['init'] == 'eva' and config.method != 'lora':
    raise ValueError(f"config.lora.init='eva' is implemented for method "
                     f"'lora', not {config.method!r}")
  loftq_iter = config.lora.get('loftq_iter', 1)
  if loftq_iter != 1 and (config.method, kw['init']) != ('qlora', 'loftq'):
    raise ValueError(f'config.lora.loftq_iter={loftq_iter!r} is read only '
                     "with method 'qlora' and lora.init='loftq'")
  if config.method == 'adalora':
    return [(targets, _adalora(config, kw))]
  if config.method == 'lora':
    return [(targets, lorajax.Lora(**kw))]
  if config.method == 'dora':
    return [(targets, lorajax.Dora(**kw))]
  if config.method in ('loha', 'lokr', 'vera', 'oft'):
    unused = {'lora.rslora': (kw['use_rslora'], False),
              'lora.dropout': (kw['dropout'], 0.0),
              'lora.init': (kw['init'], 'kaiming')}
    for field, (value, default) in unused.items():
      if value != default:
        raise ValueError(f'config.method={config.method!r} has no {field} '
                         f'(got {value!r}); leave it at {default!r}')
    if config.method == 'lokr':
      return [(targets, lorajax.LoKr(rank=kw['rank'], alpha=kw['alpha']))]
    if config.method == 'vera':
      return [(targets, lorajax.Vera(rank=kw['rank'], seed=int(config.seed)))]
    if config.method == 'oft':
      o = config.oft
      try:
        return [(targets, lorajax.Oft(
            block_size=o.block_size, r=o.r, block_share=bool(o.block_share),
            cayley_neumann=bool(o.cayley_neumann),
            neumann_terms=o.neumann_terms))]
      except ValueError as e:
        raise ValueError(f'config.oft (block_size={o.block_size!r}, '
                         f'r={o.r!r}, neumann_terms={o.neumann_terms!r}): '
                         f'{e}') from None
    return [(targets, lorajax.LoHa(rank=kw['rank'],
                                               alpha=kw['alpha']))]
  rules = [(targets, lorajax.QLora(quant=config.quant, loftq_iter=loftq_iter,
                                   **kw))]
  if config.quant_targets:
    rules.append((config.quant_targets, lorajax.Quantized(config.quant)))
  return rules


def _adalora(config: config_dict.ConfigDict, kw: dict[str, Any]
             ) -> lorajax.AdaLora:
  """The ``AdaLora`` of ``config.adalora`` (``total_step`` =
  ``num_train_steps``), ``lora.alpha`` and ``lora.dropout``."""
  unused = {'lora.rank': (kw['rank'], 8), 'lora.rslora': (
      kw['use_rslora'], False), 'lora.init': (kw['init'], 'kaiming')}
  for field, (value, default) in unused.items():
    if value != default:
      raise ValueError(f"config.method='adalora' has no {field} (got "
                       f'{value!r}; the rank is adalora.init_r); leave it '
                       f'at {default!r}')
  a = config.adalora
  fields = dict(init_r=a.init_r, target_r=a.target_r, tinit=a.tinit,
                tfinal=a.tfinal, delta_t=a.deltaT, beta1=a.beta1,
                beta2=a.beta2, orth_reg_weight=a.orth_reg_weight,
                total_step=config.num_train_steps)
  if isinstance(a.target_r, int) and isinstance(a.init_r, int) and (
      a.target_r > a.init_r):
    raise ValueError(f'config.adalora.target_r={a.target_r} is larger than '
                     f'adalora.init_r={a.init_r}; the budget only falls')
  try:
    return lorajax.AdaLora(alpha=kw['alpha'], dropout=kw['dropout'],
                           **fields)
  except ValueError as e:
    shown = ', '.join(f'{k}={v!r}' for k, v in fields.items())
    raise ValueError(f'config.adalora ({shown}; total_step is '
                     f'config.num_train_steps): {e}') from None


def _bottleneck_rules(config: config_dict.ConfigDict
                      ) -> list[tuple[str, Any]]:
  """Houlsby or Pfeiffer rules of ``config.bottleneck`` for the model."""
  b = config.bottleneck
  styles = {'houlsby': lorajax.houlsby_rules,
            'pfeiffer': lorajax.pfeiffer_rules}
  if b.style not in styles:
    raise ValueError(f'config.bottleneck.style={b.style!r}; expected one of '
                     f'{sorted(styles)}')
  if config.model.name not in _ARCH:
    raise ValueError(f'config.model.name={config.model.name!r} has no '
                     f'bottleneck paths; known: {sorted(_ARCH)}')
  return styles[b.style](int(b.size), b.act,
                         model=_ARCH[config.model.name])


def parse_arg(arg: str | None, **defaults: Any) -> config_dict.ConfigDict:
  """Parses a config argument such as ``'smoke'`` or ``'smoke,steps=3'``.

  Every key of ``defaults`` may appear; a bare key means True, ``k=v`` takes
  ``v`` converted to the type of the default.

  Raises:
    ValueError: naming an unknown key.
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: '
                       f'{sorted(defaults)}')
    kind = type(defaults[key])
    out[key] = True if not value else (value.lower() in ('1', 'true', 'yes')
                                       if kind is bool else kind(value))
  return config_dict.ConfigDict(out)


def shrink(c: config_dict.ConfigDict) -> None:
  """Makes a run take seconds: a tiny random model, tiny splits, few steps.

  Checkpoints, evaluation and logging still happen (every few steps), so a
  shrunk run exercises everything a full run does.
  """
  c.model.pretrained = False
  c.model.size = 'tiny'
  c.data.train_split = 'train[:96]'
  c.data.validation_split = 'validation[:24]'
  c.data.test_split = 'test[:24]'
  if c.task == 'lm':
    c.data.train_split = 'train[:2]'
    c.data.validation_split = 'validation[:1]'
    c.data.test_split = 'test[:1]'
    c.data.max_len = 32
    c.data.max_eval_batches = 2
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_train_steps = 6
  c.optim.warmup_steps = 2
  c.eval_every = 3
  c.log_every = 1
  c.checkpoint_every = 2
  c.max_to_keep = 3
  c.progress_bar = False


def minilm_rotten_tomatoes() -> config_dict.ConfigDict:
  """MiniLM on Rotten Tomatoes: the data and budget the rt_* configs share.

  LoRA, full fine-tuning and head-only runs differ only in ``method`` and
  the optimizer, so their accuracies compare like for like.
  """
  c = base_config('classification')
  # The [CLS] pooler is unused with mean pooling: never train it.
  c.frozen_rules = r'pooler/.*'
  c.data.max_len = 48
  c.batch_size = 32
  c.num_train_steps = 400
  c.eval_every = 100
  c.checkpoint_every = 100
  c.optim.warmup_steps = 30
  return c


def smollm2_shakespeare() -> config_dict.ConfigDict:
  """SmolLM2-135M on Shakespeare, sized for minutes on a 2-core CPU.

  Only a slice of each split is tokenized (the run reads ~320 windows), and
  before/after perplexity is measured on the same fixed 32 validation
  windows (4,096 tokens).
  """
  c = base_config('lm')
  c.data.train_split = 'train[:10%]'
  c.data.validation_split = 'validation[:10%]'
  c.data.test_split = 'test[:10%]'
  c.data.max_len = 128
  c.data.max_eval_batches = 4
  c.batch_size = 4
  c.eval_batch_size = 8
  c.num_train_steps = 80
  c.eval_every = 40
  c.eval_at_start = True
  c.log_every = 5
  c.checkpoint_every = 40
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 5
  return c
