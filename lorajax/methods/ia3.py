"""IA3: learned rescaling of activations (Liu et al., 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning").

One vector ``l`` per targeted kernel, initialised to ones (the adapted
function equals the base at step 0):

- on an output (``Ia3()``, keys and values): ``y = (x·W) ⊙ l``, ``l`` over
  the kernel's output axes;
- on an input (``Ia3(feedforward=True)``, the feed-forward down
  projection): ``y = (x ⊙ l)·W``, ``l`` over the kernel's input axes.

Both are linear in ``W`` and merge exactly: ``W ⊙ l`` along the output or
input axes. PEFT stores ``l`` as ``ia3_l`` of shape ``[out, 1]`` or ``[1,
in]``.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'v': jnp.ones((3, 2)), 'down': jnp.ones((2, 3))}
  >>> spec = lorajax.LoraSpec([('v', Ia3()), ('down', Ia3(feedforward=True))])
  >>> ad = lorajax.init(spec, params, jax.random.key(0))
  >>> ad['v']['l'].shape, ad['down']['l'].shape
  ((2,), (2,))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lorajax import kernels
from lorajax import spec as spec_lib


def _on_x(l: jax.Array, x_ndim: int, dims: spec_lib.DotDims) -> jax.Array:
  """``l`` over the kernel's contracted axes, broadcastable against ``x``."""
  order = sorted(dims.w_contract)
  # x axis -> axis of l (l's axes follow the kernel's contract order).
  src = {xc: order.index(wc) for xc, wc in zip(dims.x_contract,
                                               dims.w_contract)}
  x_axes = sorted(src)
  l = jnp.transpose(l, tuple(src[a] for a in x_axes))
  shape = [1] * x_ndim
  for a, size in zip(x_axes, l.shape):
    shape[a] = size
  return l.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Ia3(spec_lib.Adapter):
  """IA3 on one kernel: a learned scale of its output or its input.

  Attributes:
    feedforward: scale the kernel's input (PEFT's ``feedforward_modules``)
      instead of its output.
  """
  feedforward: bool = False

  def param_shapes(self, kernel_shape, layout):
    lead, cshape, fshape = layout.split_shape(kernel_shape)
    return {'l': (*lead, *(cshape if self.feedforward else fshape))}

  def init_params(self, key, kernel, layout):
    del key
    shapes = self.param_shapes(self.kernel_aval(kernel).shape, layout)
    return {'l': jnp.ones(shapes['l'], jnp.float32)}

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del rng, context
    l = params['l']
    if self.feedforward:
      xs = x * _on_x(l, x.ndim, dims).astype(x.dtype)
      return kernels.kernel_dot(xs, kernel, dims)
    y = kernels.kernel_dot(x, kernel, dims)
    if dims.kernel_is_lhs:  # y is [*free, *x_rest].
      l = l.reshape(l.shape + (1,) * (y.ndim - l.ndim))
    return y * l.astype(y.dtype)

  def _factor(self, params, layout) -> jax.Array:
    """``l`` broadcastable against the (stacked) kernel."""
    if layout.batch:
      raise ValueError('Ia3 on kernels with batch axes is not implemented')
    s = layout.stack
    other = layout.free if self.feedforward else layout.contract
    return jnp.expand_dims(params['l'].astype(jnp.float32),
                           tuple(s + i for i in other))

  def merge(self, kernel, params, layout):
    w = kernels.kernel_value(kernel)
    return (w.astype(jnp.float32) * self._factor(params, layout)).astype(
        w.dtype)

  def unmerge(self, kernel, params, layout):
    factor = self._factor(params, layout)
    if bool(jnp.any(factor == 0)):
      raise ValueError('an IA3 scale with a zero entry cannot be unmerged '
                       '(the merged kernel lost that row or column)')
    return (kernel.astype(jnp.float32) / factor).astype(kernel.dtype)
