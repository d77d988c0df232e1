"""``load(path)``: a local Hugging Face checkpoint as a lorajax model.

Dispatch is on ``config.json``'s ``model_type`` (the family) and its first
``architectures`` entry (the head), as transformers' Auto classes do:

| model_type | module | heads |
|---|---|---|
| llama, mistral, qwen2, qwen3, gemma, gemma2, phi3 | ``llama.Llama`` | ``*ForCausalLM``, bare ``*Model`` |
| mixtral, qwen3_moe | ``moe.MoeDecoder`` | ``*ForCausalLM``, bare ``*Model`` |
| bert, roberta, xlm-roberta, distilbert | ``bert.Bert`` | ``*ForSequenceClassification``, bare ``*Model`` |

Anything else, and any configuration value that changes the computation
and is not implemented, is refused with a ``ValueError`` naming the field
and its value (``hf_decoders``, ``hf_encoders``); nothing is approximated.

The returned ``LoadedModel`` holds the parameters in their stored dtype
(bfloat16 stays bfloat16; the computation runs in ``dtype``) and an
``apply(params, input_ids, attention_mask=None)`` that returns the head's
output, the same numbers as the transformers class of ``architecture``:
``[B, T, vocab]`` logits of a causal LM, ``[B, num_labels]`` of a sequence
classifier, the last hidden state ``[B, T, d]`` of a bare model. Decoder
positions count the real tokens (transformers numbers slots 0..T-1 unless
given ``position_ids``): they agree without left padding.

Example:

  >>> model = load('/path/to/Qwen2-checkpoint')  # doctest: +SKIP
  >>> model.apply(model.params, ids).shape  # doctest: +SKIP
  (1, 12, 151936)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax.models import bert
from lorajax.models import hf_decoders
from lorajax.models import hf_encoders
from lorajax.models import hf_files
from lorajax.models import hf_moe
from lorajax.models import llama
from lorajax.models import llama_layout
from lorajax.models import moe

PyTree = Any
# What ``load(head=...)`` may ask for, by kind of model.
DECODER_HEADS = ('causal_lm', 'base')
ENCODER_HEADS = ('classification', 'base')


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A Hugging Face checkpoint as a Flax module and its parameters.

  Attributes:
    family: the checkpoint's ``model_type`` (``'qwen2'``, ``'roberta'``).
    architecture: the transformers class whose outputs ``apply`` gives.
    head: ``'causal_lm'``, ``'classification'`` or ``'base'``.
    module: ``llama.Llama`` or ``bert.Bert`` of ``config``.
    params: the ``'params'`` tree (stored dtypes; kernels ``[in, out]``).
    config: the ``LlamaConfig`` / ``BertConfig``.
    hf_config: the parsed ``config.json``.
    tokenizer: a ``tokenizers.Tokenizer`` from ``tokenizer.json``, or None.
    eos_id: the end-of-sequence id, if the checkpoint names one.
    eos_ids: every end-of-sequence id it names (``generate`` stops at any).
    chat_template: the tokenizer's Jinja chat template, or None.
    special_tokens: ``{'eos_token': ..., ...}`` strings of the tokenizer.
  """
  family: str
  architecture: str
  head: str
  module: nn.Module
  params: PyTree
  config: Any
  hf_config: dict[str, Any]
  tokenizer: Any = None
  eos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  chat_template: str | None = None
  special_tokens: dict[str, str] | None = None

  @property
  def is_decoder(self) -> bool:
    return isinstance(self.config, llama.LlamaConfig)

  def apply(self, params: PyTree, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, **kwargs: Any
            ) -> jax.Array:
    """The head's float32 output for ``[B, T]`` ids (see the module doc).

    ``kwargs`` go to the module (e.g. ``deterministic=False`` with
    ``rngs=`` for an encoder's dropout, ``cache_len=`` for a decoder).
    """
    variables = {'params': params}
    if self.is_decoder:
      return self.module.apply(variables, input_ids,
                               attention_mask=attention_mask,
                               hidden_only=self.head == 'base', **kwargs)
    out = self.module.apply(variables, input_ids, attention_mask, **kwargs)
    return out.hidden if self.head == 'base' else out.logits


_SUFFIXES = {'ForCausalLM': 'causal_lm',
             'ForSequenceClassification': 'classification', 'Model': 'base'}


def _head_of(architecture: str) -> str | None:
  """The head a transformers class name has, or None if not one of ours."""
  for suffix, head in _SUFFIXES.items():
    if architecture.endswith(suffix):
      return head
  return None


def _checkpoint_head(architecture: str, allowed: tuple[str, ...]) -> str:
  head = _head_of(architecture)
  if head not in allowed:
    raise ValueError(
        f'config.json architectures=[{architecture!r}]: that head is not '
        f'implemented; pass head= one of {allowed} to load the base model '
        'with that head instead')
  return head


def _to_device(path: str, value: np.ndarray) -> jax.Array:
  """``load``'s default ``place``: one tensor onto the default device."""
  del path
  return jnp.asarray(value)


