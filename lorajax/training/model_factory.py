"""Your own Flax model in the training loop: ``config.model.factory``.

``config.model.factory = 'pkg.module:make_model'`` names a function the run
imports and calls, instead of loading a shipped model or a Hugging Face
directory::

  make_model(*, key, num_labels, **config.model.factory_kwargs)

- ``key``: ``jax.random.key(config.seed)``, for what the factory
  initializes (a new head, a random model);
- ``num_labels``: the number of classes of the data (task
  ``'classification'``), None for ``'lm'``.

It returns an object (``FactoryModel``, or any object with these
attributes):

- ``params``: the base parameters, a nested dict of arrays (pretrained ones
  your code loaded, or random); for a Flax linen module its inner
  ``'params'`` dict. Adapter rules match their ``/``-joined paths.
- ``module`` (a ``flax.linen.Module``) or ``apply``, not both.
  ``module.apply({'params': params}, input_ids, attention_mask)`` (task
  ``'classification'``) or ``module.apply({'params': params}, inputs)``
  (``'lm'``) gives the logits; ``apply(params, batch, *, train, rng)``
  gives them from the whole batch dict (``train`` is True in training
  steps, where ``rng`` is a key for dropout; False and None in evaluation).
- ``tokenizer`` (optional): any object with ``encode_batch(texts)``, such
  as a ``tokenizers.Tokenizer`` (a transformers tokenizer is unwrapped to
  its ``backend_tokenizer``). Without one, classification uses MiniLM's
  BERT WordPiece (30,522 ids) and the LM SmolLM2's BPE (49,152 ids).
- ``eos_id``: the id that ends each document of LM text; needed for task
  ``'lm'`` with your own tokenizer.

The batch a classifier sees holds ``input_ids``, ``attention_mask``,
``token_type_ids`` ``[B, T]`` (int32) and ``label`` ``[B]``; its logits are
``[B, num_labels]``. An LM's holds ``inputs``, ``targets``, ``mask``
``[B, T]``; its logits are ``[B, T, V]`` with ``V`` at least the
tokenizer's vocabulary. ``load(config, labels)`` checks all of this with
``jax.eval_shape`` (no real compute) before anything trains, and refuses a
factory that does not import, is not callable, fails, or returns something
else, naming the factory string and what is wrong.

The run records the factory, its kwargs and the parameters' shapes in every
checkpoint's model description, so a resume with another factory is
refused; PEFT and merged exports do not exist for such a model (the
lorajax adapter file does).

Example:

  >>> from lorajax.training import config as config_lib
  >>> config = config_lib.base_config('classification')
  >>> config.model.factory = 'lorajax.training.model_factory:example_mlp'
  >>> loaded = load(config, labels=('neg', 'pos'))
  >>> loaded.info['factory'], sorted(loaded.params)
  ('lorajax.training.model_factory:example_mlp', ['classifier', 'embed', 'hidden'])
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax import assets
from lorajax import spec as spec_lib
from lorajax.models import bert_tokenizer
from lorajax.models import bpe_tokenizer
from lorajax.models import llama_loading

PyTree = Any
TASKS = ('classification', 'lm')   # sft needs a chat-template decoder.
_RESERVED = ('key', 'num_labels')


@dataclasses.dataclass(frozen=True)
class FactoryModel:
  """What a factory returns (any object with these attributes will do).

  Attributes:
    params: the base parameters, a nested dict of arrays.
    module: a ``flax.linen.Module`` called as the module docstring says;
      or None when ``apply`` is given.
    apply: ``apply(params, batch, *, train, rng) -> logits``; or None when
      ``module`` is given.
    tokenizer: an object with ``encode_batch(texts)``; None for the task's
      default.
    eos_id: the end-of-document id of LM text with your own tokenizer.
  """
  params: PyTree
  module: nn.Module | None = None
  apply: Callable[..., jax.Array] | None = None
  tokenizer: Any = None
  eos_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A checked factory model, as the run uses it.

  Attributes:
    apply: ``apply(params, batch, *, train=False, rng=None) -> logits``.
    params: the base parameters (jax arrays).
    tokenizer: the data pipeline's tokenizer.
    eos_id: end-of-document id (LM), or None.
    info: JSON-able description stored with every checkpoint.
  """
  apply: Callable[..., jax.Array]
  params: PyTree
  tokenizer: Any
  eos_id: int | None
  info: dict[str, Any]


