"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

The adapted kernel is split into a magnitude per output unit and a direction
that LoRA updates::

  W' = m ⊙ (W + s·a·b) / ||W + s·a·b||_c

where ``||·||_c`` is the L2 norm over the contracted (input) axes, one value
per output unit: in Flax's ``[in, out]`` orientation, the norm of every
column. ``m`` starts at ``||W||_c``, so with ``b = 0`` the adapted function
equals the base. As in the paper (section 4.3) and PEFT, the norm is treated
as a constant in the backward pass (``stop_gradient``): it follows the
current ``a`` and ``b`` but no gradient flows through it.

The product is computed without forming ``W'``::

  y = (m / ||W + s·a·b||_c) ⊙ (x·W + s·(x·a)·b)

Only the norm needs the dense ``W + s·a·b`` (an ``[in, out]`` temporary with
no gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import kernels
from lorajax import spec as spec_lib
from lorajax.methods import low_rank


column_norm = kernels.column_norm


def _expand_contract(v: jax.Array, layout: spec_lib.KernelLayout) -> jax.Array:
  """``[*stack, *free]`` -> broadcastable against the kernel."""
  return jnp.expand_dims(v, tuple(layout.stack + c for c in layout.contract))


@dataclasses.dataclass(frozen=True)
class Dora(spec_lib.Adapter):
  """Weight-decomposed LoRA: a magnitude ``m`` per output unit plus LoRA.

  Owns ``a`` [*in, r], ``b`` [r, *out] (as ``Lora``) and ``m`` [*out].

  Attributes:
    rank: r, the inner dimension of the update.
    alpha: scaling numerator; defaults to ``rank`` (s = 1).
    use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    dropout: dropout rate on the LoRA branch input (with an rng).
    init: initializer of ``a``, as in ``Lora``; ``b`` starts at zero.

  Example:

    >>> import jax, jax.numpy as jnp, lorajax
    >>> params = {'query': {'kernel': jnp.array([[3., 0.], [4., 1.]])}}
    >>> spec = lorajax.LoraSpec([(r'.*/kernel', Dora(rank=1))])
    >>> lorajax.init(spec, params, jax.random.key(0))['query']['kernel']['m']
    Array([5., 1.], dtype=float32)
  """
  rank: int = 8
  alpha: float | None = None
  use_rslora: bool = False
  dropout: float = 0.0
  init: str = 'kaiming'

  @property
  def lora(self) -> low_rank.Lora:
    """The LoRA part (validates the shared fields)."""
    return low_rank.Lora(rank=self.rank, alpha=self.alpha,
                         use_rslora=self.use_rslora, dropout=self.dropout,
                         init=self.init)

  def __post_init__(self):
    _ = self.lora  # Bad rank, dropout or init fail here, as for Lora.
    if self.init in low_rank.RESIDUAL_INITS:
      raise ValueError(f'Dora does not take init={self.init!r} (its '
                       'magnitude is the norm of the whole kernel); use Lora')

  @property
  def scale(self) -> float:
    return self.lora.scale

  def validate(self, path, kernel_shape, layout):
    self.lora.validate(path, kernel_shape, layout)

  def param_shapes(self, kernel_shape, layout):
    stack, _, fshape = layout.split_shape(kernel_shape)
    return {**self.lora.param_shapes(kernel_shape, layout),
            'm': (*stack, *fshape)}

  def init_params(self, key, kernel, layout):
    params = self.lora.init_params(key, kernel, layout)
    params['m'] = column_norm(kernels.kernel_value(kernel), layout)
    return params

  def _direction_norm(self, kernel: Any, a: jax.Array, b: jax.Array,
                      layout: spec_lib.KernelLayout) -> jax.Array:
    """``||W + s·a·b||_c`` as float32, without gradient."""
    w = kernels.kernel_value(kernel).astype(jnp.float32)
    v = w + kernels.delta_weight(a, b, layout, self.scale)
    return jax.lax.stop_gradient(column_norm(v, layout))

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del context
    ndim = len(self.kernel_aval(kernel).shape)
    contract = tuple(sorted(dims.w_contract))
    layout = spec_lib.KernelLayout(
        0, contract, tuple(i for i in range(ndim) if i not in contract))
    a, b = params['a'], params['b']
    norm = self._direction_norm(kernel, a, b, layout)
    factor = params['m'].astype(jnp.float32) / norm   # [*free]
    y = kernels.kernel_dot(x, kernel, dims)
    xin = kernels.dropout(x, self.dropout, rng)
    y = y + kernels.low_rank_dot(xin, a, b, dims, self.scale, y.dtype)
    if dims.kernel_is_lhs:  # y is [*free, *x_rest].
      factor = factor.reshape(factor.shape + (1,) * (y.ndim - factor.ndim))
    return y * factor.astype(y.dtype)

  def merge(self, kernel, params, layout):
    w = kernels.kernel_value(kernel)
    v = w.astype(jnp.float32) + kernels.delta_weight(
        params['a'], params['b'], layout, self.scale)
    factor = params['m'].astype(jnp.float32) / column_norm(v, layout)
    return (v * _expand_contract(factor, layout)).astype(w.dtype)

  def unmerge(self, kernel, params, layout):
    del kernel, params, layout
    raise ValueError(
        'a DoRA merge cannot be undone from the merged kernel alone (the '
        'norm ||W + s·a·b|| it divided by is not recoverable); keep the base '
        'parameters and merge again instead')

