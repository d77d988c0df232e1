"""What both sides of ``python -m experiments.bench peft`` read: rows, weights,
LoRA factors and batches, written once by the driver.

A row is a model (``'bert'``: lorajax's shipped BERT; ``'flaxbert'``: a
user's own plain Flax BERT, ``experiments.bench.flax_bert``; ``'llama'``:
lorajax's Llama decoder), a shape with its batch, LoRA targets and a compute
dtype. The driver writes, per shape:

- BERT: one safetensors file with a ``BertForSequenceClassification`` state
  dict (``bert.*``, ``classifier.*``), the LoRA ``A`` factors and a batch
  with labels (``make_bert_tensors``);
- Llama: a Hugging Face ``LlamaForCausalLM`` directory (``config.json`` and
  ``model.safetensors``, ``write_llama_checkpoint``) that lorajax reads with
  ``lorajax.models.load`` and transformers with ``from_pretrained``, and a
  file beside it with the LoRA ``A`` factors and the token batch
  (``make_llama_inputs``).

Weights are normal with std 0.02 (as both families initialize), norms one,
biases zero. ``A`` factors are Kaiming-uniform ``[r, in]`` for every Linear
of the blocks, named ``lora.<Hugging Face module>.A`` (the module's weight
key without ``.weight``, e.g. ``lora.model.layers.0.self_attn.q_proj.A``);
``B`` starts at zero on both sides.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from safetensors import numpy as safetensors_numpy

MODELS = ('bert', 'flaxbert', 'llama')
TARGETS = ('qv', 'all')
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class BertShape:
  """A BERT shape and the batch it is benchmarked with."""
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  batch_size: int
  seq_len: int
  vocab_size: int = 30522
  max_position: int = 512
  num_labels: int = 2


@dataclasses.dataclass(frozen=True)
class LlamaShape:
  """A Llama decoder shape, its batch, and whether the step recomputes
  activations (lorajax: ``remat``; PEFT: gradient checkpointing)."""
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  vocab_size: int
  batch_size: int
  seq_len: int
  rope_base: float = 100000.0
  rms_eps: float = 1e-5
  remat: bool = False
  loss_chunk: int = 0   # lorajax's config.loss_chunk (no remat rows)

  def arch_key(self) -> str:
    """Names the weights (everything but batch and remat)."""
    return 'llama-' + '-'.join(
        str(getattr(self, f)) for f in (
            'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
            'head_dim', 'intermediate_size', 'vocab_size', 'rope_base'))


_MINILM = BertShape(384, 6, 12, 1536, batch_size=32, seq_len=128)
_SMOLLM2 = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                head_dim=64, intermediate_size=1536, vocab_size=49152)

# --sizes: name -> (model, shape).
SIZES = {
    'minilm': ('bert', _MINILM),
    'base': ('bert', BertShape(768, 12, 12, 3072, batch_size=8, seq_len=128)),
    'flaxbert': ('flaxbert', _MINILM),
    'smollm2': ('llama', LlamaShape(**_SMOLLM2, batch_size=8, seq_len=256)),
    'smollm2_lc': ('llama', LlamaShape(**_SMOLLM2, batch_size=8, seq_len=256,
                                       loss_chunk=512)),
    'smollm2_2k': ('llama', LlamaShape(**_SMOLLM2, batch_size=1,
                                       seq_len=2048, remat=True)),
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the benchmark: a model and shape, LoRA targets, a dtype."""
  size: str
  model: str
  shape: BertShape | LlamaShape
  targets: str
  dtype: str = 'float32'

  def __post_init__(self):
    for field, value, allowed in (('model', self.model, MODELS),
                                  ('targets', self.targets, TARGETS),
                                  ('dtype', self.dtype, DTYPES)):
      if value not in allowed:
        raise ValueError(f'{field}={value!r}; expected one of {allowed}')
    want = LlamaShape if self.model == 'llama' else BertShape
    if not isinstance(self.shape, want):
      raise TypeError(f'model={self.model!r} needs a {want.__name__}, got '
                      f'{type(self.shape).__name__}')

  @property
  def name(self) -> str:
    suffix = '' if self.dtype == 'float32' else '/bf16'
    return f'{self.size}/{self.targets}{suffix}'

  @property
  def remat(self) -> bool:
    """Whether the step recomputes activations (Llama shapes only)."""
    return isinstance(self.shape, LlamaShape) and self.shape.remat

  @property
  def tokens(self) -> int:
    return self.shape.batch_size * self.shape.seq_len