def import_factory(path: str) -> Callable[..., Any]:
  """The callable ``'pkg.module:name'`` names (``name`` may be dotted).

  Raises:
    ValueError: a malformed string, a module that does not import, a
      missing attribute, or one that is not callable; naming ``path``.
  """
  module_name, sep, attr = path.partition(':')
  if not sep or not module_name or not attr:
    raise ValueError(f"model.factory={path!r}: expected 'pkg.module:function'")
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'model.factory={path!r}: module {module_name!r} does '
                     f'not import ({type(e).__name__}: {e}); is its folder '
                     'on PYTHONPATH (or the current directory)?') from e
  for part in attr.split('.'):
    if not hasattr(obj, part):
      raise ValueError(f'model.factory={path!r}: {module_name} has no '
                       f'attribute {attr!r}')
    obj = getattr(obj, part)
  if not callable(obj):
    raise ValueError(f'model.factory={path!r}: {attr} is a '
                     f'{type(obj).__name__}, not a function')
  return obj


def _kwargs(config) -> dict[str, Any]:
  kwargs = config.model.get('factory_kwargs')
  kwargs = {} if kwargs is None else (
      kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs))
  clash = sorted(set(kwargs) & set(_RESERVED))
  if clash:
    raise ValueError(f'model.factory_kwargs has {clash}, which the run '
                     'passes itself (key from config.seed, num_labels from '
                     'the data)')
  return kwargs


def _module_apply(module: nn.Module, task: str):
  """``apply(params, batch, *, train, rng)`` of a linen module."""
  def apply(params, batch, *, train=False, rng=None):
    del train, rng   # A module gets no dropout: give ``apply`` for that.
    if task == 'classification':
      return module.apply({'params': params}, batch['input_ids'],
                          batch['attention_mask'])
    return module.apply({'params': params}, batch['inputs'])
  return apply


