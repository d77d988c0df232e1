"""lorajax's models as Hugging Face transformers sees them.

An ``HfModel`` maps every Flax parameter path (of the inner params dict) of
one model to its Hugging Face state-dict key, knows which are Linear kernels
(transposed: Flax ``[in, out]``, PyTorch ``[out, in]``), writes the
``config.json`` transformers reads, and exports a (merged) parameter tree as
an HF-layout ``model.safetensors`` checkpoint. The naming comes from the
family's entry in ``lorajax.models.hf_naming`` (its key map per head), so
every family ``lorajax.models.load`` reads is exported by the same code.

Two kinds of model:

- a checkpoint loaded from a Hugging Face directory (``source=``): the
  exported ``config.json`` is the source's own, with only ``architectures``
  (the head), the labels and the stored dtype changed, so RoPE parameters,
  sliding windows and everything transformers reads stay exactly as they
  were; the tokenizer files are copied beside it.
- the shipped models (``Bert`` as ``BertForSequenceClassification``,
  ``Llama`` as ``LlamaForCausalLM``), whose ``config.json`` is written from
  the lorajax config.

An export either reproduces lorajax's logits in transformers or is refused
before anything is written: ``HfModel.check_expressible`` names what the
architecture cannot say (a BERT that mean-pools its tokens, a config field
that differs from the source's ``config.json``), and ``state_dict`` refuses
a parameter of the wrong shape, one it has no key for, or a quantized
kernel.

Example:

  >>> hf = hf_model(loaded.config, source=path)                  # doctest: +SKIP
  >>> export_merged('/tmp/merged', loaded.config, params, adapters, spec,
  ...               source=path)                                 # doctest: +SKIP
  >>> transformers.AutoModelForCausalLM.from_pretrained('/tmp/merged')  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import re
import shutil
from typing import Any

from absl import logging
import numpy as np
from safetensors import numpy as st_numpy

from lorajax import adapters as adapters_lib
from lorajax import spec as spec_lib
from lorajax.io import digests
from lorajax.models import bert
from lorajax.models import hf_files
from lorajax.models import hf_naming
from lorajax.models import llama
from lorajax.models import llama_layout

PyTree = Any
# Files of a checkpoint directory that describe its tokenizer and generation
# defaults; an export copies those the source has.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'added_tokens.json',
                   'chat_template.jinja', 'chat_template.json', 'vocab.txt',
                   'vocab.json', 'merges.txt', 'tokenizer.model',
                   'sentencepiece.bpe.model', 'spiece.model',
                   'generation_config.json')
# Stored buffers (not parameters) a checkpoint may hold.
_BUFFERS = ('position_ids', 'token_type_ids', 'inv_freq')


@dataclasses.dataclass(frozen=True)
class HfModel:
  """One model's naming in Hugging Face transformers.

  Attributes:
    family: the ``model_type`` (``'bert'``, ``'qwen2'``, ...).
    config: the lorajax config.
    keys: Flax path -> HF state-dict key (``'bert.encoder.layer.0.attention.
      self.query.weight'``), for the unscanned layout.
    task_type: PEFT's task type for this head (None for a bare model).
    architecture: the transformers class name.
    head: ``'causal_lm'``, ``'classification'`` or ``'base'``.
    naming: the family's ``hf_naming.Family``.
    source: the checkpoint directory the model was loaded from, or None
      for a shipped model.
    source_config: its parsed ``config.json`` (None without a source).
  """
  family: str
  config: Any
  keys: dict[str, str]
  task_type: str | None
  architecture: str
  head: str = 'causal_lm'
  naming: hf_naming.Family | None = None
  source: pathlib.Path | None = None
  source_config: dict[str, Any] | None = None

  @property
  def scanned(self) -> bool:
    return bool(getattr(self.config, 'scan_layers', False))

  @property
  def prefix(self) -> str:
    """The prefix of the base model's keys (``'model.'``, ``''``)."""
    return self.naming.prefix(self.head)

  def is_kernel(self, path: str) -> bool:
    return path.endswith('/kernel')

  def module_of(self, path: str) -> str:
    """HF module name of a Flax path (the key without ``.weight``/``.bias``)."""
    return self.keys[path].rsplit('.', 1)[0]

  def is_head_module(self, module: str) -> bool:
    """Whether ``module`` belongs to the task head (``classifier``,
    ``classifier.out_proj``, ``lm_head``)."""
    return module.split('.')[0] in self.naming.head_modules

  def head_paths(self) -> list[str]:
    """Flax paths of the task head PEFT saves whole (``modules_to_save``)."""
    if self.task_type == 'SEQ_CLS':
      return [p for p in self.keys if self.is_head_module(self.module_of(p))]
    return []

  def kernel_modules(self) -> dict[str, str]:
    """HF module name -> Flax kernel path, for every Linear of the model
    (a 3-D MoE expert parameter under its own name, as PEFT's
    ``target_parameters`` names it: ``...mlp.experts.gate_up_proj``)."""
    return {self.module_of(p) if self.keys[p].endswith('.weight')
            else self.keys[p]: p for p in self.keys if self.is_kernel(p)}

  def linear_modules(self) -> list[str]:
    """PEFT's ``'all-linear'``: every Linear but the task head's."""
    return sorted(m for m in self.kernel_modules()
                  if not self.is_head_module(m))

  def source_modules(self) -> set[str]:
    """Modules of the source checkpoint, named for this head, that PEFT's
    target matching also sees (RoBERTa's pooler, which lorajax's bare
    RoBERTa does not hold)."""
    if self.source is None:
      return set()
    theirs = self.naming.prefix(_checkpoint_head(self.source_config,
                                                 self.naming))
    out = set()
    for key in hf_files.CheckpointFiles(self.source).keys():
      module = key.rsplit('.', 1)[0]
      if (key.endswith(_BUFFERS) or self.is_head_module(module)
          or not module.startswith(theirs)):
        continue
      out.add(self.prefix + module[len(theirs):])
    return out

  def unused(self, path: str) -> bool:
    """Whether ``path`` is a parameter this head does not compute with."""
    return path.startswith(self.naming.unused.get(self.head, ()))

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
    pooling = getattr(self.config, 'pooling', 'cls')
    if pooling != 'cls' and self.head == 'classification':
      raise ValueError(
          f'pooling={pooling!r} cannot be exported: transformers\' '
          f'{self.architecture} feeds its classifier the [CLS] token '
          f'through the tanh pooler, and no transformers sequence '
          f'classifier averages the tokens, so its logits would differ. '
          f'Train with pooling=\'cls\' (--config.model.pooling=cls) to '
          f'export, or keep the adapter in lorajax\'s own format '
          f'(lorajax.io.save_adapter, experiments.export --format=lorajax)')
    if self.source is None:
      self._check_plain()
      return
    # The config transformers will build must be the one lorajax ran.
    written = self.naming.read_config(self.hf_config())
    free = set(hf_naming.FREE_FIELDS)
    if self.head == 'base':
      free.add('tie_embeddings')   # A bare decoder has no output layer.
    for field in dataclasses.fields(self.config):
      if field.name in free or not hasattr(written, field.name):
        continue
      ours, theirs = getattr(self.config, field.name), getattr(
          written, field.name)
      if ours != theirs:
        raise ValueError(
            f'{field.name}={ours!r}, but {self.source}/config.json gives '
            f'{theirs!r}: the exported {self.architecture} would compute '
            f'with the latter. Export the model as it was loaded, or keep '
            f'the adapter in lorajax\'s own format')

  def _check_plain(self) -> None:
    """Without a source, ``hf_config`` writes plain BERT / Llama configs."""
    unsaid = {'bert': {'head': 'bert', 'position_padding_idx': None},
              'llama': {'qkv_bias': False, 'out_bias': False,
                        'mlp_bias': False, 'qk_norm': False,
                        'sliding_window': None, 'rope_scaling': None}}
    for field, plain in unsaid[self.family].items():
      value = getattr(self.config, field, plain)
      if value != plain:
        raise ValueError(
            f'{field}={value!r} cannot be exported as {self.architecture} '
            f'without the checkpoint it was loaded from: pass source=<its '
            f'directory> (lorajax.models.load) so that its config.json is '
            f'kept, or keep the adapter in lorajax\'s own format')

  def expected_shapes(self) -> dict[str, tuple[int, ...]]:
    """Flax path -> shape of every parameter, unscanned like ``keys``."""
    return self.naming.shapes(self.config)

  def state_dict(self, params: PyTree) -> dict[str, np.ndarray]:
    """HF keys -> float32 arrays in PyTorch layout (kernels transposed).

    Raises:
      ValueError: a parameter missing, of another shape than the config
        gives (e.g. a classifier of another width than ``num_labels``), one
        the architecture has no key for, or a quantized kernel.
    """
    flat = {p: v for p, v in spec_lib.flatten_paths(self.unscan(params))
            if not self.unused(p)}
    missing = sorted(set(self.keys) - set(flat))
    if missing:
      raise ValueError(f'params lack {len(missing)} parameters of '
                       f'{self.architecture}, e.g. {missing[:4]}')
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
      out[key] = np.ascontiguousarray(self.naming.to_torch(path, value))
    return out

  def carried_tensors(self, produced: dict[str, Any]) -> dict[str, np.ndarray]:
    """Tensors of the source checkpoint lorajax does not hold (RoBERTa's
    pooler), copied unchanged into an export of the source's own head."""
    if self.source is None or hf_naming.architecture(
        self.source_config, self.head) not in (
            self.source_config.get('architectures') or []):
      return {}
    files = hf_files.CheckpointFiles(self.source)
    carried = {k: np.asarray(files.get(k), np.float32) for k in files.keys()
               if k not in produced and not k.endswith(_BUFFERS)
               and not self.is_head_module(k.removeprefix(self.prefix))
               and not self.naming.renamed(k)}
    if carried:
      logging.info('%s: copied unchanged from %s: %s', self.architecture,
                   self.source, sorted(carried))
    return carried

  def hf_config(self) -> dict[str, Any]:
    """The ``config.json`` dict transformers builds this model from."""
    c = self.config
    labels = {'id2label': {str(i): f'LABEL_{i}' for i in range(
        getattr(c, 'num_labels', 0))},
              'label2id': {f'LABEL_{i}': i for i in range(
                  getattr(c, 'num_labels', 0))}}
    if self.source_config is not None:
      hf = copy.deepcopy(self.source_config)
      hf['architectures'] = [self.architecture]
      # transformers assumes 2 labels where config.json names none.
      if self.head == 'classification' and len(
          hf.get('id2label') or 'ab') != c.num_labels:
        hf.update(labels)
      stored = [f for f in ('dtype', 'torch_dtype') if f in hf] or ['dtype']
      hf.update({f: 'float32' for f in stored})
      if hf.get('vocab_size', c.vocab_size) != c.vocab_size:
        hf['vocab_size'] = c.vocab_size   # grown by config.new_tokens
      return hf
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
          **labels, 'torch_dtype': 'float32'}
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


