"""Causal language-model helpers: next-token loss, sampling and generation.

These work with any decoder whose apply function follows the ``Llama``
calling convention::

  apply_fn(params, tokens, *, positions=None, attention_mask=None,
           cache=None, cache_len=None)
  -> logits [B, T, V]                  (no cache arguments)
  -> (logits, new_cache)               (cache or cache_len given)

``apply_fn`` may be any callable: ``model.apply`` or a LoRA-wrapped apply with
its adapters bound, e.g. ``lambda p, *a, **k: wrapped(p, adapters, *a, **k)``.

Example:

  >>> new = generate(model.apply, params, prompt, 8)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ApplyFn = Callable[..., Any]


def lm_loss(logits: jax.Array, tokens: jax.Array,
            mask: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross entropy.

  Position ``t`` predicts token ``t + 1``; a prediction counts when both its
  input and its target are real tokens.

  Args:
    logits: ``[B, T, V]``.
    tokens: ``[B, T]`` int.
    mask: ``[B, T]``, 1 for real tokens; default all ones.

  Returns:
    A float32 scalar: the mean over counted predictions (0 if there are none).
  """
  if mask is None:
    mask = jnp.ones(tokens.shape, jnp.float32)
  mask = mask.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  weights = mask[:, :-1] * mask[:, 1:]
  return -jnp.sum(target_logp * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sample_token(logits: jax.Array, rng: jax.Array | None, *,
                 temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
  """Picks one token per row.

  Args:
    logits: ``[B, V]``.
    rng: a PRNG key; unused when ``temperature == 0``.
    temperature: 0 for greedy (argmax), else the softmax temperature.
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose
      probability reaches ``top_p`` (1.0 keeps all).

  Returns:
    ``[B]`` int32 token ids.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    # Keep a token if the mass before it is still below top_p.
    keep_sorted = (jnp.cumsum(probs, -1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('apply_fn', 'cache_len'))
def _prefill(apply_fn, params, tokens, mask, cache, *, cache_len):
  if cache is None:
    logits, cache = apply_fn(params, tokens, attention_mask=mask,
                             cache_len=cache_len)
  else:
    logits, cache = apply_fn(params, tokens, attention_mask=mask, cache=cache)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=('apply_fn',))
def _decode_step(apply_fn, params, cache, token):
  ones = jnp.ones(token.shape, bool)
  logits, cache = apply_fn(params, token[:, None], attention_mask=ones[:, None],
                           cache=cache)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=('apply_fn',))
def _full_step(apply_fn, params, buffer, mask, last):
  logits = apply_fn(params, buffer, attention_mask=mask)
  return jnp.take_along_axis(logits, last[None, None, None], 1)[:, 0]


_sample = jax.jit(sample_token, static_argnames=('temperature', 'top_p'))


def generate(apply_fn: ApplyFn, params: PyTree, prompt_tokens: jax.Array,
             max_new_tokens: int, *, prompt_mask: jax.Array | None = None,
             use_cache: bool = True, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None,
             eos_id: int | Sequence[int] | None = None,
             cache: PyTree | None = None,
             context: int | None = None) -> jax.Array:
  """Generates ``max_new_tokens`` tokens after each prompt.

  With ``use_cache`` the prompt is run once into a ``KVCache`` of
  ``P + max_new_tokens`` slots and each new token costs one jitted one-token
  step; without it every step re-runs the whole (fixed-size) buffer, which is
  slower and only useful as a check of the cache.

  Args:
    apply_fn: the model's apply function (see the module docstring). It is a
      static argument of the jitted steps: pass the same object across calls
      to reuse compilations.
    params: passed through to ``apply_fn``.
    prompt_tokens: ``[B, P]`` int; pad batched prompts on the left.
    max_new_tokens: number of tokens to generate.
    prompt_mask: ``[B, P]``, 1 for real prompt tokens; default all ones.
    use_cache: use the KV cache.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_p: nucleus sampling threshold.
    rng: PRNG key, required when ``temperature > 0``.
    eos_id: an end-of-sequence id, or several (Llama 3 and Gemma
      checkpoints list more than one): a row that produced one keeps
      producing it.
    cache: an empty cache with at least ``P + max_new_tokens`` slots (e.g.
      ``llama.init_cache``). By default ``apply_fn`` makes one from the static
      ``cache_len=P + max_new_tokens``; pass one for an ``apply_fn`` that only
      takes array arguments.
    context: the model's context length (``LlamaConfig.max_position``); a
      prompt that leaves no room for ``max_new_tokens`` in it is refused
      before anything is allocated. None: not checked.

  Returns:
    ``[B, max_new_tokens]`` int32 generated tokens.

  Raises:
    ValueError: an empty prompt, ``temperature > 0`` without ``rng``, or
      ``P + max_new_tokens`` beyond ``context``.
  """
  b, p = np.shape(prompt_tokens)
  if context is not None and p + max_new_tokens > context:
    raise ValueError(
        f'the prompt has {p} tokens and {max_new_tokens} new tokens were '
        f'asked for: {p + max_new_tokens} tokens exceed the model\'s context '
        f'of {context} tokens (max_position); shorten the prompt to at most '
        f'{max(context - max_new_tokens, 0)} tokens or ask for fewer new '
        'tokens')
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if p == 0:
    raise ValueError('prompt_tokens must hold at least one token, got shape '
                     f'{prompt_tokens.shape}')
  if temperature > 0.0 and rng is None:
    raise ValueError(f'temperature={temperature} needs an rng key')
  if prompt_mask is None:
    prompt_mask = jnp.ones((b, p), bool)
  prompt_mask = jnp.asarray(prompt_mask, bool)
  total = p + max_new_tokens
  if use_cache:
    logits, cache = _prefill(apply_fn, params, prompt_tokens, prompt_mask,
                             cache, cache_len=total)
  else:
    buffer = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_tokens)
    mask = jnp.zeros((b, total), bool).at[:, :p].set(prompt_mask)
    logits = _full_step(apply_fn, params, buffer, mask, jnp.int32(p - 1))
  done = jnp.zeros((b,), bool)
  eos_ids = (None if eos_id is None else
             jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32)))
  last = jnp.zeros((b,), jnp.int32)
  out = []
  for step in range(max_new_tokens):
    key = None
    if rng is not None:
      rng, key = jax.random.split(rng)
    token = _sample(logits, key, temperature=temperature, top_p=top_p)
    if eos_ids is not None:
      token = jnp.where(done, last, token)
      last = token
      done = done | jnp.isin(token, eos_ids)
    out.append(token)
    if step + 1 == max_new_tokens:
      break
    if use_cache:
      logits, cache = _decode_step(apply_fn, params, cache, token)
    else:
      buffer = buffer.at[:, p + step].set(token)
      mask = mask.at[:, p + step].set(True)
      logits = _full_step(apply_fn, params, buffer, mask, jnp.int32(p + step))
  return jnp.stack(out, axis=1)
