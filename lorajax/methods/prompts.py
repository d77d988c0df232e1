"""Prompt tuning and prefix tuning for lorajax's BERT and Llama models.

These methods do not adapt a kernel: they feed learned tensors to the model,
which takes them as optional inputs (``prompt=`` and ``prefix=``, both
``None`` by default, leaving the model unchanged):

- prompt tuning (Lester et al., 2021): ``n`` learned input embeddings
  ``prompt`` [n, hidden] prepended to the token embeddings;
- prefix tuning (Li & Liang, 2021): learned keys and values
  ``prefix`` [layers, 2, n, kv_heads, head_dim] prepended to every layer's
  attention keys and values. During training it may be reparameterized by an
  MLP (``prefix_mlp``: an embedding [n, d] through ``tanh`` hidden layer);
  ``fold`` replaces the MLP by the prefix it computes.

The learned tensors live in a ``prompts`` tree, trained next to the adapters:

  trainable = {'adapters': adapters, 'params': train, 'prompts': prompts}
  out = fn(params, trainable['adapters'], ids, mask,
           **model_inputs(trainable['prompts']))

``prompts`` holds ``'prompt'`` or ``'prompt_encoder'`` (P-tuning,
``lorajax.methods.ptuning``) and/or one of ``'prefix'`` / ``'prefix_mlp'``.
Attention masks are extended inside the models so that every real token
sees the virtual ones.

Example:

  >>> import types, jax
  >>> config = types.SimpleNamespace(hidden_size=8, num_layers=2, num_heads=2,
  ...                                head_dim=4)                  # a BertConfig
  >>> prompts = for_bert(config, jax.random.key(0), n_prompt=3, n_prefix=2)
  >>> {k: v.shape for k, v in model_inputs(prompts).items()}  # model(**these)
  {'prompt': (3, 8), 'prefix': (2, 2, 2, 2, 4)}
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.methods import ptuning

PyTree = Any


def init_prompt(key: jax.Array, n_virtual: int, hidden_size: int, *,
                embedding: jax.Array | None = None,
                stddev: float = 0.02) -> jax.Array:
  """Initial prompt embeddings ``[n_virtual, hidden_size]`` float32.

  Args:
    key: PRNG key.
    n_virtual: number of virtual tokens.
    hidden_size: model width.
    embedding: the model's word embedding table ``[vocab, hidden]``; when
      given, the prompt starts as the embeddings of random vocabulary tokens
      (which trains better than noise, Lester et al.).
    stddev: normal stddev when ``embedding`` is None.
  """
  _check_positive('n_virtual', n_virtual)
  if embedding is not None:
    if embedding.shape[-1] != hidden_size:
      raise ValueError(f'embedding table has width {embedding.shape[-1]}, '
                       f'expected hidden_size={hidden_size}')
    ids = jax.random.randint(key, (n_virtual,), 0, embedding.shape[0])
    return jnp.asarray(embedding, jnp.float32)[ids]
  return stddev * jax.random.normal(key, (n_virtual, hidden_size),
                                    jnp.float32)


def init_prefix(key: jax.Array, n_prefix: int, num_layers: int,
                num_kv_heads: int, head_dim: int, *,
                mlp_hidden: int | None = None, embed_dim: int | None = None,
                stddev: float = 0.02) -> PyTree:
  """Initial prefix keys and values, direct or MLP-reparameterized.

  Args:
    key: PRNG key.
    n_prefix: virtual tokens per layer.
    num_layers, num_kv_heads, head_dim: the attention geometry.
    mlp_hidden: if set, return ``{'prefix_mlp': ...}``: an embedding
      ``[n, embed_dim]`` mapped by ``Linear(mlp_hidden) -> tanh -> Linear``
      to the prefix (PEFT's ``prefix_projection``); else ``{'prefix':
      [L, 2, n, kv_heads, head_dim]}``.
    embed_dim: width of the MLP's input embedding; default
      ``num_kv_heads * head_dim``.
    stddev: normal stddev of the direct prefix and of the embedding.

  Returns:
    A ``prompts`` subtree.
  """
  _check_positive('n_prefix', n_prefix)
  shape = (num_layers, 2, num_kv_heads, head_dim)
  if mlp_hidden is None:
    return {'prefix': stddev * jax.random.normal(
        key, (num_layers, 2, n_prefix, num_kv_heads, head_dim), jnp.float32)}
  _check_positive('mlp_hidden', mlp_hidden)
  d = embed_dim or num_kv_heads * head_dim
  k_emb, k_hid, k_out = jax.random.split(key, 3)

  def lecun(k, shape_in, shape_out):
    return (jax.random.normal(k, (shape_in, *shape_out), jnp.float32)
            / math.sqrt(shape_in))

  return {'prefix_mlp': {
      'embedding': stddev * jax.random.normal(k_emb, (n_prefix, d),
                                              jnp.float32),
      'hidden': {'kernel': lecun(k_hid, d, (mlp_hidden,)),
                 'bias': jnp.zeros((mlp_hidden,), jnp.float32)},
      'out': {'kernel': lecun(k_out, mlp_hidden, shape),
              'bias': jnp.zeros(shape, jnp.float32)}}}


def prefix_tensor(prompts: PyTree) -> jax.Array | None:
  """The ``[L, 2, n, kv_heads, head_dim]`` prefix of a ``prompts`` tree
  (computed through the MLP when reparameterized), or None."""
  if 'prefix' in prompts:
    return prompts['prefix']
  if 'prefix_mlp' not in prompts:
    return None
  mlp = prompts['prefix_mlp']
  h = jnp.tanh(mlp['embedding'] @ mlp['hidden']['kernel']
               + mlp['hidden']['bias'])                  # [n, M]
  out = jnp.tensordot(h, mlp['out']['kernel'], 1) + mlp['out']['bias']
  return jnp.moveaxis(out, 0, 2)                         # [L, 2, n, kv, hd]


def fold(prompts: PyTree) -> PyTree:
  """Replaces an MLP-reparameterized prefix by the prefix it computes, and
  a P-tuning ``prompt_encoder`` by its prompt (``lorajax.methods.ptuning``)."""
  out = {k: v for k, v in prompts.items()
         if k not in ('prefix_mlp', 'prompt_encoder')}
  if 'prefix_mlp' in prompts:
    out['prefix'] = prefix_tensor(prompts)
  if 'prompt_encoder' in prompts:
    out['prompt'] = ptuning.encode(prompts['prompt_encoder'])
  return out


def model_inputs(prompts: PyTree | None) -> dict[str, jax.Array]:
  """Keyword arguments for the model call: ``prompt=`` and/or ``prefix=``.

  Raises:
    ValueError: unknown keys in ``prompts``.
  """
  if not prompts:
    return {}
  unknown = set(prompts) - {'prompt', 'prompt_encoder', 'prefix',
                             'prefix_mlp'}
  if (unknown or ('prefix' in prompts and 'prefix_mlp' in prompts)
      or ('prompt' in prompts and 'prompt_encoder' in prompts)):
    raise ValueError(
        f'prompts has keys {sorted(prompts)}; expected one of \'prompt\', '
        f"'prompt_encoder' and/or one of 'prefix', 'prefix_mlp'")
  out = {}
  if 'prompt' in prompts:
    out['prompt'] = prompts['prompt']
  if 'prompt_encoder' in prompts:   # P-tuning
    out['prompt'] = ptuning.encode(prompts['prompt_encoder'])
  prefix = prefix_tensor(prompts)
  if prefix is not None:
    out['prefix'] = prefix
  return out


def for_bert(config: Any, key: jax.Array, *, n_prompt: int = 0,
             n_prefix: int = 0, mlp_hidden: int | None = None,
             embedding: jax.Array | None = None) -> PyTree:
  """A ``prompts`` tree for ``lorajax.models.bert.Bert(config)``.

  Args:
    config: a ``BertConfig``.
    key: PRNG key.
    n_prompt: virtual input tokens (0: no prompt tuning).
    n_prefix: prefix length per layer (0: no prefix tuning).
    mlp_hidden: reparameterize the prefix by an MLP of this width.
    embedding: word embedding table to initialize the prompt from.
  """
  return _for_model(key, n_prompt, n_prefix, config.hidden_size,
                    config.num_layers, config.num_heads, config.head_dim,
                    mlp_hidden, embedding, config.hidden_size)


def for_llama(config: Any, key: jax.Array, *, n_prompt: int = 0,
              n_prefix: int = 0, mlp_hidden: int | None = None,
              embedding: jax.Array | None = None) -> PyTree:
  """A ``prompts`` tree for ``lorajax.models.llama.Llama(config)`` (see
  ``for_bert``; prefixes are per key/value head)."""
  return _for_model(key, n_prompt, n_prefix, config.hidden_size,
                    config.num_layers, config.num_kv_heads, config.head_dim,
                    mlp_hidden, embedding, config.hidden_size)


def _for_model(key, n_prompt, n_prefix, hidden, layers, kv_heads, head_dim,
               mlp_hidden, embedding, embed_dim) -> PyTree:
  if not n_prompt and not n_prefix:
    raise ValueError('give n_prompt > 0 and/or n_prefix > 0')
  k_prompt, k_prefix = jax.random.split(key)
  out = {}
  if n_prompt:
    out['prompt'] = init_prompt(k_prompt, n_prompt, hidden,
                                embedding=embedding)
  if n_prefix:
    out.update(init_prefix(k_prefix, n_prefix, layers, kv_heads, head_dim,
                           mlp_hidden=mlp_hidden, embed_dim=embed_dim))
  return out


def _check_positive(name: str, value: Any) -> None:
  if not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
