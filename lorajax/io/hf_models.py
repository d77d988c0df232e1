"""lorajax's models as Hugging Face transformers sees them.

For each model that ships (``Bert`` as ``BertForSequenceClassification``,
``Llama`` as ``LlamaForCausalLM``) an ``HfModel`` maps every Flax parameter
path (of the inner params dict) to its Hugging Face state-dict key, knows
which are Linear kernels (transposed: Flax ``[in, out]``, PyTorch
``[out, in]``), writes the ``config.json`` transformers reads, and exports a
(merged) parameter tree as an HF-layout ``model.safetensors`` checkpoint.

An export either reproduces lorajax's logits in transformers or is refused
before anything is written: ``HfModel.check_expressible`` names what the
architecture cannot say (a BERT that mean-pools its tokens: transformers'
``BertForSequenceClassification`` always pools ``[CLS]`` through its tanh
pooler), and ``state_dict`` refuses a parameter of the wrong shape (a
classifier head wider than ``num_labels``), one it has no key for, or a
quantized kernel.

Example:

  >>> hf = hf_model(config)                                      # doctest: +SKIP
  >>> export_merged('/tmp/merged', config, params, adapters, spec)  # doctest: +SKIP
  >>> transformers.AutoModel.from_pretrained('/tmp/merged')      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import numpy as np
from safetensors import numpy as st_numpy

from lorajax import adapters as adapters_lib
from lorajax import spec as spec_lib
from lorajax.io import digests
from lorajax.models import bert
from lorajax.models import bert_loading
from lorajax.models import llama
from lorajax.models import llama_layout

PyTree = Any

_LLAMA_LAYER = {
    'attn_norm/scale': 'input_layernorm.weight',
    'attn/q_proj/kernel': 'self_attn.q_proj.weight',
    'attn/k_proj/kernel': 'self_attn.k_proj.weight',
    'attn/v_proj/kernel': 'self_attn.v_proj.weight',
    'attn/o_proj/kernel': 'self_attn.o_proj.weight',
    'mlp_norm/scale': 'post_attention_layernorm.weight',
    'mlp/gate_proj/kernel': 'mlp.gate_proj.weight',
    'mlp/up_proj/kernel': 'mlp.up_proj.weight',
    'mlp/down_proj/kernel': 'mlp.down_proj.weight',
}


@dataclasses.dataclass(frozen=True)
class HfModel:
  """One model family's naming in Hugging Face transformers.

  Attributes:
    family: ``'bert'`` or ``'llama'``.
    config: the lorajax config.
    keys: Flax path -> HF state-dict key (``'bert.encoder.layer.0.attention.
      self.query.weight'``), for the unscanned layout.
    task_type: PEFT's task type for this head.
    architecture: the transformers class name.
  """
  family: str
  config: Any
  keys: dict[str, str]
  task_type: str
  architecture: str

  @property
  def scanned(self) -> bool:
    return bool(getattr(self.config, 'scan_layers', False))

  def is_kernel(self, path: str) -> bool:
    return path.endswith('/kernel')

  def module_of(self, path: str) -> str:
    """HF module name of a Flax path (the key without ``.weight``/``.bias``)."""
    return self.keys[path].rsplit('.', 1)[0]

  def head_paths(self) -> list[str]:
    """Flax paths of the task head PEFT saves whole (``modules_to_save``)."""
    if self.task_type == 'SEQ_CLS':
      return [p for p in self.keys if p.startswith('classifier/')]
    return []

  def kernel_modules(self) -> dict[str, str]:
    """HF module name -> Flax kernel path, for every Linear of the model."""
    return {self.module_of(p): p for p in self.keys if self.is_kernel(p)}

  def unscan(self, tree: PyTree) -> PyTree:
    """Scanned-layer trees (``layers/...``) to ``layers_{i}/...``."""
    if self.scanned and isinstance(tree, dict) and 'layers' in tree:
      return llama_layout.unscan_params(tree)
    return tree

  def rescan(self, tree: PyTree) -> PyTree:
    """Inverse of ``unscan`` when the config scans its layers."""
    if self.scanned and isinstance(tree, dict) and any(
        re.fullmatch(r'layers_\d+', k) for k in tree):
      return llama_layout.scan_params(tree)
    return tree

  def check_expressible(self) -> None:
    """Raises ValueError if ``architecture`` computes other logits than
    lorajax's model of this config (whatever the weights)."""
    # Fields of other Hugging Face families (lorajax.models.load) that the
    # BERT / Llama config.json written here does not say: refused, so an
    # export never computes other numbers in transformers.
    unsaid = {'bert': {'head': 'bert', 'position_padding_idx': None},
              'llama': {'qkv_bias': False, 'out_bias': False,
                        'mlp_bias': False, 'qk_norm': False,
                        'sliding_window': None, 'rope_scaling': None}}
    for field, plain in unsaid[self.family].items():
      value = getattr(self.config, field, plain)
      if value != plain:
        raise ValueError(
            f'{field}={value!r} cannot be exported as {self.architecture}: '
            f'the Hugging Face export writes plain {self.family} configs '
            f'only (a model of another family, from lorajax.models.load); '
            f'keep the adapter in lorajax\'s own format')
    pooling = getattr(self.config, 'pooling', 'cls')
    if self.family == 'bert' and pooling != 'cls':
      raise ValueError(
          f'pooling={pooling!r} cannot be exported: transformers\' '
          f'{self.architecture} feeds its classifier the [CLS] token '
          f'through the tanh pooler, and no transformers sequence '
          f'classifier averages the tokens, so its logits would differ. '
          f'Train with pooling=\'cls\' (--config.model.pooling=cls) to '
          f'export, or keep the adapter in lorajax\'s own format '
          f'(lorajax.io.save_adapter, experiments.export --format=lorajax)')

  def expected_shapes(self) -> dict[str, tuple[int, ...]]:
    """Flax path -> shape of every parameter, unscanned like ``keys``."""
    if self.family == 'bert':
      return bert_loading.expected_shapes(self.config)
    return llama_layout.expected_shapes(
        dataclasses.replace(self.config, scan_layers=False))

  def state_dict(self, params: PyTree) -> dict[str, np.ndarray]:
    """HF keys -> float32 arrays in PyTorch layout (kernels transposed).

    Raises:
      ValueError: a parameter missing, of another shape than the config
        gives (e.g. a classifier of another width than ``num_labels``), one
        the architecture has no key for, or a quantized kernel.
    """
    flat = dict(spec_lib.flatten_paths(self.unscan(params)))
    missing = sorted(set(self.keys) - set(flat))
    if missing:
      raise ValueError(f'params lack {len(missing)} {self.family} parameters, '
                       f'e.g. {missing[:4]}')
    extra = sorted(set(flat) - set(self.keys))
    if extra:
      raise ValueError(
          f'{len(extra)} parameters have no key in {self.architecture} and '
          f'would be dropped, e.g. {extra[:4]}')
    shapes = self.expected_shapes()
    out = {}
    for path, key in self.keys.items():
      leaf = flat[path]
      if isinstance(leaf, spec_lib.FrozenKernel):
        raise ValueError(
            f'{path} is quantized ({type(leaf).__name__}); '
            f'{self.architecture} stores float kernels: merge or dequantize '
            f'it first')
      value = np.asarray(leaf, np.float32)
      if value.shape != tuple(shapes[path]):
        raise ValueError(
            f'{path} has shape {value.shape} but {self.architecture} of '
            f'this config has {tuple(shapes[path])} (num_labels='
            f'{getattr(self.config, "num_labels", "-")}, hidden_size='
            f'{self.config.hidden_size}); the export would not load')
      out[key] = np.ascontiguousarray(value.T if self.is_kernel(path)
                                      else value)
    return out

  def hf_config(self) -> dict[str, Any]:
    """The ``config.json`` dict transformers builds this model from."""
    c = self.config
    if self.family == 'bert':
      return {
          'architectures': [self.architecture], 'model_type': 'bert',
          'vocab_size': c.vocab_size, 'hidden_size': c.hidden_size,
          'num_hidden_layers': c.num_layers,
          'num_attention_heads': c.num_heads,
          'intermediate_size': c.intermediate_size, 'hidden_act': 'gelu',
          'hidden_dropout_prob': c.hidden_dropout,
          'attention_probs_dropout_prob': c.attention_dropout,
          'classifier_dropout': c.classifier_dropout,
          'max_position_embeddings': c.max_position,
          'type_vocab_size': c.type_vocab_size,
          'initializer_range': c.initializer_range,
          'layer_norm_eps': c.layer_norm_eps,
          'position_embedding_type': 'absolute', 'pad_token_id': 0,
          'id2label': {str(i): f'LABEL_{i}' for i in range(c.num_labels)},
          'label2id': {f'LABEL_{i}': i for i in range(c.num_labels)},
          'torch_dtype': 'float32'}
    return {
        'architectures': [self.architecture], 'model_type': 'llama',
        'vocab_size': c.vocab_size, 'hidden_size': c.hidden_size,
        'num_hidden_layers': c.num_layers, 'num_attention_heads': c.num_heads,
        'num_key_value_heads': c.num_kv_heads, 'head_dim': c.head_dim,
        'intermediate_size': c.intermediate_size, 'hidden_act': 'silu',
        'rope_theta': c.rope_base, 'rms_norm_eps': c.rms_eps,
        'max_position_embeddings': c.max_position,
        'tie_word_embeddings': c.tie_embeddings, 'attention_bias': False,
        'mlp_bias': False, 'rope_scaling': None, 'torch_dtype': 'float32'}


def hf_model(config: Any) -> HfModel:
  """The ``HfModel`` of a ``BertConfig`` or ``LlamaConfig``.

  Raises:
    TypeError: for another config type (no Hugging Face naming known).
  """
  if isinstance(config, bert.BertConfig):
    keys = {p: (k if k.startswith('classifier.') else f'bert.{k}')
            for p, k in bert_loading.hf_key_map(config).items()}
    return HfModel('bert', config, keys, 'SEQ_CLS',
                   'BertForSequenceClassification')
  if isinstance(config, llama.LlamaConfig):
    keys = {'embed/embedding': 'model.embed_tokens.weight',
            'final_norm/scale': 'model.norm.weight'}
    if not config.tie_embeddings:
      keys['lm_head/kernel'] = 'lm_head.weight'
    for i in range(config.num_layers):
      keys.update({f'layers_{i}/{ours}': f'model.layers.{i}.{theirs}'
                   for ours, theirs in _LLAMA_LAYER.items()})
    return HfModel('llama', config, keys, 'CAUSAL_LM', 'LlamaForCausalLM')
  raise TypeError(f'no Hugging Face naming for {type(config).__name__}; '
                  'expected a BertConfig or a LlamaConfig')


def export_merged(directory: str | pathlib.Path, config: Any, params: PyTree,
                  adapters: PyTree | None = None,
                  spec: spec_lib.LoraSpec | None = None) -> pathlib.Path:
  """Writes ``config.json`` + ``model.safetensors`` in Hugging Face layout.

  Args:
    directory: created if needed.
    config: the model's ``BertConfig`` or ``LlamaConfig``.
    params: the inner params dict (trained leaves such as a classifier head
      already in place).
    adapters, spec: if given, folded into the kernels first
      (``lorajax.merge``).

  Returns:
    The directory; ``transformers.AutoModelFor...from_pretrained`` and
    lorajax's own HF loaders read it.

  Raises:
    ValueError: before anything is written, for what the HF model cannot
      reproduce: a config it cannot express (``check_expressible``), an
      adapter that does not merge (bottleneck, MultiLora), a parameter it
      has no key for or of another shape.
  """
  if (adapters is None) != (spec is None):
    raise ValueError('pass both adapters and spec, or neither')
  hf = hf_model(config)
  hf.check_expressible()
  if adapters is not None:
    params = adapters_lib.merge(params, adapters, spec)
  write_files(directory, {'model.safetensors': hf.state_dict(params),
                          'config.json': hf.hf_config()})
  return pathlib.Path(directory)


def write_files(directory: str | pathlib.Path,
                files: dict[str, dict[str, Any]]) -> None:
  """Writes ``{name: tensors or JSON dict}`` into ``directory``, complete
  or not at all.

  The files go to a fresh sibling folder first, with ``lorajax_digest.json``
  (their sizes and sha256, which PEFT and transformers ignore), and that
  folder is swapped in whole (``digests.writing``): a failure or a SIGKILL
  on the way leaves ``directory`` as it was. ``.safetensors`` names get
  float tensors (the ``'pt'`` format PyTorch readers want), others JSON.
  """
  with digests.writing(directory) as staging:
    for name, content in files.items():
      if name.endswith('.safetensors'):
        st_numpy.save_file(content, str(staging / name),
                           metadata={'format': 'pt'})
      else:
        (staging / name).write_text(json.dumps(content, indent=2))
