"""AdaLoRA: adaptive budget allocation in SVD form (Zhang et al., 2023).

A kernel seen as a matrix ``[in, out]`` gets the update::

  ΔW = s · a · diag(e) · b,   s = alpha / (init_r + 1e-5)

with ``a`` [in, r], ``e`` [r] and ``b`` [r, out] in the kernel's own
contracted and free axes (as ``Lora``'s factors), r = ``init_r``. The three
play the parts of an SVD's right vectors, singular values and left vectors:
a rank allocator (``lorajax.methods.adalora_allocator``) scores every
triplet ``(a[:, i], e[i], b[i])`` during training and sets the ``e[i]`` of
the least important ones to zero, so that the average rank falls from
``init_r`` to ``target_r`` on a cubic schedule; an orthogonality penalty
(``orth_regularization``) keeps ``a`` and ``b`` near orthonormal.

PEFT's ``AdaLoraConfig`` names: ``lora_A`` [r, in] is ``aᵀ``, ``lora_E``
[r, 1] is ``e``, ``lora_B`` [out, r] is ``bᵀ`` for a Flax ``[in, out]``
kernel; PEFT scales by ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum =
init_r`` (kept when a saved adapter is loaded at a smaller rank), and that
is ``scale`` here. PEFT's start: ``e`` zero (the adapted function is the base
at step 0), ``a`` and ``b`` normal with std 0.02.

The schedule fields (``target_r``, ``tinit``, ``tfinal``, ``delta_t``,
``beta1``, ``beta2``, ``orth_reg_weight``, ``total_step``) are PEFT's and are
read by the allocator and written to ``adapter_config.json``; they do not
change what the adapted function computes.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> spec = lorajax.LoraSpec([('w', AdaLora(init_r=4, target_r=2,
  ...                                        total_step=100))])
  >>> ad = lorajax.init(spec, {'w': jnp.ones((6, 5))}, jax.random.key(0))
  >>> sorted((k, v.shape) for k, v in ad['w'].items())
  [('a', (6, 4)), ('b', (4, 5)), ('e', (4,))]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import kernels
from lorajax import spec as spec_lib

PyTree = Any
# PEFT adds this to ranknum before dividing (AdaLoraLayer / SVDLinear).
RANKNUM_EPS = 1e-5
# The fields the rank allocator reads: one schedule per run.
SCHEDULE_FIELDS = ('target_r', 'tinit', 'tfinal', 'delta_t', 'beta1', 'beta2',
                   'orth_reg_weight', 'total_step')


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class AdaLora(spec_lib.Adapter):
  """AdaLoRA on one kernel: ``ΔW = s·a·diag(e)·b``.

  Attributes:
    init_r: r, the number of triplets each kernel starts with.
    alpha: PEFT's ``lora_alpha``; None takes ``init_r`` (s ≈ 1).
    dropout: dropout rate on the adapter input (with an rng).
    target_r: the average number of triplets a kernel keeps at the end.
    tinit: steps before the budget starts to fall.
    tfinal: steps at the end with the final budget (the mask fixed).
    delta_t: steps between two allocations while the budget falls (PEFT's
      ``deltaT``).
    beta1, beta2: EMA decays of the sensitivity and of its uncertainty.
    orth_reg_weight: weight of the orthogonality penalty in the loss.
    total_step: the steps of the run; the allocator needs it (PEFT's
      ``AdaLoraConfig`` refuses None), the adapted function does not.
  """
  init_r: int = 12
  alpha: float | None = None
  dropout: float = 0.0
  target_r: int = 8
  tinit: int = 0
  tfinal: int = 0
  delta_t: int = 1
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5
  total_step: int | None = None

  def __post_init__(self):
    def bad(field, expected):
      raise ValueError(f'AdaLora {field}={getattr(self, field)!r}: expected '
                       f'{expected}')
    for field, low in (('init_r', 1), ('target_r', 0), ('tinit', 0),
                       ('tfinal', 0), ('delta_t', 1)):
      if not _is_int(getattr(self, field)) or getattr(self, field) < low:
        bad(field, f'an integer >= {low}')
    if self.alpha is not None and not (
        isinstance(self.alpha, (int, float)) and np.isfinite(self.alpha)
        and self.alpha > 0):
      bad('alpha', 'a finite number > 0 (PEFT uses init_r where lora_alpha '
          '<= 0; pass None for that)')
    if not 0.0 <= self.dropout < 1.0:
      bad('dropout', 'a number in [0, 1)')
    for field in ('beta1', 'beta2'):
      if not 0.0 < getattr(self, field) < 1.0:
        bad(field, 'a number in (0, 1), as PEFT\'s RankAllocator asserts')
    if not self.orth_reg_weight >= 0:
      bad('orth_reg_weight', 'a number >= 0')
    if self.total_step is not None:
      if not _is_int(self.total_step) or self.total_step < 1:
        bad('total_step', 'None or an integer >= 1')
      if self.tinit >= self.total_step - self.tfinal:
        raise ValueError(
            f'AdaLora tinit={self.tinit}, tfinal={self.tfinal} leave no '
            f'step of total_step={self.total_step} for the budget to fall '
            f'(PEFT requires tinit < total_step - tfinal)')

  @property
  def scale(self) -> float:
    """``alpha / (init_r + 1e-5)``, PEFT's ``scaling / ranknum``."""
    alpha = self.init_r if self.alpha is None else self.alpha
    return float(alpha) / (self.init_r + RANKNUM_EPS)

  def schedule(self) -> tuple[Any, ...]:
    """The allocator's fields (equal for every rule of a run)."""
    return tuple(getattr(self, f) for f in SCHEDULE_FIELDS)

  def param_shapes(self, kernel_shape, layout):
    lead, cshape, fshape = layout.split_shape(kernel_shape)
    r = self.init_r
    return {'a': (*lead, *cshape, r), 'e': (*lead, r),
            'b': (*lead, r, *fshape)}

  def init_params(self, key, kernel, layout):
    shapes = self.param_shapes(self.kernel_aval(kernel).shape, layout)
    ka, kb = jax.random.split(key)
    return {'a': 0.02 * jax.random.normal(ka, shapes['a'], jnp.float32),
            'e': jnp.zeros(shapes['e'], jnp.float32),
            'b': 0.02 * jax.random.normal(kb, shapes['b'], jnp.float32)}

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del context
    y = kernels.kernel_dot(x, kernel, dims)
    xin = kernels.dropout(x, self.dropout, rng)
    return y + kernels.low_rank_dot(xin, scaled_a(params), params['b'], dims,
                                    self.scale, y.dtype)

  def gather_delta(self, params, layout, axis, take):
    """Rows of ``ΔW`` along kernel ``axis`` (see ``Lora.gather_delta``)."""
    a, b = scaled_a(params), params['b']
    if axis in layout.contract:
      return take(a) @ (b * self.scale)
    return take(b.T) @ (a.T * self.scale)

  def delta(self, params, layout: spec_lib.KernelLayout) -> jax.Array:
    """``ΔW`` (float32) laid out like the (stacked) kernel."""
    return kernels.delta_weight(scaled_a(params), params['b'], layout,
                                self.scale)

  def merge(self, kernel, params, layout):
    return kernels.add_delta(kernel, self.delta(params, layout))

  def unmerge(self, kernel, params, layout):
    return kernels.remove_delta(kernel, self.delta(params, layout))