def _checkpoint_head(hf: dict[str, Any], naming: hf_naming.Family) -> str:
  """The head of the source's own ``architectures`` entry."""
  for arch in hf.get('architectures') or ():
    for head, suffix in hf_naming.HEAD_SUFFIXES.items():
      if arch.endswith(suffix) and head in naming.heads:
        return head
  return naming.heads[0]


def hf_model(config: Any, *, source: str | os.PathLike[str] | None = None,
             head: str | None = None) -> HfModel:
  """The ``HfModel`` of a lorajax model.

  Args:
    config: the model's config (``BertConfig``, ``LlamaConfig``, or that
      of a family ``lorajax.models.load`` read).
    source: the Hugging Face checkpoint directory the model was loaded from
      (its ``config.json`` gives the family); None for the shipped models.
    head: ``'causal_lm'``, ``'classification'`` or ``'base'``; default the
      source's own (its ``architectures``), or the shipped model's.

  Raises:
    TypeError: no source and a config of another type.
    ValueError: a family without a key map, or a head it does not have.
  """
  if source is None:
    if isinstance(config, bert.BertConfig):
      model_type, default = 'bert', 'classification'
    elif isinstance(config, llama.LlamaConfig):
      model_type, default = 'llama', 'causal_lm'
    else:
      raise TypeError(f'no Hugging Face naming for {type(config).__name__}; '
                      'expected a BertConfig or a LlamaConfig, or pass '
                      'source= the checkpoint directory it was loaded from')
    hf = None
    naming = hf_naming.family(model_type)
    head = head or default
  else:
    source = pathlib.Path(source)
    hf = hf_files.CheckpointFiles(source).config
    model_type = hf.get('model_type')
    naming = hf_naming.family(model_type)
    head = head or _checkpoint_head(hf, naming)
  if head not in naming.heads:
    raise ValueError(f'head={head!r}: a {model_type} model has heads '
                     f'{naming.heads}')
  arch = (hf_naming.architecture(hf, head) if hf is not None else
          hf_naming.CLASS_STEMS[model_type] + hf_naming.HEAD_SUFFIXES[head])
  return HfModel(model_type, config, naming.key_map(config, head),
                 hf_naming.TASK_TYPES[head], arch, head, naming, source, hf)


