"""LoftQ: a quantized base and LoRA factors chosen together.

QLoRA quantizes ``W`` on its own and starts the adapter at zero, so the
adapted model starts off by the whole quantization error ``W - deq(Q)``.
LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for
Large Language Models") alternates, ``num_iter`` times::

  Q_t = quant(W - s·a_{t-1}·b_{t-1})          (a₀·b₀ = 0)
  s·a_t·b_t = the best rank-r approximation of W - deq(Q_t)

(the rank-r SVD, ``√S`` split between ``a`` and ``b``), so that
``deq(Q) + s·a·b`` is closer to ``W`` than ``deq(quant(W))``. This is the
loop of PEFT 0.21.2's ``loftq_init`` with lorajax's own quantizers (NF4 or
int8, with the provider's block size and double quantization) in place of
bitsandbytes. One difference: PEFT stores the SVD factors as they are, which
is the approximation only when ``lora_alpha = r`` (scale 1); lorajax divides
them by ``√s`` so that ``s·a·b`` is the approximation for every alpha.

``QLora(init='loftq', loftq_iter=T)`` runs it: ``lorajax.init`` on the
*float* params gives the factors, ``lorajax.quantize_params`` the quantized
kernels, both by the same deterministic loop (with ``T = 1`` the base is
plain ``quant(W)``; the loop's last SVD is skipped when quantizing).

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> w = jax.random.normal(jax.random.key(0), (64, 32))
  >>> params = {'dense': {'kernel': w}}
  >>> spec = lorajax.LoraSpec([(r'.*', lorajax.QLora(4, init='loftq'))])
  >>> adapters = lorajax.init(spec, params, jax.random.key(1))  # float W
  >>> qparams = lorajax.quantize_params(params, spec)
  >>> err = lambda p, ad: float(jnp.linalg.norm(
  ...     w - lorajax.merge(p, ad, spec)['dense']['kernel']))
  >>> zero = jax.tree.map(jnp.zeros_like, adapters)        # plain QLoRA
  >>> err(qparams, adapters) < err(qparams, zero)
  True
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import kernels
from lorajax import spec as spec_lib
from lorajax.methods import quant


@functools.partial(jax.jit, static_argnames=(
    'layout', 'method', 'block_size', 'double_quant', 'rank', 'scale',
    'num_iter', 'factors'))
def loftq(w: jax.Array, layout: spec_lib.KernelLayout, *, method: str,
          block_size: int = 64, double_quant: bool = True, rank: int,
          scale: float, num_iter: int, factors: bool = True
          ) -> tuple[quant.QuantizedKernel, dict[str, jax.Array] | None]:
  """LoftQ's alternating loop for one (stacked) kernel, jitted.

  Args:
    w: the float kernel, laid out as ``layout`` says.
    layout: how the function contracts it (``a`` spans the contracted axes).
    method, block_size, double_quant: the quantizer (``quant.quantize``).
    rank: r of the factors.
    scale: the adapter's ``s`` (alpha / r, or alpha / √r).
    num_iter: T >= 1 alternations.
    factors: False skips the last SVD (only ``Q_T`` is wanted).

  Returns:
    ``(Q_T, {'a': [*lead, *contract, r], 'b': [*lead, r, *free]})``, the
    factors float32 with ``s·a·b`` the rank-r SVD part of ``W - deq(Q_T)``;
    ``Q_T`` records ``w``'s dtype. The factors are None if not ``factors``.
  """
  if num_iter < 1:
    raise ValueError(f'LoftQ needs num_iter >= 1, got {num_iter}')
  w32 = jnp.asarray(w, jnp.float32)
  target, start = w32, None
  for t in range(num_iter):
    node = quant.quantize(target, method, layout, block_size=block_size,
                          double_quant=double_quant)
    last = t + 1 == num_iter
    if last and not factors:
      break
    start = kernels.principal_factors(w32 - node.dequantize(jnp.float32),
                                      layout, rank, scale)
    if not last:
      target = w32 - kernels.delta_weight(start['a'], start['b'], layout,
                                          scale)
  return node.replace(dtype=jnp.dtype(w.dtype)), start


def check_float(kernel: Any, path_or_who: str) -> None:
  """Raises if ``kernel`` is already quantized: LoftQ needs ``W`` itself."""
  if isinstance(kernel, spec_lib.FrozenKernel):
    raise ValueError(
        f"{path_or_who}: QLora(init='loftq') makes its factors from the float "
        f'kernel, not from a quantized {type(kernel).__name__}; call '
        'lorajax.init(spec, params, key) on the float params (then '
        'lorajax.quantize_params(params, spec) for the base)')


def uses_loftq(spec: spec_lib.LoraSpec) -> bool:
  """True if a rule of ``spec`` has a ``QLora(init='loftq')`` provider."""
  return any(getattr(action, 'init', None) == 'loftq'
             and hasattr(action, 'quantize') for _, action in spec.rules)


__all__ = ['check_float', 'loftq', 'uses_loftq']
