"""The base model a config names: module, pretrained parameters, tokenizer.

``load_model(config)`` is the first of a run's three separate steps (model,
then ``attach.attach_method``, then ``input_pipeline.load_splits``): it reads
``config.model`` (and ``config.task``, which picks the family) and nothing
about the method or the data, so evaluation and export can load a model
without touching a data set.

- ``classification``: a BERT encoder (pretrained all-MiniLM-L6-v2, or a
  random one of that shape or a tiny one) with a 2-way classifier;
- ``lm``: a Llama decoder (pretrained SmolLM2-135M, or random), with the
  tokenizer of its GGUF file;
- ``config.model.path``: a Hugging Face checkpoint directory;
- ``config.model.factory``: your own model, from a function the run imports
  (``lorajax.training.model_factory``).

Example:

  >>> from lorajax.training import config as config_lib
  >>> config = config_lib.base_config('classification')
  >>> config.model.pretrained, config.model.size = False, 'tiny'
  >>> model = load_model(config)
  >>> model.name, model.params['encoder']['layer_0']['attention']['query']['kernel'].shape
  ('minilm', (32, 32))
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np

from lorajax import assets
from lorajax.models import auto
from lorajax.models import bert
from lorajax.models import bert_loading
from lorajax.models import bert_tokenizer
from lorajax.models import bpe_tokenizer
from lorajax.models import llama
from lorajax.models import llama_loading
from lorajax.models import remat as remat_lib
from lorajax.training import model_factory
from lorajax.training import sharding as sharding_lib
from lorajax.training import trainable_tokens

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded base model, before any method is attached.

  Attributes:
    name: ``'minilm'``, ``'smollm2'``, a checkpoint's family, or the
      ``model.factory`` string.
    module: the Flax module (``bert.Bert`` or ``llama.Llama``); None for a
      factory model.
    params: the base parameters as loaded (the inner ``'params'`` dict).
    config: the ``BertConfig`` / ``LlamaConfig`` (for PEFT and HF exports);
      None for a factory model.
    info: JSON-able description of the architecture; stored with every
      checkpoint and checked when one is restored.
    tokenizer: a ``tokenizers.Tokenizer`` for the data pipeline.
    embedding: the word embedding table ``[vocab, hidden]`` (prompt tuning
      starts from it); None for a factory model.
    eos_id: the end-of-sequence token id (decoders; None for encoders).
    chat_template: the checkpoint's chat template (decoders), or None.
    special_tokens: special token strings by name, for the template.
    apply: a factory model's ``apply(params, batch, *, train, rng) ->
      logits``; None for the others, whose apply the task builds.
  """
  name: str
  module: nn.Module
  params: PyTree
  config: Any
  info: dict[str, Any]
  tokenizer: Any
  embedding: jax.Array
  eos_id: int | None = None
  # Decoders: the Jinja chat template the checkpoint ships, and the special
  # tokens it may name ({'bos_token': ..., 'eos_token': ...}).
  chat_template: str | None = None
  special_tokens: dict[str, str] | None = None
  apply: Callable[..., jax.Array] | None = None


def _check_size(size: str, pretrained: bool) -> None:
  if pretrained and size != 'base':
    raise ValueError(f'model.size={size!r}: pretrained weights exist for '
                     "'base' only")
  if size not in ('base', 'tiny'):
    raise ValueError(f"model.size={size!r}; expected 'base' or 'tiny'")


def _remat(config) -> str:
  """``config.remat``, checked (the models' ``remat`` field)."""
  return remat_lib.check(config.get('remat', 'none'), field='config.remat')


def _arch(cfg: Any, drop: tuple[str, ...]) -> dict[str, Any]:
  return {k: v for k, v in dataclasses.asdict(cfg).items()
          if k not in drop and 'dropout' not in k}