def _unflatten(flat: dict[str, Any]) -> PyTree:
  """Nests ``{path: array}`` (already placed) into a tree."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def load(path: str | os.PathLike[str], *, head: str | None = None,
         num_labels: int | None = None, key: jax.Array | None = None,
         dtype: Any = jnp.float32,
         place: Callable[[str, np.ndarray], jax.Array] | None = None,
         **overrides: Any) -> LoadedModel:
  """Loads a local Hugging Face checkpoint directory.

  Args:
    path: a folder with ``config.json``, ``model.safetensors`` (or a
      sharded ``model.safetensors.index.json``) and, optionally, the
      tokenizer files.
    head: None for the checkpoint's own head (from ``architectures``);
      ``'base'`` for the bare model's hidden states; ``'causal_lm'``
      (decoders) or ``'classification'`` (encoders; a classifier the
      checkpoint lacks is initialized from ``key``).
    num_labels: width of an encoder's classifier; default from the
      checkpoint's classifier or ``id2label``.
    key: PRNG key for parameters the checkpoint lacks.
    dtype: the compute dtype (parameters keep their stored dtype).
    place: ``(path, host array) -> jax.Array``, applied to each tensor as
      soon as it is read (e.g. ``jax.device_put`` onto the tensor's
      sharding of a mesh); the host copy is dropped before the next tensor
      is read, so loading peaks near 1x the parameters' bytes
      (``experiments/bench/load_memory.py``). Default: ``jnp.asarray``
      (the default device). Paths are unscanned.
    **overrides: other config fields (``scan_layers=True``, ``remat``).

  Returns:
    A ``LoadedModel``.

  Raises:
    FileNotFoundError: no ``config.json`` or no safetensors weights.
    ValueError: an unknown ``model_type``, a configuration value that is
      not implemented (named with its value), a head that is not, or a
      tensor that is missing, misshaped or has no place in the model.
  """
  files = hf_files.CheckpointFiles(path)
  place = place or _to_device
  hf = files.config
  family = hf.get('model_type')
  if family is None:
    raise ValueError(f'{files.directory}/config.json has no model_type')
  archs = hf.get('architectures') or []
  is_moe = family in hf_moe.MOE_TYPES  # Mixtral, Qwen3-MoE: moe.MoeDecoder
  if (family in hf_decoders.DECODER_TYPES or is_moe
      or family in hf_decoders.REFUSED_TYPES):
    config = (hf_moe.moe_config if is_moe else hf_decoders.decoder_config)(
        hf, dtype=dtype, **overrides)
    default = archs[0] if archs else 'ForCausalLM'
    head = head or _checkpoint_head(default, DECODER_HEADS)
    if head not in DECODER_HEADS:
      raise ValueError(f'head={head!r}; a {family} decoder has heads '
                       f'{DECODER_HEADS}')
    prefix = 'model.' if 'model.embed_tokens.weight' in files else ''
    if head == 'base':  # No LM head: the module must not expect one.
      config = config.replace(tie_embeddings=True)
    read = hf_moe.read_moe if is_moe else hf_decoders.read_decoder
    flat = read(files, config.replace(scan_layers=False),
                prefix=prefix, head=head == 'causal_lm', place=place)
    params = _unflatten(flat)
    if config.scan_layers:
      params = llama_layout.scan_params(params)
    module = (moe.MoeDecoder if is_moe else llama.Llama)(config)
  else:
    extra = {} if num_labels is None else {'num_labels': num_labels}
    if num_labels is None and 'classifier.weight' in files:
      extra['num_labels'] = files.shape('classifier.weight')[0]
    if num_labels is None and 'classifier.out_proj.weight' in files:
      extra['num_labels'] = files.shape('classifier.out_proj.weight')[0]
    config = hf_encoders.encoder_config(hf, dtype=dtype,
                                        **(extra | overrides))
    own = archs[0] if archs else 'Model'
    chosen = head
    head = head or _checkpoint_head(own, ENCODER_HEADS)
    if head not in ENCODER_HEADS:
      raise ValueError(f'head={head!r}; a {family} encoder has heads '
                       f'{ENCODER_HEADS}')
    flat = hf_encoders.read_encoder(files, config, key=key,
                                    drop_head=chosen is not None,
                                    place=place)
    params = _unflatten(flat)
    module = bert.Bert(config)
  architecture = (archs[0] if archs and _head_of(archs[0]) == head
                  else f'{family} ({head})')
  logging.info('loaded %s (%s, head %s) from %s: %d parameters', family,
               architecture, head, files.directory,
               sum(x.size for x in jax.tree.leaves(params)))
  return LoadedModel(
      family=family, architecture=architecture, head=head, module=module,
      params=params, config=config, hf_config=hf,
      tokenizer=files.tokenizer(), eos_id=files.eos_id(),
      eos_ids=files.eos_ids(),
      chat_template=files.chat_template(),
      special_tokens=files.special_tokens())
