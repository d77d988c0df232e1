"""Fused softmax attention on the CPU, forward and backward (XLA FFI).

XLA's CPU runtime runs a masked softmax attention as separate programs: a
batched product for the scores, several elementwise and reduction passes
over them (mask, max, exp, sum, divide) and a second batched product; the
backward pass as many again. Each pass walks the ``[B, heads, T, S]``
scores through memory. ``attention_cpu.cc`` does one (sequence, head) pair
at a time with its scores in the core's cache, as PyTorch's CPU flash
attention does: one register-blocked product kernel and vectorized softmax
passes over a row that is still in cache, spread over XLA's own intra-op
threads.

:func:`lorajax.models.ops.attention` (the shipped BERT family's, with or
without dropout: the keep mask XLA draws enters the kernel, so the bits
are the same) and ``lorajax.models.attention.attend_in_blocks`` (float32
decoders: grouped-query heads, causal) use it on the CPU, unless
``LORAJAX_CPU_ATTENTION=xla`` or ``save_attention_probs``. A user's own
softmax attention (``einsum``, ``jnp.where``, ``jax.nn.softmax``) gets it
through ``lorajax.lora`` and ``lorajax.fuse_attention``, which find the
chain in the traced function (``lorajax.runtime.attention_pattern``). It is built on
first use with the machine's C++ compiler (``$CXX``, else ``c++``,
``g++``, ``clang++``) and ``-O3 -march=native`` into ``~/.cache/lorajax``. Without a compiler, or if
the build fails, lorajax logs why once and uses XLA's attention: the same
values, only slower.

The values are those of ``lorajax.models.ops`` to float rounding (the
kernel sums in another order, and its ``exp`` is a polynomial of about one
ulp); ``tests/test_cpu_attention.py`` checks values and gradients against
the plain formulas, with masks, padding and sizes that are not multiples of
the kernel's tiles.

Measured on a 2-core AMD EPYC (AVX2; 2026-12-01, alone under ``chrt -f 1``,
``python -m experiments.bench.attention_groups --part fused``), forward and
backward, medians alternated in one process:

- one MiniLM layer (32 × 128 tokens, 12 heads of 32): XLA's attention
  102.1 ms, the kernel 45.6 ms (62 GFLOP/s of its products); temporaries
  57.6 → 0.4 MB; gradients within 6e-7;
- the MiniLM LoRA q/v step at 32 × 128: 1,620 → 1,343 ms, XLA temporaries
  439 → 369 MB;
- one SmolLM2-135M layer (9 heads, 3 KV heads of 64), causal: 8 × 256
  tokens 35.3 ms (XLA in 4 causal blocks, its best) → 27.0 ms; 16 × 128
  23.1 → 13.2; 4 × 512 96.5 → 55.2;
- the SmolLM2-135M-shaped LoRA q/v step at 8 × 256: 17.2 → 13.4 s,
  temporaries 4,170 → 3,002 MB.

Against PEFT (``python -m experiments.bench peft``), see
``experiments/results/bench_peft/README.md``.

XLA's cost analysis counts a custom call as -1 FLOP; :func:`step_flops`
(used by ``lorajax.cli.profile`` and the benchmarks) adds the kernel's
products back from the compiled HLO.

Example (the scores a causal kernel forms: on and below the diagonal):

  >>> visible_pairs(4, 4, None), visible_pairs(4, 4, 0)
  (16, 10)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lorajax.runtime import native

SWITCH = 'LORAJAX_CPU_ATTENTION'
_SOURCE = os.path.join(os.path.dirname(__file__), 'attention_cpu.cc')
_PREFIX = 'attention_cpu-'
_FWD = 'lorajax_attention_fwd'
_BWD = 'lorajax_attention_bwd'

_lock = threading.Lock()
_state: dict[str, object] = {}
_forced_off = threading.local()


def library(directory: str | None = None) -> str:
  """The kernel built as a shared library (once per source, flags and CPU);
  its path.

  Raises:
    RuntimeError: no C++ compiler, or the build failed (its message
      included).
  """
  compiler = native.find_compiler('CXX', ('c++', 'g++', 'clang++'))
  if compiler is None:
    raise RuntimeError(f'no C++ compiler to build {_SOURCE} '
                       f'(none of $CXX, c++, g++, clang++ on PATH)')
  flags = ['-O3', '-march=native', '-std=c++17', f'-I{jax.ffi.include_dir()}']
  return native.build(_SOURCE, _PREFIX, compiler, flags, (), directory,
                      per_cpu=True)


def why_not() -> str | None:
  """Why the fused kernel is not used in this process, or ``None`` if it
  is (building and registering it on first call)."""
  if os.environ.get(SWITCH, '').strip().lower() == 'xla':
    return f'{SWITCH}=xla'
  if getattr(_forced_off, 'depth', 0):
    return 'inside cpu_attention.off()'
  if jax.default_backend() != 'cpu':
    return f'the backend is {jax.default_backend()}'
  with _lock:
    if 'error' in _state:
      return _state['error']
    if 'lib' not in _state:
      try:
        lib = ctypes.cdll.LoadLibrary(library())
        for name, symbol in ((_FWD, lib.LorajaxAttentionFwd),
                             (_BWD, lib.LorajaxAttentionBwd)):
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol),
                                      platform='cpu')
        _state['lib'] = lib
      except (RuntimeError, OSError, AttributeError) as e:
        _state['error'] = f'the fused CPU attention is unavailable: {e}'
        logging.warning('%s; using XLA attention (same values, slower)',
                        _state['error'])
        return _state['error']
  return None


def available() -> bool:
  """Whether :func:`forward` and :func:`backward` can run here."""
  return why_not() is None


def _scale(q, scale):
  return float(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)


def _offset(causal_offset):
  if causal_offset is None:
    return np.int64(-1)
  if causal_offset < 0:
    raise ValueError(f'causal_offset must be >= 0, got {causal_offset}')
  return np.int64(causal_offset)


def _keep(keep, rate):
  if keep is None or not rate:
    return jnp.zeros((1,), bool), np.float32(0.0)
  if not 0.0 < rate < 1.0:
    raise ValueError(f'dropout rate must be in [0, 1), got {rate}')
  return keep.astype(bool), np.float32(rate)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
            scale: float | None = None, causal_offset: int | None = None,
            keep: jax.Array | None = None, rate: float = 0.0):
  """``(out [B, T, H, D], row max [B, H, T], row sum [B, H, T])``.

  Args:
    q: ``[B, T, H, D]`` queries.
    k: ``[B, S, Hkv, D]`` keys, ``Hkv`` dividing ``H`` (query head ``h``
      reads key/value head ``h // (H // Hkv)``).
    v: ``[B, S, Hkv, D]`` values.
    mask: ``[B, S]`` or ``[B, T, S]``, nonzero where a query sees a key.
    scale: the scores' factor; default ``1 / sqrt(D)``.
    causal_offset: ``n`` when ``mask`` never lets query ``t`` see a key
      after key ``n + t``; those scores are then never computed.
    keep: ``[B, H, T, S]`` bool, dropout's kept probabilities (with
      ``rate > 0``): ``out = dropout(p) · v`` with a kept probability
      divided by ``1 - rate``; the row max and sum are over every key.
    rate: the dropout rate; 0 (or ``keep=None``) is none.
  """
  b, t, h, _ = q.shape
  stats = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
  call = jax.ffi.ffi_call(
      _FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32), stats, stats),
      vmap_method='sequential')
  keep, rate = _keep(keep, rate)
  return call(q, k, v, mask.astype(jnp.float32), keep, scale=np.float32(
      _scale(q, scale)), causal_offset=_offset(causal_offset), rate=rate)


def backward(q, k, v, mask, row_max, row_sum, g, *, scale=None,
             causal_offset=None, keep=None, rate=0.0):
  """``(dq, dk, dv)`` of :func:`forward`'s output for its cotangent ``g``
  (the same ``scale``, ``causal_offset``, ``keep`` and ``rate``)."""
  call = jax.ffi.ffi_call(
      _BWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
             jax.ShapeDtypeStruct(k.shape, jnp.float32),
             jax.ShapeDtypeStruct(v.shape, jnp.float32)),
      vmap_method='sequential')
  keep, rate = _keep(keep, rate)
  return call(q, k, v, mask.astype(jnp.float32), keep, row_max, row_sum, g,
              scale=np.float32(_scale(q, scale)),
              causal_offset=_offset(causal_offset), rate=rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, mask, keep, scale, causal_offset, rate):
  return forward(q, k, v, mask, scale=scale, causal_offset=causal_offset,
                 keep=keep, rate=rate)[0]


def _attention_fwd(q, k, v, mask, keep, scale, causal_offset, rate):
  out, row_max, row_sum = forward(q, k, v, mask, scale=scale,
                                  causal_offset=causal_offset, keep=keep,
                                  rate=rate)
  return out, (q, k, v, mask, keep, row_max, row_sum)


def _attention_bwd(scale, causal_offset, rate, res, g):
  q, k, v, mask, keep, row_max, row_sum = res
  dq, dk, dv = backward(q, k, v, mask, row_max, row_sum, g, scale=scale,
                        causal_offset=causal_offset, keep=keep, rate=rate)
  return dq, dk, dv, jnp.zeros_like(mask), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              scale: float | None = None,
              causal_offset: int | None = None,
              keep: jax.Array | None = None,
              rate: float = 0.0) -> jax.Array:
  """:func:`forward`'s output, differentiable in ``q``, ``k`` and ``v``
  (the backward pass is :func:`backward`). Float32 in and out; check
  :func:`available` first."""
  if keep is None or not rate:
    keep, rate = None, 0.0
  return _attention(q, k, v, mask.astype(jnp.float32), keep,
                    None if scale is None else float(scale),
                    None if causal_offset is None else int(causal_offset),
                    float(rate))


@contextlib.contextmanager
def off():
  """Within this block (in this thread), programs traced use XLA's
  attention: e.g. to compile a twin of a step for comparison."""
  _forced_off.depth = getattr(_forced_off, 'depth', 0) + 1
  try:
    yield
  finally:
    _forced_off.depth -= 1


_TARGET = re.compile(
    r'custom_call_target="lorajax_attention_(fwd|bwd)", '
    r'operand_layout_constraints=\{f32\[(\d+),(\d+),(\d+),(\d+)\]'
    r'\{[\d,]*\}, f32\[\d+,(\d+),')
_OFFSET = re.compile(r'causal_offset = (-?\d+)')


def visible_pairs(t: int, s: int, causal_offset: int | None) -> int:
  """How many (query, key) scores the kernel uses: ``t * s``, or with a
  causal offset ``n`` the pairs with key ``<= n + query``."""
  if causal_offset is None or causal_offset < 0:
    return t * s
  return sum(min(s, causal_offset + i + 1) for i in range(t))


def kernel_flops(hlo_text: str) -> float:
  """The FLOPs of the fused attention calls in a compiled program's HLO
  text (``compiled.as_text()``), as XLA would count the same products
  (2 per multiply-add) over the scores the kernel uses
  (:func:`visible_pairs`): forward ``q·kᵀ`` and ``p·v``, backward ``q·kᵀ``
  again, ``pᵀ·g``, ``g·vᵀ``, ``ds·k`` and ``dsᵀ·q``; plus one per call,
  which XLA's cost analysis counts as -1 for a custom call. The softmax's
  elementwise work is not counted (XLA counts it for its own attention: a
  few FLOPs per score, against 2·D per score for each product), nor the
  causal tiles' rounding to 6 × 16 scores.
  """
  total = 0.0
  for line in hlo_text.splitlines():
    call = _TARGET.search(line)
    if not call:
      continue
    kind, b, t, h, d, s = call.groups()
    offset = _OFFSET.search(line)
    pairs = visible_pairs(int(t), int(s),
                          int(offset.group(1)) if offset else None)
    products = 2 if kind == 'fwd' else 5
    total += 2.0 * products * int(b) * int(h) * pairs * int(d) + 1
  return total


def step_flops(compiled) -> float | None:
  """XLA's FLOP count of ``compiled`` (``cost_analysis()['flops']``) with
  the fused attention calls' products added (:func:`kernel_flops`); None
  where XLA reports none."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per device.
    cost = cost[0] if cost else {}
  value = (cost or {}).get('flops')
  if value is None:
    return None
  return float(value) + kernel_flops(compiled.as_text())