def load_minilm(config, labels: Sequence[str] = ()) -> Model:
  """all-MiniLM-L6-v2 (or a random BERT of ``config.model.size``) with a new
  classifier of ``len(labels)`` classes (2 when none are named); the names
  go into ``info['labels']``."""
  m = config.model
  num_labels = len(labels) or 2
  _check_size(m.size, m.pretrained)
  overrides = dict(dtype=jnp.dtype(m.dtype), hidden_dropout=m.dropout,
                   attention_dropout=m.dropout, pooling=m.pooling,
                   remat=_remat(config))
  key = jax.random.key(config.seed)
  if m.pretrained:
    cfg, params = bert_loading.load_minilm(num_labels, key=key,
                                           **overrides)
  else:
    if m.size == 'tiny':
      cfg = bert.BertConfig(hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, num_labels=num_labels,
                            **overrides)
    else:
      cfg = bert.BertConfig.minilm_l6(num_labels=num_labels, **overrides)
    params = bert.Bert(cfg).init(key, jnp.ones((1, 8), jnp.int32))['params']
  info = {'name': 'minilm', 'size': m.size,
          **_arch(cfg, ('dtype', 'param_dtype', 'remat')),
          **({'labels': list(labels)} if labels else {})}
  return Model('minilm', bert.Bert(cfg), params, cfg, info,
               bert_tokenizer.bert_tokenizer(),
               params['embeddings']['word_embeddings']['embedding'])