def rows(sizes, targets, dtypes) -> list[Row]:
  """Every combination of ``SIZES`` names, targets and dtypes, in order.

  Raises:
    ValueError: a name that is not a size, target or dtype.
  """
  for name in sizes:
    if name not in SIZES:
      raise ValueError(f'size {name!r} is not one of {sorted(SIZES)}')
  out = []
  for size in sizes:
    model, shape = SIZES[size]
    out += [Row(size, model, shape, t, d) for t in targets for d in dtypes]
  return out


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
  return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)


def lora_a(rng: np.random.Generator, rank: int, n_in: int) -> np.ndarray:
  """PEFT's default ``lora_A`` init: Kaiming-uniform ``[rank, n_in]``."""
  bound = 1.0 / np.sqrt(n_in)
  return rng.uniform(-bound, bound, (rank, n_in)).astype(np.float32)


def bert_linear_shapes(shape: BertShape) -> dict[str, tuple[int, int]]:
  """Hugging Face module name -> ``[out, in]`` of every encoder Linear."""
  h, f = shape.hidden_size, shape.intermediate_size
  shapes = {}
  for i in range(shape.num_layers):
    block = f'bert.encoder.layer.{i}'
    for proj in ('query', 'key', 'value'):
      shapes[f'{block}.attention.self.{proj}'] = (h, h)
    shapes[f'{block}.attention.output.dense'] = (h, h)
    shapes[f'{block}.intermediate.dense'] = (f, h)
    shapes[f'{block}.output.dense'] = (h, f)
  return shapes


def make_bert_tensors(shape: BertShape, rank: int,
                      seed: int = 0) -> dict[str, np.ndarray]:
  """Weights, LoRA ``A`` factors and one batch, named as both sides read them.

  Returns:
    ``bert.*`` and ``classifier.*``: a ``BertForSequenceClassification``
    state dict (Linear weights ``[out, in]``); ``lora.<module>.A``
    ``[rank, in]`` for every encoder Linear; ``batch.input_ids``,
    ``batch.attention_mask`` ``[B, T]`` and ``batch.label`` ``[B]`` int32.
  """
  rng = np.random.default_rng(seed)
  h = shape.hidden_size
  out: dict[str, np.ndarray] = {}

  def linear(name, n_out, n_in):
    out[f'{name}.weight'] = _normal(rng, n_out, n_in)
    out[f'{name}.bias'] = np.zeros(n_out, np.float32)

  def norm(name):
    out[f'{name}.weight'] = np.ones(h, np.float32)
    out[f'{name}.bias'] = np.zeros(h, np.float32)

  for table, n in (('word', shape.vocab_size),
                   ('position', shape.max_position), ('token_type', 2)):
    out[f'bert.embeddings.{table}_embeddings.weight'] = _normal(rng, n, h)
  norm('bert.embeddings.LayerNorm')
  for name, (n_out, n_in) in bert_linear_shapes(shape).items():
    linear(name, n_out, n_in)
    out[f'lora.{name}.A'] = lora_a(rng, rank, n_in)
  for i in range(shape.num_layers):
    norm(f'bert.encoder.layer.{i}.attention.output.LayerNorm')
    norm(f'bert.encoder.layer.{i}.output.LayerNorm')
  linear('bert.pooler.dense', h, h)
  linear('classifier', shape.num_labels, h)
  batch = (shape.batch_size, shape.seq_len)
  out['batch.input_ids'] = rng.integers(0, shape.vocab_size, batch,
                                        dtype=np.int32)
  out['batch.attention_mask'] = np.ones(batch, np.int32)
  out['batch.label'] = rng.integers(0, shape.num_labels, (shape.batch_size,),
                                    dtype=np.int32)
  return out