def scaled_a(params: dict[str, jax.Array]) -> jax.Array:
  """``a·diag(e)``: ``a`` [*lead, *contract, r] times ``e`` [*lead, r]."""
  a, e = params['a'], params['e']
  e = jnp.reshape(e, e.shape[:-1] + (1,) * (a.ndim - e.ndim) + e.shape[-1:])
  return a * e.astype(a.dtype)


def as_matrices(params: dict[str, jax.Array]
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(a [*lead, in, r], e [*lead, r], b [*lead, r, out])``, the kernel's
  contracted and free axes each flattened into one."""
  a, e, b = params['a'], params['e'], params['b']
  lead = e.shape[:-1]
  r = e.shape[-1]
  return (a.reshape(*lead, -1, r), e, b.reshape(*lead, r, -1))


def orth_penalty(params: dict[str, jax.Array]) -> tuple[jax.Array, int]:
  """``(Σ ‖AAᵀ - I‖_F + ‖BᵀB - I‖_F, number of matrices)`` of one adapter,
  over its stacked layers, in PEFT's orientation (``A = aᵀ``, ``B = bᵀ``,
  so ``AAᵀ = aᵀa`` and ``BᵀB = b·bᵀ``, both [r, r])."""
  a, e, b = as_matrices(params)
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  eye = jnp.eye(e.shape[-1], dtype=jnp.float32)
  aa = jnp.einsum('...ir,...is->...rs', a, a) - eye
  bb = jnp.einsum('...ro,...so->...rs', b, b) - eye
  norms = (jnp.sqrt(jnp.sum(aa * aa, axis=(-2, -1)))
           + jnp.sqrt(jnp.sum(bb * bb, axis=(-2, -1))))
  return jnp.sum(norms), 2 * int(np.prod(e.shape[:-1], dtype=np.int64))


def orth_regularization(tree: PyTree, paths: Iterable[str],
                        weight: float) -> jax.Array:
  """PEFT's penalty: ``weight`` times the mean over every ``A`` and ``B``
  matrix of ``‖AAᵀ - I‖_F`` / ``‖BᵀB - I‖_F`` (each stacked layer counts).

  Args:
    tree: a tree holding the AdaLoRA adapters (e.g. the trainable tree).
    paths: the ``/``-joined paths of the adapter nodes in ``tree``.
    weight: ``orth_reg_weight``.
  """
  total, count = jnp.zeros((), jnp.float32), 0
  for path in paths:
    value, n = orth_penalty(spec_lib.get_by_path(tree, path))
    total, count = total + value, count + n
  return weight * total / max(count, 1)


def adalora_paths(spec: spec_lib.LoraSpec, params: PyTree
                  ) -> dict[str, AdaLora]:
  """Kernel path -> ``AdaLora`` provider, for the kernels ``spec`` adapts
  with AdaLoRA in ``params``."""
  return {p: a for p, a in spec_lib.resolve(spec, params).adapted.items()
          if isinstance(a, AdaLora)}


def one_schedule(providers: Iterable[AdaLora]) -> AdaLora:
  """The provider whose schedule every rule shares.

  Raises:
    ValueError: two rules with different schedule fields (one allocator
      serves a run, as PEFT's one ``AdaLoraConfig``).
  """
  providers = list(providers)
  first = providers[0]
  for p in providers[1:]:
    if p.schedule() != first.schedule():
      diff = [f'{f}: {getattr(first, f)!r} vs {getattr(p, f)!r}'
              for f in SCHEDULE_FIELDS if getattr(first, f) != getattr(p, f)]
      raise ValueError('AdaLora rules of one spec must share one schedule '
                       '(one rank allocator, as PEFT\'s AdaLoraConfig); they '
                       'differ in ' + ', '.join(diff))
  return first