def load_smollm2(config) -> Model:
  """SmolLM2-135M (or a random Llama of ``config.model.size``) and the
  tokenizer of its GGUF file."""
  m = config.model
  _check_size(m.size, m.pretrained)
  start = time.perf_counter()
  reader = llama_loading.as_reader(
      assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
  tok = bpe_tokenizer.gguf_tokenizer(reader)
  special_ids = bpe_tokenizer.gguf_special_ids(reader)
  eos = special_ids['eos']
  kw = dict(dtype=jnp.dtype(m.dtype), remat=_remat(config),
            attn_chunk=int(config.get('attn_chunk', 0)))
  if m.pretrained:
    cfg, params = llama_loading.load_gguf_llama(reader, **kw)
  else:
    if m.size == 'tiny':
      cfg = llama.LlamaConfig.tiny(vocab_size=tok.get_vocab_size(), **kw)
    else:
      cfg = llama.LlamaConfig.smollm2_135m(**kw)
    params = llama.Llama(cfg).init(jax.random.key(config.seed),
                                   jnp.ones((1, 8), jnp.int32))['params']
  logging.info('smollm2 (%s, pretrained=%s) loaded in %.1f s', m.size,
               m.pretrained, time.perf_counter() - start)
  info = {'name': 'smollm2', 'size': m.size, **_arch(cfg, ('dtype', 'remat'))}
  return Model('smollm2', llama.Llama(cfg), params, cfg, info, tok,
               params['embed']['embedding'], eos,
               bpe_tokenizer.gguf_chat_template(reader),
               bpe_tokenizer.special_tokens_map(tok, special_ids))


def _mesh_placement(config) -> Callable[[str, np.ndarray], jax.Array]:
  """``auto.load``'s ``place`` in mode ``mesh``: each tensor goes from the
  file straight onto its FSDP sharding (``sharding.fsdp_spec``, the spec
  the mesh runner gives frozen leaves and unscanned kernels, which it then
  keeps as they are), so no host ever holds the whole model."""
  mesh = sharding_lib.make_mesh(data=int(config.mesh.data),
                                model=int(config.mesh.model))
  model_size = mesh.shape[sharding_lib.MODEL]

  def place(path: str, value: np.ndarray) -> jax.Array:
    del path
    spec = sharding_lib.fsdp_spec(value.shape, model_size)
    return sharding_lib.put(value, NamedSharding(mesh, spec))

  return place


def load_checkpoint(config, labels: Sequence[str] = ()) -> Model:
  """The Hugging Face checkpoint directory ``config.model.path``
  (``lorajax.models.load``): an encoder with a sequence classifier of
  ``len(labels)`` classes (the checkpoint's own classifier, or a new one
  when it has none; one of another width is refused), or a causal-LM
  decoder for ``lm``/``sft``.
  The checkpoint's head is used as it is: ``model.pooling``, ``size`` and
  ``pretrained`` are the shipped models' fields.

  Raises:
    ValueError: a family the task cannot train (a decoder for
      classification, an encoder for the LM), and whatever ``load``
      refuses.
  """
  m = config.model
  start = time.perf_counter()
  overrides = {'key': jax.random.key(config.seed), 'dtype': jnp.dtype(m.dtype),
               'remat': _remat(config)}
  if config.task == 'classification':
    overrides.update(head='classification', hidden_dropout=m.dropout,
                     attention_dropout=m.dropout)
    if labels:
      overrides['num_labels'] = len(labels)
  else:
    overrides['head'] = 'causal_lm'
  if config.get('mode') == 'mesh':
    overrides['place'] = _mesh_placement(config)
  try:
    loaded = auto.load(m.path, **overrides)
  except ValueError as e:
    raise ValueError(f'model.path={m.path!r} (task {config.task}): '
                     f'{e}') from e
  decoder = isinstance(loaded.config, llama.LlamaConfig)
  if decoder != (config.task != 'classification'):
    raise ValueError(f'model.path={m.path!r} is a {loaded.family} '
                     f'{"decoder" if decoder else "encoder"}; task '
                     f'{config.task!r} trains '
                     f'{"an encoder" if decoder else "a decoder"}')
  if decoder and config.get('attn_chunk', 0):   # a decoder-only field
    cfg = loaded.config.replace(attn_chunk=int(config.attn_chunk))
    loaded = dataclasses.replace(loaded, config=cfg,
                                 module=loaded.module.clone(config=cfg))
  if loaded.tokenizer is None:
    raise ValueError(f'model.path={m.path!r} has no tokenizer.json; the data '
                     'pipeline needs one')
  if decoder:
    embedding = loaded.params['embed']['embedding']
  else:
    embedding = loaded.params['embeddings']['word_embeddings']['embedding']
  info = {'name': loaded.family, 'path': str(m.path),
          'architecture': loaded.architecture,
          **_arch(loaded.config, ('dtype', 'param_dtype', 'remat')),
          **({'labels': list(labels)} if labels else {})}
  logging.info('%s loaded from %s in %.1f s', loaded.architecture, m.path,
               time.perf_counter() - start)
  return Model(loaded.family, loaded.module, loaded.params, loaded.config,
               info, loaded.tokenizer, embedding, loaded.eos_id,
               loaded.chat_template, loaded.special_tokens)


def load_factory(config, labels: Sequence[str] = ()) -> Model:
  """Your own model: ``config.model.factory`` called and checked
  (``model_factory.load``); a classifier of ``len(labels)`` classes."""
  remat = _remat(config)
  if remat != 'none':
    raise ValueError(f'config.remat={remat!r}: model.factory='
                     f'{config.model.factory!r} is your own model, whose '
                     'layers lorajax does not know; wrap them in nn.remat / '
                     "jax.checkpoint in the factory and leave config.remat="
                     "'none'")
  loaded = model_factory.load(config, labels)
  return Model(config.model.factory, None, loaded.params, None, loaded.info,
               loaded.tokenizer, None, loaded.eos_id, apply=loaded.apply)


# The model each task trains, by config.task.
_LOADERS = {'classification': ('minilm', load_minilm),
            'lm': ('smollm2', load_smollm2),
            'sft': ('smollm2', load_smollm2)}


def _check_attn_chunk(config) -> None:
  """``config.attn_chunk``: an integer >= 0, and 0 where lorajax does not
  run the attention (encoders, a ``model.factory`` model)."""
  chunk = config.get('attn_chunk', 0)
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ValueError(f'config.attn_chunk={chunk!r}: expected an integer >= 0')
  if not chunk:
    return
  if config.model.get('factory'):
    raise ValueError(f'config.attn_chunk={chunk}: model.factory='
                     f'{config.model.factory!r} is your own model, whose '
                     'attention lorajax does not run; leave it 0')
  if config.task == 'classification':
    raise ValueError(f'config.attn_chunk={chunk}: task classification '
                     'trains an encoder; only the decoders (lm, sft) run '
                     'attention in blocks')


def load_model(config, labels: Sequence[str] = ()) -> Model:
  """The base model of ``config.task`` / ``config.model``.

  ``labels``: a classifier's classes in id order (the data's, from
  ``input_pipeline.label_names``, or a checkpoint's ``model['labels']``);
  the head has one output each. Unused by the LM.

  Raises:
    ValueError: an unknown task, a model the task does not support, or a
      size without pretrained weights.
  """
  if config.task not in _LOADERS:
    raise ValueError(f'config.task={config.task!r}; expected one of '
                     f'{sorted(_LOADERS)}')
  _check_attn_chunk(config)
  if config.model.get('factory'):
    model = load_factory(config, labels)
  elif config.model.get('path'):
    model = load_checkpoint(config, labels)
  else:
    name, load = _LOADERS[config.task]
    if config.model.name != name:
      raise ValueError(f'model.name={config.model.name!r}; {config.task} '
                       f'supports {name!r}')
    model = (load(config, labels) if config.task == 'classification'
             else load(config))
  return trainable_tokens.add_new_tokens(config, model)   # config.new_tokens