def llama_linear_shapes(shape: LlamaShape) -> dict[str, tuple[int, int]]:
  """Hugging Face module name -> ``[out, in]`` of every block Linear."""
  d, f, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
  q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
  shapes = {}
  for i in range(shape.num_layers):
    block = f'model.layers.{i}'
    for name, dims in (('self_attn.q_proj', (q, d)), ('self_attn.k_proj',
                                                      (kv, d)),
                       ('self_attn.v_proj', (kv, d)),
                       ('self_attn.o_proj', (d, q)), ('mlp.gate_proj', (f, d)),
                       ('mlp.up_proj', (f, d)), ('mlp.down_proj', (d, f))):
      shapes[f'{block}.{name}'] = dims
  return shapes


def llama_hf_config(shape: LlamaShape) -> dict[str, object]:
  """The ``config.json`` of a tied-embedding ``LlamaForCausalLM``."""
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'hidden_size': shape.hidden_size,
      'num_hidden_layers': shape.num_layers,
      'num_attention_heads': shape.num_heads,
      'num_key_value_heads': shape.num_kv_heads,
      'head_dim': shape.head_dim,
      'intermediate_size': shape.intermediate_size,
      'vocab_size': shape.vocab_size, 'hidden_act': 'silu',
      'rms_norm_eps': shape.rms_eps, 'max_position_embeddings': 8192,
      'rope_parameters': {'rope_type': 'default',
                          'rope_theta': shape.rope_base},
      'tie_word_embeddings': True, 'attention_bias': False,
      'mlp_bias': False, 'attention_dropout': 0.0, 'dtype': 'float32',
      'bos_token_id': 1, 'eos_token_id': 2,
  }


def write_llama_checkpoint(shape: LlamaShape, directory: str,
                           seed: int = 0) -> None:
  """Writes random weights of ``shape`` as a Hugging Face directory."""
  rng = np.random.default_rng(seed)
  d = shape.hidden_size
  tensors = {'model.embed_tokens.weight': _normal(rng, shape.vocab_size, d),
             'model.norm.weight': np.ones(d, np.float32)}
  for i in range(shape.num_layers):
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      tensors[f'model.layers.{i}.{norm}.weight'] = np.ones(d, np.float32)
  for name, dims in llama_linear_shapes(shape).items():
    tensors[f'{name}.weight'] = _normal(rng, *dims)
  os.makedirs(directory, exist_ok=True)
  safetensors_numpy.save_file(tensors,
                              os.path.join(directory, 'model.safetensors'),
                              metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(llama_hf_config(shape), f, indent=2)


def make_llama_inputs(shape: LlamaShape, rank: int,
                      seed: int = 1) -> dict[str, np.ndarray]:
  """``lora.<module>.A`` ``[rank, in]`` for every block Linear, and
  ``batch.input_ids`` / ``batch.attention_mask`` ``[B, T]`` int32 (the
  labels are the inputs: next-token prediction)."""
  rng = np.random.default_rng(seed)
  out = {f'lora.{name}.A': lora_a(rng, rank, n_in)
         for name, (_, n_in) in llama_linear_shapes(shape).items()}
  batch = (shape.batch_size, shape.seq_len)
  out['batch.input_ids'] = rng.integers(0, shape.vocab_size, batch,
                                        dtype=np.int32)
  out['batch.attention_mask'] = np.ones(batch, np.int32)
  return out


def write_inputs(row: Row, workdir: str, rank: int) -> dict[str, str]:
  """Writes (once per shape) what ``row``'s workers read; returns the
  request fields naming the files (``weights``, or ``checkpoint`` and
  ``inputs``)."""
  shape = row.shape
  if row.model == 'llama':
    checkpoint = os.path.join(workdir, shape.arch_key())
    if not os.path.exists(os.path.join(checkpoint, 'config.json')):
      write_llama_checkpoint(shape, checkpoint)
    inputs = os.path.join(
        workdir, f'{shape.arch_key()}-{shape.batch_size}x{shape.seq_len}'
        f'-r{rank}.safetensors')
    if not os.path.exists(inputs):
      safetensors_numpy.save_file(make_llama_inputs(shape, rank), inputs)
    return {'checkpoint': checkpoint, 'inputs': inputs}
  key = '-'.join(str(v) for v in dataclasses.astuple(shape))
  weights = os.path.join(workdir, f'bert-{key}-r{rank}.safetensors')
  if not os.path.exists(weights):
    safetensors_numpy.save_file(make_bert_tensors(shape, rank), weights)
  return {'weights': weights}
