"""The LoRA provider: ``x·W + s·(x·a)·b`` with ``a`` [in, r] and ``b`` [r, out].

``a`` spans the kernel's contracted (input) axes and ``b`` its free (output)
axes, as the function uses the kernel: a DenseGeneral query kernel
``[d, heads, hd]`` gets ``a`` [d, r] and ``b`` [r, heads, hd]; an output
kernel ``[heads, hd, d]`` gets ``a`` [heads, hd, r] and ``b`` [r, d]; a
kernel stored ``[out, in]`` and used as ``x·Wᵀ`` gets ``a`` [in, r], ``b``
[r, out]. Kernels stacked by ``nn.scan`` get stacked adapters, ``a`` [L, in,
r]; kernels with batch axes (MoE experts ``[E, in, out]``, ``vmap``-ed
ensembles) get one adapter per index, ``a`` [E, in, r], ``b`` [E, r, out].
The math lives in ``lorajax/kernels.py``.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'dense': {'kernel': jnp.ones((4, 3))}}
  >>> spec = lorajax.LoraSpec([(r'.*kernel', Lora(rank=2, alpha=4))])
  >>> ad = lorajax.init(spec, params, jax.random.key(0))['dense']['kernel']
  >>> ad['a'].shape, ad['b'].shape, Lora(rank=2, alpha=4).scale
  ((4, 2), (2, 3), 2.0)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import kernels
from lorajax import spec as spec_lib

INITS = ('kaiming', 'gaussian', 'pissa', 'olora', 'loftq', 'eva')
# Inits whose factors are a function of the kernel: the frozen base becomes
# the residual W - s·a·b (lorajax.pissa.residual_base).
RESIDUAL_INITS = ('pissa', 'olora')
# Inits only a quantized base takes (QLora; lorajax.methods.loftq).
QUANTIZED_INITS = ('loftq',)
# Inits made from data batches, by lorajax.eva.init (plain Lora only).
DATA_INITS = ('eva',)


@dataclasses.dataclass(frozen=True)
class Lora(spec_lib.Adapter):
  """Low-rank adaptation: ``y = x·W + s·(x·a)·b``.

  Attributes:
    rank: r, the inner dimension of the update.
    alpha: scaling numerator; defaults to ``rank`` (s = 1).
    use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    dropout: dropout rate on the adapter input (applied when the adapted
      function is given an rng).
    init: ``'kaiming'`` (uniform, PEFT's default) or ``'gaussian'``
      (normal with std 1/r) for ``a``, with ``b`` at zero; or ``'pissa'``
      (Meng et al., 2024): ``a``, ``b`` start at the kernel's top-r singular
      directions, ``s·a·b = U_r·S_r·V_rᵀ``, and the frozen base must become
      the residual ``W - s·a·b`` (``lorajax.pissa.residual_base``) so that
      the adapted function still equals the base at initialization;
      ``'olora'`` the same with ``a``, ``b`` from the kernel's QR
      decomposition (``b`` orthonormal). ``'loftq'`` (``QLora`` only;
      ``lorajax.methods.loftq``) and ``'eva'`` (``lorajax.eva.init``, from
      data batches) are made outside ``init``.
    batch_axes: kernel axes (of the per-call kernel, after any ``scan``
      stacking) that get an adapter of their own per index even where a
      product leaves them free, e.g. ``(0,)`` for an ensemble made with
      ``nn.vmap`` whose first layer multiplies one input by every member's
      kernel ``[members, in, out]``; ``()`` shares one ``a`` across such
      axes. ``None`` (the default) makes ``dot_general`` batch axes
      per-index and refuses a kernel where the choice is ambiguous (a free
      axis in front of the contracted ones and more than one free axis).
  """
  rank: int = 8
  alpha: float | None = None
  use_rslora: bool = False
  dropout: float = 0.0
  init: str = 'kaiming'
  batch_axes: tuple[int, ...] | None = None

  supports_batch = True

  def __post_init__(self):
    if self.batch_axes is not None:
      object.__setattr__(self, 'batch_axes',
                         tuple(int(i) for i in self.batch_axes))
    if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f'Lora rank must be a positive integer, got '
                       f'{self.rank!r}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'Lora dropout must be in [0, 1), got {self.dropout}')
    if self.init not in INITS:
      raise ValueError(f'Lora init must be one of {INITS}, got '
                       f'{self.init!r}')
    if self.init in QUANTIZED_INITS and not hasattr(self, 'quantize'):
      raise ValueError(
          f'{type(self).__name__}(init={self.init!r}) chooses a quantized '
          'base with the factors; a float base has no quantization error to '
          "make up for: use QLora(init='loftq') (config.method='qlora')")
    exact = type(self) is Lora  # pylint: disable=unidiomatic-typecheck
    if self.init in DATA_INITS and not exact:
      raise ValueError(f'{type(self).__name__}(init={self.init!r}) is not '
                       'implemented; EVA initializes Lora rules')

  @property
  def scale(self) -> float:
    alpha = self.rank if self.alpha is None else self.alpha
    if self.use_rslora:
      return float(alpha) / math.sqrt(self.rank)
    return float(alpha) / self.rank

  def validate(self, path, kernel_shape, layout):
    _, cshape, fshape = layout.split_shape(kernel_shape)
    limit = min(kernels.prod(cshape), kernels.prod(fshape))
    if self.rank > limit:
      raise ValueError(
          f'{path}: rank {self.rank} is larger than min(in, out) = {limit} '
          f'for a kernel of shape {tuple(kernel_shape)}')

  def param_shapes(self, kernel_shape, layout):
    stack, cshape, fshape = layout.split_shape(kernel_shape)
    return {'a': (*stack, *cshape, self.rank), 'b': (*stack, self.rank, *fshape)}

  def init_params(self, key, kernel, layout):
    if self.init in DATA_INITS:
      raise ValueError(
          f"Lora(init={self.init!r}) takes a from the layer inputs of data "
          'batches: lorajax.eva.init(spec, params, batches, fn=...) makes '
          'the adapters (and the per-kernel ranks)')
    if self.init in RESIDUAL_INITS:
      if isinstance(kernel, spec_lib.FrozenKernel):
        raise ValueError(f"Lora(init={self.init!r}) needs a float kernel, "
                         f'not a quantized {type(kernel).__name__}')
      return self.start_factors(kernel, layout)
    shape = self.kernel_aval(kernel).shape
    stack, cshape, fshape = layout.split_shape(shape)
    fan_in = kernels.prod(cshape)
    a_shape = (*stack, *cshape, self.rank)
    if self.init == 'kaiming':
      # Kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in).
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    else:
      a = jax.random.normal(key, a_shape, jnp.float32) / self.rank
    b = jnp.zeros((*stack, self.rank, *fshape), jnp.float32)
    return {'a': a, 'b': b}

  def start_factors(self, kernel, layout) -> dict[str, jax.Array]:
    """The factors a residual init (PiSSA, OLoRA) starts from."""
    if self.init == 'pissa':
      return kernels.principal_factors(kernel, layout, self.rank, self.scale)
    if self.init == 'olora':
      return kernels.orthonormal_factors(kernel, layout, self.rank)
    raise ValueError(f'init={self.init!r} does not start from the kernel')

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del context
    y = kernels.kernel_dot(x, kernel, dims)
    xin = kernels.dropout(x, self.dropout, rng)
    return y + kernels.low_rank_dot(xin, params['a'], params['b'], dims,
                                    self.scale, y.dtype)

  def gather_delta(self, params, layout, axis, take):
    """Rows of ``s·a·b`` (kernel layout) along kernel ``axis``, low-rank:
    ``take`` gathers rows of a ``[n, r]`` table; the result is ``[..., m]``
    with ``m`` the kernel's other axis. Used when the function also looks
    rows of the kernel up (an embedding tied to the output projection)."""
    a, b = params['a'], params['b']
    if axis in layout.contract:          # rows of a: [in, r] @ [r, out]
      return take(a) @ (b * self.scale)
    return take(b.T) @ (a.T * self.scale)  # rows of bᵀ: [out, r] @ [r, in]

  def merge(self, kernel, params, layout):
    return kernels.add_delta(kernel, kernels.delta_weight(
        params['a'], params['b'], layout, self.scale))

  def unmerge(self, kernel, params, layout):
    return kernels.remove_delta(kernel, kernels.delta_weight(
        params['a'], params['b'], layout, self.scale))
