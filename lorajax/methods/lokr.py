"""LoKr: Kronecker-product adaptation (LyCORIS; Edalati et al., 2022,
"KronA").

A kernel seen as a matrix ``[in, out]`` gets the update::

  ΔW = s · w₁ ⊗ w₂,   s = alpha / r

with ``w₁`` ``[in₁, out₁]`` and ``w₂`` ``[in₂, out₂]``, ``in = in₁·in₂`` and
``out = out₁·out₂``: each dimension is split into two factors as close to
its square root as possible (``factorization``; ``decompose_factor`` asks
for a given first factor instead). ``w₂`` is stored whole when the rank is
at least half its larger side, else as ``w2_a·w2_b`` of rank r; ``w₁`` is
whole unless ``decompose_both`` and the same test says to factor it. These
are PEFT's rules for a Linear layer, so the parameters line up one to one
with a ``LoKrConfig`` adapter. PEFT's default start: ``w₁`` zero (the
adapted function is the base at step 0) and every ``w₂`` factor uniform in
``±1/sqrt(fan_in)`` of PEFT's ``[out, in]`` orientation.

The parameters are kept in the kernel's ``[in, out]`` orientation: lorajax's
``w1``/``w2`` are PEFT's ``lokr_w1ᵀ``/``lokr_w2ᵀ``, and ``w2_a``/``w2_b``
are ``lokr_w2_bᵀ``/``lokr_w2_aᵀ`` (the same for ``w1_a``/``w1_b``).

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> spec = lorajax.LoraSpec([('w', LoKr(rank=2))])
  >>> ad = lorajax.init(spec, {'w': jnp.ones((12, 8))}, jax.random.key(0))
  >>> sorted((k, v.shape) for k, v in ad['w'].items())
  [('w1', (3, 2)), ('w2', (4, 4))]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import kernels
from lorajax import spec as spec_lib


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """Splits ``dimension`` into ``(m, n)``, ``m·n = dimension``, ``m <= n``.

  Args:
    dimension: the size to split.
    factor: ``-1`` for the pair nearest the square root; a positive divisor
      of ``dimension`` is taken as ``m`` directly; another positive value
      caps ``m``.

  Returns:
    ``(m, n)`` as PEFT's LoKr splits the same dimension.
  """
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  cap = dimension if factor == -1 else factor
  m, n = 1, dimension
  while m < n:
    nxt = m + 1
    while dimension % nxt:
      nxt += 1
    if nxt + dimension // nxt > m + n or nxt > cap:
      break
    m, n = nxt, dimension // nxt
  return (m, n) if m <= n else (n, m)


@dataclasses.dataclass(frozen=True)
class LoKr(spec_lib.Adapter):
  """LoKr on one kernel: ``ΔW = s·w₁ ⊗ w₂`` over its ``[in, out]`` matrix.

  Attributes:
    rank: r of the factored Kronecker factors (and the scale's divisor).
    alpha: scaling numerator; defaults to ``rank`` (s = 1).
    decompose_both: also factor ``w₁`` when the rank is small enough.
    decompose_factor: ``factorization``'s ``factor`` (``-1``: square root).
  """
  rank: int = 8
  alpha: float | None = None
  decompose_both: bool = False
  decompose_factor: int = -1

  def __post_init__(self):
    if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f'LoKr rank must be a positive integer, got '
                       f'{self.rank!r}')
    if self.decompose_factor == 0 or self.decompose_factor < -1:
      raise ValueError(f'LoKr decompose_factor must be -1 or positive, got '
                       f'{self.decompose_factor!r}')

  @property
  def scale(self) -> float:
    return float(self.rank if self.alpha is None else self.alpha) / self.rank

  def factor_shapes(self, n_in: int, n_out: int
                    ) -> dict[str, tuple[int, int]]:
    """The factors of an ``[n_in, n_out]`` matrix and their 2-D shapes."""
    in1, in2 = factorization(n_in, self.decompose_factor)
    out1, out2 = factorization(n_out, self.decompose_factor)
    r = self.rank
    shapes = {}
    if self.decompose_both and r < max(out1, in1) / 2:
      shapes.update(w1_a=(in1, r), w1_b=(r, out1))
    else:
      shapes['w1'] = (in1, out1)
    if r < max(out2, in2) / 2:
      shapes.update(w2_a=(in2, r), w2_b=(r, out2))
    else:
      shapes['w2'] = (in2, out2)
    return shapes

  def param_shapes(self, kernel_shape, layout):
    lead, cshape, fshape = layout.split_shape(kernel_shape)
    return {k: (*lead, *s) for k, s in self.factor_shapes(
        kernels.prod(cshape), kernels.prod(fshape)).items()}

  def init_params(self, key, kernel, layout):
    shapes = self.param_shapes(self.kernel_aval(kernel).shape, layout)
    n = layout.lead
    out = {}
    keys = dict(zip(sorted(shapes), jax.random.split(key, len(shapes))))
    for name, shape in shapes.items():
      if name in ('w1', 'w1_b'):   # PEFT zeroes lokr_w1 / lokr_w1_a.
        out[name] = jnp.zeros(shape, jnp.float32)
        continue
      # PEFT's fan-in is the second axis of its tensor, the transpose of
      # ours: our first axis (in₂ of w2 and w2_a, r of w2_b and w1_a).
      bound = 1.0 / math.sqrt(shape[n])
      out[name] = jax.random.uniform(keys[name], shape, jnp.float32, -bound,
                                     bound)
    return out

  def delta(self, params, layout: spec_lib.KernelLayout,
            kernel_shape) -> jax.Array:
    """``ΔW`` (float32) laid out like the (stacked) kernel of
    ``kernel_shape``."""
    if layout.batch:
      raise ValueError('LoKr on kernels with batch axes is not implemented')

    def whole(i):
      if f'w{i}' in params:
        return params[f'w{i}'].astype(jnp.float32)
      return jnp.matmul(params[f'w{i}_a'].astype(jnp.float32),
                        params[f'w{i}_b'].astype(jnp.float32))
    w1, w2 = whole(1), whole(2)
    lead = w1.shape[:-2]
    (i1, o1), (i2, o2) = w1.shape[-2:], w2.shape[-2:]
    # kron(w1, w2)[a·i2 + c, b·o2 + d] = w1[a, b]·w2[c, d].
    kron = jnp.einsum('...ab,...cd->...acbd', w1, w2).reshape(
        *lead, i1 * i2, o1 * o2)
    _, cshape, fshape = layout.split_shape(kernel_shape)
    s, nc = layout.stack, len(layout.contract)
    # Unflatten [in, out] into the contracted and free axes (in the order
    # kernels.kernel_matrix flattens them), then put them in kernel order.
    d = kron.reshape(*lead, *cshape, *fshape)
    order = [0] * (layout.ndim - s)
    for j, ax in enumerate(layout.contract):
      order[ax] = s + j
    for j, ax in enumerate(layout.free):
      order[ax] = s + nc + j
    return jnp.transpose(d, tuple(range(s)) + tuple(order)) * self.scale

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del rng, context
    shape = self.kernel_aval(kernel).shape
    contract = tuple(sorted(dims.w_contract))
    layout = spec_lib.KernelLayout(
        0, contract, tuple(i for i in range(len(shape)) if i not in contract))
    delta = self.delta(params, layout, shape).astype(
        dims.kernel_dtype or x.dtype)
    if isinstance(kernel, spec_lib.FrozenKernel):
      return (kernels.kernel_dot(x, kernel, dims)
              + kernels.base_dot(x, delta, dims))
    return kernels.base_dot(x, kernel.astype(delta.dtype) + delta, dims)

  def merge(self, kernel, params, layout):
    shape = kernels.kernel_value(kernel).shape
    return kernels.add_delta(kernel, self.delta(params, layout, shape))

  def unmerge(self, kernel, params, layout):
    return kernels.remove_delta(kernel,
                                self.delta(params, layout, kernel.shape))
