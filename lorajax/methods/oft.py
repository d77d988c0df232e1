"""OFT: orthogonal fine-tuning (Qiu et al., 2023), as PEFT 0.21.2 runs it
on a Linear layer.

The kernel's input side is rotated by a block-diagonal matrix: the input
``in`` is cut into ``r`` blocks of ``b`` features (``r·b = in``) and block
``j`` is turned by its own ``b×b`` matrix ``R_j``::

  y = (x·diag(R₁, …, R_r))·W        (merged: W' = diag(R₁, …, R_r)·W)

for a kernel seen as ``[in, out]`` (its contracted axes flattened in
increasing order, as ``kernels.kernel_matrix`` does). Each ``R_j`` comes
from a skew-symmetric ``Q_j`` (``Q_j = U - Uᵀ``, ``U`` holding the trained
upper-triangle entries row by row) through

- the Cayley–Neumann series (``cayley_neumann=True``, PEFT's default,
  ``neumann_terms`` = PEFT's ``num_cayley_neumann_terms``, default 5):
  ``R = I + 2Q + 2Q² + … + 2Q^(n-2) + Q^(n-1)`` — exactly PEFT's sum, whose
  last term has weight 1 (for n = 5: ``I + 2Q + 2Q² + 2Q³ + Q⁴``; PEFT's
  loop gives n = 3 and 4 the same sum), or
- the exact Cayley transform (``cayley_neumann=False``):
  ``R = (I + Q)⁻¹(I - Q)``.

The parameter ``skew`` is ``[r, b(b-1)/2]`` (``[1, …]`` with
``block_share``: one block for all), PEFT's ``oft_R.weight`` as it is: the
input side is the same in both orientations, so nothing is transposed.
``skew`` starts at zero (PEFT's ``init_weights=True``), so ``R = I`` and
the adapted function is the base at step 0. As PEFT does, the input is
rotated in float32 and cast back; the bias is the kernel's (OFT leaves it
alone). PEFT's ``module_dropout`` is never applied by its Linear layer, so
there is none here either; ``coft`` (which overwrites the parameter in
place each forward) is not implemented.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> spec = lorajax.LoraSpec([('w', Oft(block_size=4))])
  >>> ad = lorajax.init(spec, {'w': jnp.ones((12, 5))}, jax.random.key(0))
  >>> ad['w']['skew'].shape          # 3 blocks of 4: 4·3/2 entries each
  (3, 6)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import kernels
from lorajax import spec as spec_lib


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def skew_matrices(skew: jax.Array, block_size: int) -> jax.Array:
  """``[..., n]`` upper-triangle entries -> ``[..., b, b]`` skew-symmetric
  ``U - Uᵀ`` (float32; ``U[i, j]``, ``i < j``, filled row by row)."""
  rows, cols = np.triu_indices(block_size, 1)
  lead = skew.shape[:-1]
  u = jnp.zeros((*lead, block_size, block_size), jnp.float32)
  u = u.at[..., rows, cols].set(skew.astype(jnp.float32))
  return u - jnp.swapaxes(u, -1, -2)


def rotations(skew: jax.Array, block_size: int, cayley_neumann: bool = True,
              neumann_terms: int = 5) -> jax.Array:
  """The blocks ``R`` ``[..., b, b]`` (float32) of ``[..., n]`` entries."""
  q = skew_matrices(skew, block_size)
  eye = jnp.broadcast_to(jnp.eye(block_size, dtype=jnp.float32), q.shape)
  if not cayley_neumann:
    return jnp.linalg.solve(eye + q, eye - q)
  # PEFT's loop, term by term (its rounding too).
  r = eye
  if neumann_terms > 1:
    r = r + 2.0 * q
    if neumann_terms > 2:
      power = q @ q
      r = r + 2.0 * power
      for _ in range(3, neumann_terms - 1):
        power = power @ q
        r = r + 2.0 * power
      power = power @ q
      r = r + power
  return r


@dataclasses.dataclass(frozen=True)
class Oft(spec_lib.Adapter):
  """OFT on one kernel: its input rotated by ``r`` blocks of ``b×b``.

  Exactly one of ``block_size`` and ``r`` is non-zero (PEFT's
  ``oft_block_size`` and ``r``; ``r·b = in``): ``Oft(block_size=32)``
  (PEFT's default) or ``Oft(block_size=0, r=4)``.

  Attributes:
    block_size: b, the side of each block (must divide every adapted
      kernel's input size).
    r: the number of blocks instead (must divide the input size).
    block_share: one block for all ``r`` blocks of a kernel.
    cayley_neumann: the Cayley–Neumann series (PEFT's default) instead of
      the exact Cayley transform.
    neumann_terms: the series' number of terms (PEFT's
      ``num_cayley_neumann_terms``).
  """
  block_size: int = 32
  r: int = 0
  block_share: bool = False
  cayley_neumann: bool = True
  neumann_terms: int = 5

  def __post_init__(self):
    for field in ('block_size', 'r'):
      value = getattr(self, field)
      if not _is_int(value) or value < 0:
        raise ValueError(f'Oft {field} must be an integer >= 0, got '
                         f'{value!r}')
    if (self.block_size == 0) == (self.r == 0):
      raise ValueError(
          f'Oft needs exactly one of block_size and r non-zero (r x '
          f'block_size = the input size); got block_size={self.block_size}, '
          f'r={self.r}: e.g. Oft(block_size=32) or Oft(block_size=0, r=4)')
    if not _is_int(self.neumann_terms) or self.neumann_terms < 1:
      raise ValueError(f'Oft neumann_terms must be an integer >= 1, got '
                       f'{self.neumann_terms!r}')

  def blocks(self, n_in: int, path: str = 'Oft') -> tuple[int, int]:
    """``(r, b)`` for an input of ``n_in`` features.

    Raises:
      ValueError: naming ``path`` when ``n_in`` does not split so (PEFT
        would quietly pick another block size).
    """
    size = self.block_size or (n_in // self.r if self.r else 0)
    field = (f'block_size={self.block_size}' if self.block_size
             else f'r={self.r}')
    if size < 2 or n_in % (self.block_size or self.r):
      raise ValueError(
          f'{path}: Oft {field} does not split the kernel\'s input of '
          f'{n_in} features into blocks of 2 or more (r x block_size must '
          f'equal {n_in})')
    return n_in // size, size

  def validate(self, path, kernel_shape, layout):
    if layout.batch:
      raise ValueError(f'{path}: Oft on kernels with batch axes is not '
                       'implemented')
    _, cshape, _ = layout.split_shape(kernel_shape)
    self.blocks(kernels.prod(cshape), path)

  def param_shapes(self, kernel_shape, layout):
    lead, cshape, _ = layout.split_shape(kernel_shape)
    r, b = self.blocks(kernels.prod(cshape))
    return {'skew': (*lead, 1 if self.block_share else r, b * (b - 1) // 2)}

  def init_params(self, key, kernel, layout):
    del key
    shapes = self.param_shapes(self.kernel_aval(kernel).shape, layout)
    return {'skew': jnp.zeros(shapes['skew'], jnp.float32)}

  def rotation(self, skew: jax.Array, n_in: int) -> jax.Array:
    """``[..., r, b, b]`` float32 blocks for ``skew`` ``[..., r or 1, n]``."""
    r, b = self.blocks(n_in)
    rot = rotations(skew, b, self.cayley_neumann, self.neumann_terms)
    return jnp.broadcast_to(rot, (*rot.shape[:-3], r, b, b))

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del rng, context
    shape = self.kernel_aval(kernel).shape
    # x's contracting axes in the kernel's (flattening) order, moved last.
    order = sorted(range(len(dims.w_contract)),
                   key=lambda i: dims.w_contract[i])
    x_in = [dims.x_contract[i] for i in order]
    rest = [i for i in range(x.ndim) if i not in x_in]
    xt = jnp.transpose(x, rest + x_in)
    n_in = kernels.prod([shape[dims.w_contract[i]] for i in order])
    rot = self.rotation(params['skew'], n_in)             # [r, b, b]
    r, b = rot.shape[-3:-1]
    lead = xt.shape[:len(rest)]
    xr = jnp.einsum('...jk,jkc->...jc',
                    xt.reshape(*lead, r, b).astype(jnp.float32), rot)
    xr = xr.reshape(xt.shape).astype(x.dtype)
    x_rot = jnp.transpose(xr, np.argsort(rest + x_in))
    return kernels.kernel_dot(x_rot, kernel, dims)

  def _apply(self, w: jax.Array, params, layout, inverse: bool) -> jax.Array:
    """``diag(R)·W`` (or ``diag(R)⁻¹·W``) in ``w``'s (kernel) layout."""
    if layout.batch:
      raise ValueError('Oft on kernels with batch axes is not implemented')
    lead, cshape, fshape = layout.split_shape(w.shape)
    m = kernels.kernel_matrix(w, layout)                  # [*L, in, out]
    n_in = m.shape[-2]
    rot = self.rotation(params['skew'], n_in)             # [*L, r, b, b]
    r, b = rot.shape[-3:-1]
    blocks = m.reshape(*lead, r, b, m.shape[-1])
    if inverse:
      out = jnp.linalg.solve(rot, blocks)
    else:
      out = jnp.einsum('...jkc,...jco->...jko', rot, blocks)
    # Back from [*L, *contract, *free] to the kernel's own axis order.
    out = out.reshape(*lead, *cshape, *fshape)
    s, nc = layout.stack, len(layout.contract)
    src = {ax: s + i for i, ax in enumerate(layout.contract)}
    src.update({ax: s + nc + i for i, ax in enumerate(layout.free)})
    perm = tuple(range(s)) + tuple(src[i] for i in range(layout.ndim - s))
    return jnp.transpose(out, perm).astype(w.dtype)

  def merge(self, kernel, params, layout):
    return self._apply(kernels.kernel_value(kernel), params, layout, False)

  def unmerge(self, kernel, params, layout):
    return self._apply(kernel, params, layout, True)