def export_merged(directory: str | pathlib.Path, config: Any, params: PyTree,
                  adapters: PyTree | None = None,
                  spec: spec_lib.LoraSpec | None = None, *,
                  source: str | os.PathLike[str] | None = None,
                  head: str | None = None) -> pathlib.Path:
  """Writes ``config.json`` + ``model.safetensors`` in Hugging Face layout.

  Args:
    directory: created if needed.
    config: the model's config.
    params: the inner params dict (trained leaves such as a classifier head
      already in place).
    adapters, spec: if given, folded into the kernels first
      (``lorajax.merge``).
    source: the checkpoint directory the model was loaded from: its
      ``config.json`` is kept (with this head's ``architectures``) and its
      tokenizer files are copied (``TOKENIZER_FILES``).
    head: the head to write (default: the source's own; see ``hf_model``).

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
  hf = hf_model(config, source=source, head=head)
  hf.check_expressible()
  if adapters is not None:
    params = adapters_lib.merge(params, adapters, spec)
  tensors = hf.state_dict(params)
  tensors.update(hf.carried_tensors(tensors))
  files: dict[str, Any] = {'model.safetensors': tensors,
                           'config.json': hf.hf_config()}
  if hf.source is not None:
    files.update({name: hf.source / name for name in TOKENIZER_FILES
                  if (hf.source / name).is_file()})
  write_files(directory, files)
  return pathlib.Path(directory)


def write_files(directory: str | pathlib.Path,
                files: dict[str, Any]) -> None:
  """Writes ``{name: content}`` into ``directory``, complete or not at all.

  The files go to a fresh sibling folder first, with ``lorajax_digest.json``
  (their sizes and sha256, which PEFT and transformers ignore), and that
  folder is swapped in whole (``digests.writing``): a failure or a SIGKILL
  on the way leaves ``directory`` as it was. ``.safetensors`` names get
  float tensors (the ``'pt'`` format PyTorch readers want), a
  ``pathlib.Path`` is a file to copy (a tokenizer file), anything else is
  written as JSON.
  """
  with digests.writing(directory) as staging:
    for name, content in files.items():
      if isinstance(content, pathlib.Path):
        shutil.copyfile(content, staging / name)
      elif name.endswith('.safetensors'):
        st_numpy.save_file(content, str(staging / name),
                           metadata={'format': 'pt'})
      else:
        (staging / name).write_text(json.dumps(content, indent=2))
