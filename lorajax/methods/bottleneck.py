"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020).

A provider on an output projection kernel: after the product ``y = x·W`` it
adds a small residual MLP,

  y + up(act(down(y) + c)) + e

with ``down`` [out, size], ``up`` [size, out] and biases ``c`` [size],
``e`` [out]. ``up`` and ``e`` start at zero, so the adapted model equals the
base at initialization.

Where the bias goes. The rewrite sees the kernel's ``dot_general``, so the
adapter reads ``x·W`` before the layer adds its bias ``β``; Houlsby reads
``x·W + β``. With the down-projection bias the two are the same family of
functions: ``down(x·W + β) + c_H = down(x·W) + (c_H + β·down)``, and the
residual ``β`` is added either way. Only the parameterization of the down
bias differs (``c = c_H + β·down``), which changes the optimization path
slightly, not what can be represented.

``houlsby_rules`` (after the attention output and the FFN output projection
of every layer) and ``pfeiffer_rules`` (after the FFN output only) return the
rules for lorajax's BERT and Llama parameter paths.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import spec as spec_lib
from lorajax import kernels

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': jax.nn.relu,
    'gelu': lambda v: jax.nn.gelu(v, approximate=False),
    'gelu_tanh': lambda v: jax.nn.gelu(v, approximate=True),
    'silu': jax.nn.silu,
    'tanh': jnp.tanh,
}

# (attention output, FFN output) kernel patterns per model.
_PATHS = {
    'bert': (r'(.*/)?encoder/layer_\d+/attention/output/kernel',
             r'(.*/)?encoder/layer_\d+/output/kernel'),
    'llama': (r'(.*/)?layers(_\d+)?/attn/o_proj/kernel',
              r'(.*/)?layers(_\d+)?/mlp/down_proj/kernel'),
}


@dataclasses.dataclass(frozen=True)
class Bottleneck(spec_lib.Adapter):
  """``y + up(act(down(y) + c)) + e`` after an output projection ``y = x·W``.

  Owns ``down`` [*out, size], ``down_bias`` [size], ``up`` [size, *out] and
  ``up_bias`` [*out] (with a leading layer axis for scanned kernels).

  Attributes:
    size: the bottleneck width.
    act: activation, one of ``ACTIVATIONS``.
  """
  size: int = 64
  act: str = 'relu'

  def __post_init__(self):
    if not isinstance(self.size, (int, np.integer)) or self.size < 1:
      raise ValueError(f'Bottleneck size must be a positive integer, got '
                       f'{self.size!r}')
    if self.act not in ACTIVATIONS:
      raise ValueError(f'Bottleneck act {self.act!r}; expected one of '
                       f'{sorted(ACTIVATIONS)}')

  def param_shapes(self, kernel_shape, layout):
    stack, _, fshape = layout.split_shape(kernel_shape)
    return {'down': (*stack, *fshape, self.size),
            'down_bias': (*stack, self.size),
            'up': (*stack, self.size, *fshape),
            'up_bias': (*stack, *fshape)}

  def init_params(self, key, kernel, layout):
    shapes = self.param_shapes(self.kernel_aval(kernel).shape, layout)
    _, _, fshape = layout.split_shape(self.kernel_aval(kernel).shape)
    bound = 1.0 / math.sqrt(math.prod(fshape))
    return {'down': jax.random.uniform(key, shapes['down'], jnp.float32,
                                       -bound, bound),
            'down_bias': jnp.zeros(shapes['down_bias'], jnp.float32),
            'up': jnp.zeros(shapes['up'], jnp.float32),
            'up_bias': jnp.zeros(shapes['up_bias'], jnp.float32)}

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del rng, context
    y = kernels.kernel_dot(x, kernel, dims)
    nf = np.ndim(params['up_bias'])
    if dims.kernel_is_lhs:  # y is [*free, *x_rest]: adapt with free last.
      y = jnp.moveaxis(y, tuple(range(nf)), tuple(range(y.ndim - nf, y.ndim)))
    out_axes = tuple(range(y.ndim - nf, y.ndim))
    h = jnp.tensordot(y, params['down'].astype(y.dtype),
                      (out_axes, tuple(range(nf))))
    h = ACTIVATIONS[self.act](h + params['down_bias'].astype(y.dtype))
    y = (y + jnp.tensordot(h, params['up'].astype(y.dtype), 1)
         + params['up_bias'].astype(y.dtype))
    if dims.kernel_is_lhs:
      y = jnp.moveaxis(y, out_axes, tuple(range(nf)))
    return y

  def merge(self, kernel, params, layout):
    del kernel, params, layout
    raise ValueError(
        'a bottleneck adapter is not linear in the kernel and cannot be '
        'merged into it; serve the model with lorajax.lora(apply_fn, spec)')


def houlsby_rules(size: int = 64, act: str = 'relu', *,
                  model: str = 'bert') -> list[tuple[str, Bottleneck]]:
  """Adapters after the attention output and the FFN output of every layer.

  Args:
    size: bottleneck width.
    act: activation name.
    model: ``'bert'`` (``encoder/layer_i/attention/output``,
      ``encoder/layer_i/output``) or ``'llama'`` (``attn/o_proj``,
      ``mlp/down_proj``, per layer or scanned).

  Returns:
    Rules to put before the spec's ``'train'``/``'freeze'`` rules.

  Example:

    >>> import lorajax
    >>> spec = lorajax.LoraSpec(houlsby_rules(64) + [
    ...     (r'.*classifier/.*', 'train'), (r'.*', 'freeze')])
    >>> [action.size for _, action in spec.rules[:2]]
    [64, 64]
  """
  attn, ffn = _model_paths(model)
  provider = Bottleneck(size=size, act=act)
  return [(attn, provider), (ffn, provider)]


def pfeiffer_rules(size: int = 64, act: str = 'relu', *,
                   model: str = 'bert') -> list[tuple[str, Bottleneck]]:
  """An adapter after the FFN output of every layer only (see
  ``houlsby_rules`` for the arguments)."""
  _, ffn = _model_paths(model)
  return [(ffn, Bottleneck(size=size, act=act))]


def _model_paths(model: str) -> tuple[str, str]:
  if model not in _PATHS:
    raise ValueError(f'model {model!r}; expected one of {sorted(_PATHS)}')
  return _PATHS[model]

