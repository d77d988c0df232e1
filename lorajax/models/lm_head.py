"""A decoder's LM head applied outside the model, and a chunked token loss.

``llama.Llama`` and ``moe.MoeDecoder`` return ``[B, T, V]`` float32 logits;
a training step that takes their log-softmax holds that array (and its
gradient) whole: at SmolLM2's 49,152-token vocabulary and 2,048 tokens,
400 MB each. ``token_nll(..., chunk=n)`` instead takes the final hidden
states (``hidden_only=True``) and runs the head and the cross entropy over
chunks of about ``n`` tokens under ``lax.scan``: no more than one chunk's
logits exist at a time, in the forward pass or the backward pass.

- With the head frozen (LoRA and the other adapter methods), each chunk's
  gradient with respect to its hidden states is formed in the forward pass,
  while the chunk's logits exist (a position's loss depends on its own
  hidden state only, so the backward pass scales it by the cotangent): no
  logits are kept or recomputed, and the step does the unchunked step's
  products. SmolLM2-135M-shaped LoRA q/v step, 8 × 256 tokens, ``chunk=512``
  against whole logits (2026-12-01, 2-core AMD EPYC, steps alternated): XLA
  temporaries 4,170 → 3,404 MB, median step 14.5 → 13.9 s.
- With the head trained (full fine-tuning, a trained tied embedding), each
  chunk's body runs under ``jax.checkpoint``: one more head product per
  token in the backward pass, where the chunk's logits are recomputed.

``logits`` is the head exactly as the two models compute it (tied
embedding ``h·Eᵀ`` or ``lm_head`` kernel, in the compute dtype, returned in
float32, Gemma2's final soft-cap), written with the same operations, so
the LoRA rewrite sees the same products: an adapter on ``lm_head/kernel``
works chunked as unchunked.

Example:

  >>> from lorajax.models import llama
  >>> cfg = llama.LlamaConfig.tiny()
  >>> model = llama.Llama(cfg)
  >>> tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
  >>> params = model.init(jax.random.key(0), tokens)['params']
  >>> hidden = model.apply({'params': params}, tokens, hidden_only=True)
  >>> whole = token_nll(cfg, params, hidden, tokens)
  >>> chunked = token_nll(cfg, params, hidden, tokens, chunk=4)
  >>> chunked.shape, bool(jnp.allclose(whole, chunked, atol=1e-6))
  ((2, 5), True)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from lorajax.models import decoder_parts

PyTree = Any


def head_weight(config: Any, params: PyTree) -> jax.Array:
  """The head's parameter: the embedding ``[V, d]`` when tied, else the
  ``lm_head`` kernel ``[d, V]``."""
  if config.tie_embeddings:
    return params['embed']['embedding']
  return params['lm_head']['kernel']


def logits(config: Any, weight: jax.Array, hidden: jax.Array) -> jax.Array:
  """``[..., d]`` final-normed hidden states to ``[..., V]`` float32 logits.

  Args:
    config: the model's ``LlamaConfig`` (or ``MoeConfig``).
    weight: ``head_weight(config, params)``.
    hidden: the model's ``hidden_only=True`` output (or a slice of it).
  """
  h = hidden.astype(config.dtype)
  w = weight.astype(config.dtype)
  if config.tie_embeddings:  # nn.Embed.attend
    out = jnp.dot(h, w.T)
  else:  # nn.Dense(use_bias=False)
    out = lax.dot_general(h, w, (((h.ndim - 1,), (0,)), ((), ())))
  out = out.astype(jnp.float32)
  cap = getattr(config, 'final_softcap', None)
  return out if cap is None else decoder_parts.softcap(out, cap)


def _nll(z: jax.Array, targets: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(z, axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


def chunk_positions(batch: int, length: int, chunk: int) -> int:
  """Sequence positions a chunk covers: ``chunk // batch`` (at least 1, at
  most ``length``), so that a chunk holds about ``chunk`` tokens."""
  return max(1, min(length, chunk // max(batch, 1)))


def token_nll(config: Any, params: PyTree, hidden: jax.Array,
              targets: jax.Array, *, chunk: int = 0) -> jax.Array:
  """``-log p(targets)`` of every position, ``[B, T]`` float32.

  Args:
    config: the decoder's ``LlamaConfig`` / ``MoeConfig``.
    params: its parameters (the head's are read: ``head_weight``).
    hidden: ``[B, T, d]``, the model's ``hidden_only=True`` output.
    targets: ``[B, T]`` int token ids (every one a valid id; a mask, not
      the id, says which positions count).
    chunk: 0 computes the ``[B, T, V]`` logits at once; ``n > 0`` scans
      over chunks of ``chunk_positions(B, T, n)`` positions of all rows
      (``T`` padded up to a multiple), each chunk's head and softmax
      recomputed in the backward pass.

  Returns:
    The per-position losses; the caller masks and reduces them.
  """
  weight = head_weight(config, params)
  if chunk <= 0:
    return _nll(logits(config, weight, hidden), targets)
  b, t, d = hidden.shape
  c = chunk_positions(b, t, chunk)
  n = -(-t // c)
  pad = n * c - t
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  y = jnp.pad(targets, ((0, 0), (0, pad)))
  # [n, B, c, ...]: the batch axis stays whole (and sharded, on a mesh).
  h = h.reshape(b, n, c, d).swapaxes(0, 1)
  y = y.reshape(b, n, c).swapaxes(0, 1)
  nll = _chunks(config, weight, h, y)
  return nll.swapaxes(0, 1).reshape(b, n * c)[:, :t]


def _chunk_scan(config: Any, weight: jax.Array, h: jax.Array,
                y: jax.Array) -> jax.Array:
  """``[n, B, c]`` losses of ``[n, B, c, d]`` chunks, one chunk's logits at
  a time, each chunk recomputed in its backward pass."""
  # prevent_cse keeps the recomputation apart from the forward pass even
  # when XLA removes a one-chunk loop (so its FLOPs stay countable).
  @functools.partial(jax.checkpoint, prevent_cse=True)
  def one(w, h_c, y_c):
    return _nll(logits(config, w, h_c), y_c)

  def body(carry, xs):
    return carry, one(weight, *xs)

  return lax.scan(body, None, (h, y))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunks(config, weight, h, y):
  return _chunk_scan(config, weight, h, y)


def _chunks_fwd(config, weight, h, y):
  """With the head frozen (LoRA), each chunk's gradient with respect to its
  hidden states is formed in the forward pass, while its logits exist: a
  position's loss depends on its own hidden state only, so the backward
  pass scales ``d nll[b, t] / d h[b, t]`` by the incoming cotangent. No
  logits are recomputed and none are kept. A trained head (full
  fine-tuning, a trained embedding) takes the recomputing path."""
  w, hv, yv = weight.value, h.value, y.value
  if weight.perturbed:
    return _chunk_scan(config, w, hv, yv), (w, hv, yv)

  def body(carry, xs):
    h_c, y_c = xs
    nll, vjp = jax.vjp(lambda x: _nll(logits(config, w, x), y_c), h_c)
    return carry, (nll, vjp(jnp.ones_like(nll))[0])

  nll, dh = lax.scan(body, None, (hv, yv))[1]
  return nll, (dh,)


def _chunks_bwd(config, res, g):
  if len(res) == 1:   # the head is frozen
    (dh,) = res
    return None, (g[..., None] * dh).astype(dh.dtype), None
  w, h, y = res
  _, vjp = jax.vjp(lambda w, h: _chunk_scan(config, w, h, y), w, h)
  dw, dh = vjp(g)
  return dw, dh, None


_chunks.defvjp(_chunks_fwd, _chunks_bwd, symbolic_zeros=True)