def _tokenizer(made: Any, task: str) -> tuple[Any, int | None]:
  """The factory's tokenizer and eos id, or the task's default pair."""
  tok = getattr(made, 'tokenizer', None)
  eos = getattr(made, 'eos_id', None)
  if tok is None:
    if task == 'classification':
      return bert_tokenizer.bert_tokenizer(), None
    reader = llama_loading.as_reader(
        assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
    default_eos = bpe_tokenizer.gguf_special_ids(reader)['eos']
    return bpe_tokenizer.gguf_tokenizer(reader), (
        default_eos if eos is None else eos)
  tok = getattr(tok, 'backend_tokenizer', tok)   # transformers' fast ones
  if not callable(getattr(tok, 'encode_batch', None)):
    raise ValueError(f'its tokenizer ({type(tok).__name__}) has no '
                     'encode_batch(texts)')
  if task == 'lm' and eos is None:
    raise ValueError("task 'lm' with its own tokenizer needs eos_id (the "
                     'id that ends each document)')
  return tok, eos


def _dummy_batch(task: str, length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch entries of ``task``, two rows of ``length`` tokens."""
  row = jax.ShapeDtypeStruct((2, length), jnp.int32)
  if task == 'classification':
    return {'input_ids': row, 'attention_mask': row, 'token_type_ids': row,
            'label': jax.ShapeDtypeStruct((2,), jnp.int32)}
  return {'inputs': row, 'targets': row, 'mask': row}


def _check_logits(apply, params, task: str, length: int,
                  num_labels: int | None, vocab: int | None) -> None:
  """Raises ValueError unless ``apply`` gives the task's logits."""
  batch = _dummy_batch(task, length)
  shapes = {k: v.shape for k, v in batch.items()}
  for train in (False, True):
    rng = jax.random.key(0) if train else None
    try:
      out = jax.eval_shape(
          lambda p, b: apply(p, b, train=train, rng=rng), params, batch)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'applying it to a batch {shapes} (train={train}) '
                       f'failed: {type(e).__name__}: {str(e)[:400]}') from e
    if not isinstance(out, jax.ShapeDtypeStruct):
      raise ValueError(f'its logits are a {type(out).__name__}, not one '
                       'array')
    if not jnp.issubdtype(out.dtype, jnp.floating):
      raise ValueError(f'its logits have dtype {out.dtype}, not a float')
    if task == 'classification' and out.shape != (2, num_labels):
      raise ValueError(f'its logits have shape {out.shape} on a batch of 2 '
                       f'rows; task classification needs [B, num_labels] = '
                       f'(2, {num_labels})')
    if task == 'lm':
      if len(out.shape) != 3 or out.shape[:2] != (2, length):
        raise ValueError(f'its logits have shape {out.shape} on inputs '
                         f'(2, {length}); task lm needs [B, T, V]')
      if vocab is not None and out.shape[2] < vocab:
        raise ValueError(f'its logits have V={out.shape[2]} entries, fewer '
                         f'than the tokenizer\'s {vocab} token ids')


def _check_params(made: Any) -> PyTree:
  params = getattr(made, 'params', None)
  if isinstance(params, flax.core.FrozenDict):
    params = flax.core.unfreeze(params)
  if not isinstance(params, dict) or not params:
    raise ValueError(f'its params are {type(params).__name__}'
                     f'{" (empty)" if params == {} else ""}; expected a '
                     'non-empty nested dict of arrays')
  for path, leaf in spec_lib.flatten_paths(params):
    if not hasattr(leaf, 'shape') or not hasattr(leaf, 'dtype'):
      raise ValueError(f'its params leaf {path} is a {type(leaf).__name__}, '
                       'not an array')
  return jax.tree.map(jnp.asarray, params)


def _apply_of(made: Any, params: PyTree, task: str):
  module, apply = getattr(made, 'module', None), getattr(made, 'apply', None)
  if (module is None) == (apply is None):
    raise ValueError('it returns ' + ('both module and apply; give one' if
                                      module is not None else
                                      'neither module nor apply'))
  if module is None:
    if not callable(apply):
      raise ValueError(f'its apply is a {type(apply).__name__}, not callable')
    return apply
  if not isinstance(module, nn.Module):
    raise ValueError(f'its module is a {type(module).__name__}, not a '
                     'flax.linen.Module (give apply for other functions)')
  if set(params) == {'params'}:
    raise ValueError("its params are a variables dict {'params': ...}; "
                     "return the inner variables['params']")
  return _module_apply(module, task)


def shapes_digest(params: PyTree) -> str:
  """16 hex digits of sha256 over every leaf's path, shape and dtype."""
  rows = [[p, list(np.shape(x)), str(x.dtype)]
          for p, x in spec_lib.flatten_paths(params)]
  return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def load(config, labels: Sequence[str] = ()) -> Loaded:
  """Imports, calls and checks ``config.model.factory``.

  Args:
    config: the run config (``model.factory``, ``model.factory_kwargs``,
      ``task``, ``seed``, ``data.max_len``).
    labels: the classifier's classes in id order (2 when empty).

  Returns:
    The checked ``Loaded`` model.

  Raises:
    ValueError: naming ``model.factory`` and what is wrong (see the module
      docstring).
  """
  path = config.model.factory
  where = f'model.factory={path!r}'
  if config.task not in TASKS:
    raise ValueError(f'{where}: task {config.task!r} is not supported for '
                     f'your own model; expected one of {TASKS}')
  fn = import_factory(path)
  kwargs = _kwargs(config)
  num_labels = (len(labels) or 2) if config.task == 'classification' else None
  try:
    made = fn(key=jax.random.key(config.seed), num_labels=num_labels,
              **kwargs)
  except TypeError as e:
    raise ValueError(f'{where}: calling it with key, num_labels and '
                     f'factory_kwargs {sorted(kwargs)} failed: {e}') from e
  try:
    params = _check_params(made)
    apply = _apply_of(made, params, config.task)
    tokenizer, eos_id = _tokenizer(made, config.task)
    vocab = (tokenizer.get_vocab_size() if hasattr(tokenizer,
                                                   'get_vocab_size')
             else None)
    _check_logits(apply, params, config.task, int(config.data.max_len),
                  num_labels, vocab)
  except ValueError as e:
    raise ValueError(f'{where} returned a model the run cannot use: '
                     f'{e}') from e
  info = {'name': 'factory', 'factory': path,
          'factory_kwargs': json.loads(json.dumps(kwargs, default=str)),
          'param_shapes': shapes_digest(params),
          **({'labels': list(labels)} if labels else {})}
  return Loaded(apply, params, tokenizer, eos_id, info)


def check_export(config, fmt: str) -> None:
  """Raises ValueError for an HF export (``peft``, ``merged``) of a
  factory model: no Hugging Face class exists to load it into."""
  path = config.model.get('factory')
  if path and fmt != 'lorajax':
    raise ValueError(f'format {fmt!r} writes a Hugging Face / PEFT '
                     f'checkpoint, which needs a transformers model class; '
                     f'model.factory={path!r} is your own model. Export '
                     "--format lorajax (lorajax.io.load_adapter reads it)")


class _ExampleMlp(nn.Module):
  """Mean of token embeddings -> Dense -> classifier (the doctest's)."""
  num_labels: int

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    x = nn.Embed(30522, 16, name='embed')(input_ids)
    m = attention_mask[..., None].astype(x.dtype)
    x = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    x = nn.tanh(nn.Dense(16, name='hidden')(x))
    return nn.Dense(self.num_labels, name='classifier')(x)


def example_mlp(*, key, num_labels) -> FactoryModel:
  """A tiny random classifier: the smallest factory (docstring example)."""
  module = _ExampleMlp(num_labels)
  ids = jnp.ones((1, 4), jnp.int32)
  return FactoryModel(module.init(key, ids, ids)['params'], module=module)
