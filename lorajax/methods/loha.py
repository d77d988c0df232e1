"""LoHa: low-rank Hadamard product adaptation (Hyeon-Woo et al., 2022,
"FedPara"; LyCORIS).

The update is the element-wise product of two rank-r matrices, so its rank
can reach r² with the parameters of two LoRAs::

  ΔW = s · (a₁·b₁) ⊙ (a₂·b₂),   s = alpha / r

with ``a`` [in, r] and ``b`` [r, out] in the kernel's own contracted and
free axes, as ``Lora``. ``b₂`` starts at zero, so the adapted function
equals the base at step 0. ΔW is not low-rank: the product is
``x·(W + ΔW)``, one dense matmul per call (as PEFT computes it), and the
kernel still gets no gradient. PEFT stores ``hada_w1_a`` = ``b₁ᵀ``,
``hada_w1_b`` = ``a₁ᵀ`` (and the same for 2) for a Flax ``[in, out]``
kernel.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'w': jnp.ones((4, 3))}
  >>> spec = lorajax.LoraSpec([('w', LoHa(rank=2))])
  >>> ad = lorajax.init(spec, params, jax.random.key(0))
  >>> sorted((k, v.shape) for k, v in ad['w'].items())
  [('a1', (4, 2)), ('a2', (4, 2)), ('b1', (2, 3)), ('b2', (2, 3))]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import kernels
from lorajax import spec as spec_lib


@dataclasses.dataclass(frozen=True)
class LoHa(spec_lib.Adapter):
  """LoHa on one kernel: ``ΔW = s·(a₁·b₁) ⊙ (a₂·b₂)``.

  Attributes:
    rank: r of each of the two factor pairs.
    alpha: scaling numerator; defaults to ``rank`` (s = 1).
  """
  rank: int = 8
  alpha: float | None = None

  def __post_init__(self):
    if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f'LoHa rank must be a positive integer, got '
                       f'{self.rank!r}')

  @property
  def scale(self) -> float:
    return float(self.rank if self.alpha is None else self.alpha) / self.rank

  def param_shapes(self, kernel_shape, layout):
    lead, cshape, fshape = layout.split_shape(kernel_shape)
    a, b = (*lead, *cshape, self.rank), (*lead, self.rank, *fshape)
    return {'a1': a, 'b1': b, 'a2': a, 'b2': b}

  def init_params(self, key, kernel, layout):
    shapes = self.param_shapes(self.kernel_aval(kernel).shape, layout)
    _, cshape, _ = layout.split_shape(self.kernel_aval(kernel).shape)
    bound = 1.0 / math.sqrt(kernels.prod(cshape))
    k1, k2, k3 = jax.random.split(key, 3)
    uniform = lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound,  # pylint: disable=unnecessary-lambda-assignment
                                              bound)
    return {'a1': uniform(k1, shapes['a1']), 'b1': uniform(k2, shapes['b1']),
            'a2': uniform(k3, shapes['a2']),
            'b2': jnp.zeros(shapes['b2'], jnp.float32)}

  def delta(self, params, layout: spec_lib.KernelLayout) -> jax.Array:
    """``ΔW`` (float32) laid out like the (stacked) kernel."""
    if layout.batch:
      raise ValueError('LoHa on kernels with batch axes is not implemented')
    d1 = kernels.delta_weight(params['a1'], params['b1'], layout, 1.0)
    d2 = kernels.delta_weight(params['a2'], params['b2'], layout, 1.0)
    return self.scale * d1 * d2

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del rng, context
    ndim = len(self.kernel_aval(kernel).shape)
    contract = tuple(sorted(dims.w_contract))
    layout = spec_lib.KernelLayout(
        0, contract, tuple(i for i in range(ndim) if i not in contract))
    delta = self.delta(params, layout).astype(dims.kernel_dtype or x.dtype)
    if isinstance(kernel, spec_lib.FrozenKernel):
      return (kernels.kernel_dot(x, kernel, dims)
              + kernels.base_dot(x, delta, dims))
    w = kernel.astype(delta.dtype)
    return kernels.base_dot(x, w + delta, dims)

  def merge(self, kernel, params, layout):
    return kernels.add_delta(kernel, self.delta(params, layout))

  def unmerge(self, kernel, params, layout):
    return kernels.remove_delta(kernel, self.delta(params, layout))
