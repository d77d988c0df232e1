"""The kernel math every provider and the rewrite share.

A targeted kernel ``W`` is consumed by one ``dot_general``. How the function
uses it is a ``KernelLayout`` (which axes are contracted with the input,
which are batch axes with their own adapter each, which are stacked by
``scan``), read from the function when it is traced and kept with the
adapter (``AdapterParams.layout``). Everything here takes the layout as an
argument; nothing guesses it from shapes.

- ``base_dot`` / ``kernel_dot``: the original product (dense or quantized).
- ``low_rank_dot``: ``s·(x·a)·b`` laid out like the original product, with a
  backward pass that never transposes a big operand.
- ``delta_weight`` / ``kernel_matrix``: ``s·a·b`` as a kernel-shaped tensor,
  and a kernel as ``[*lead, in, out]`` matrices (merge, DoRA, PiSSA).

Factor shapes, for a kernel of layout ``L``: ``a`` is ``[*stack, *batch,
*contract, r]`` and ``b`` is ``[*stack, *batch, r, *free]`` (each group in
increasing kernel-axis order). A Flax ``Dense`` kernel ``[in, out]`` gets
``a`` [in, r], ``b`` [r, out]; a kernel stored ``[out, in]`` and used as
``x·Wᵀ`` gets the same ``a`` [in, r], ``b`` [r, out] and merges back
transposed; MoE experts ``[E, in, out]`` used as ``einsum('ecd,edf->ecf')``
get ``a`` [E, in, r], ``b`` [E, r, out].

Example:

  >>> import jax.numpy as jnp
  >>> layout = KernelLayout(stack=0, contract=(1,), free=(0,))  # W is [out, in]
  >>> a, b = jnp.ones((3, 1)), jnp.ones((1, 2))                 # in 3, out 2
  >>> delta_weight(a, b, layout, 0.5).shape                      # like W
  (2, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lorajax import matmul

PyTree = Any


def prod(shape: Sequence[int]) -> int:
  """The number of elements of ``shape`` (1 for ``()``)."""
  return int(math.prod(shape))


class FrozenKernel:
  """Base class of stored kernels that are not a plain array (e.g. quantized).

  Subclasses are pytree nodes that stand where a kernel array would stand in
  the parameter tree. The rewrite traces the model with ``aval()`` in their
  place and hands the node to the kernel's provider at each ``dot_general``.
  """

  def aval(self) -> jax.ShapeDtypeStruct:
    """The shape and dtype of the kernel the model sees."""
    raise NotImplementedError

  def dequantize(self) -> jax.Array:
    """The kernel as a dense array of ``aval().dtype``."""
    raise NotImplementedError

  def dot(self, x: jax.Array, dims: 'DotDims') -> jax.Array:
    """The original ``dot_general`` of ``x`` with this kernel.

    The default dequantizes and multiplies; subclasses override it to avoid
    keeping a dense copy of the kernel alive (see ``methods/quant.py``).
    """
    return base_dot(x, self.dequantize().astype(dims.kernel_dtype), dims)


def is_kernel_node(x: Any) -> bool:
  return isinstance(x, FrozenKernel)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """How one adapted kernel is used by the function that consumes it.

  Axis numbers count the per-call kernel, i.e. after the ``stack`` leading
  axes that ``scan`` slices off.

  Attributes:
    stack: number of leading axes that ``scan`` slices off (stacked layers).
    contract: axes contracted with the input, increasing (Flax ``Dense``:
      ``(0,)``; a ``[out, in]`` kernel used as ``x·Wᵀ``: ``(1,)``).
    free: the output axes, increasing.
    batch: axes with an adapter of their own per index (``dot_general``
      batch dimensions such as MoE experts or ``vmap``-ed ensemble members,
      or axes a provider declares with ``batch_axes``), increasing.
  """
  stack: int
  contract: tuple[int, ...]
  free: tuple[int, ...]
  batch: tuple[int, ...] = ()

  def __post_init__(self):
    axes = sorted(self.contract + self.free + self.batch)
    if axes != list(range(len(axes))) or not self.contract:
      raise ValueError(f'not a kernel layout: {self}')

  @property
  def lead(self) -> int:
    """Leading axes of the factors: stacked plus batch axes."""
    return self.stack + len(self.batch)

  @property
  def ndim(self) -> int:
    return self.stack + len(self.contract) + len(self.free) + len(self.batch)

  def split_shape(self, shape: Sequence[int]):
    """``(lead_shape, contract_shape, free_shape)`` of a (stacked) kernel;
    ``lead`` is the stack shape followed by the batch axes' sizes."""
    shape = tuple(shape)
    if len(shape) != self.ndim:
      raise ValueError(f'a kernel of shape {shape} does not have the '
                       f'{self.ndim} axes of layout {self}')
    call = shape[self.stack:]
    return (shape[:self.stack] + tuple(call[i] for i in self.batch),
            tuple(call[i] for i in self.contract),
            tuple(call[i] for i in self.free))

  def to_json(self) -> dict[str, Any]:
    return {'stack': self.stack, 'contract': list(self.contract),
            'free': list(self.free), 'batch': list(self.batch)}

  @staticmethod
  def from_json(d: Mapping[str, Any]) -> 'KernelLayout':
    try:
      return KernelLayout(int(d['stack']), tuple(int(i) for i in d['contract']),
                          tuple(int(i) for i in d['free']),
                          tuple(int(i) for i in d.get('batch', ())))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'not a kernel layout: {d!r} ({e})') from None

  def describe(self) -> str:
    """E.g. ``[in, out]``, ``[out, in]``, ``[L, E, in, out]``."""
    names = ['L'] * self.stack + [''] * (self.ndim - self.stack)
    for i in self.contract:
      names[self.stack + i] = 'in'
    for i in self.free:
      names[self.stack + i] = 'out'
    for i in self.batch:
      names[self.stack + i] = 'E'
    return '[' + ', '.join(names) + ']'

  @staticmethod
  def dense() -> 'KernelLayout':
    """A Flax ``Dense`` kernel ``[in, out]``."""
    return KernelLayout(0, (0,), (1,))


class AdapterParams(dict):
  """One kernel's adapter parameters (``{'a': ..., 'b': ...}``) and its layout.

  A dict registered as a pytree whose children are the arrays and whose
  static metadata is the ``KernelLayout`` it was made for, so jit, grad,
  optax and Orbax (restoring against an ``eval_shape`` target) carry the
  layout along. Merge, DoRA, PiSSA, MultiLora and the sharding rules read it
  from here; the rewrite checks it against how the function uses the kernel.
  """

  def __init__(self, items: Any = (), *, layout: KernelLayout | None):
    super().__init__(items)
    if not isinstance(layout, KernelLayout):
      raise TypeError(f'AdapterParams needs a KernelLayout, got {layout!r}')
    self.layout = layout

  def __repr__(self) -> str:
    inner = ', '.join(f'{k!r}: {getattr(v, "shape", v)}'
                      for k, v in self.items())
    return f'AdapterParams({{{inner}}}, layout={self.layout.describe()})'

  def replace(self, **arrays: Any) -> 'AdapterParams':
    return AdapterParams({**self, **arrays}, layout=self.layout)


def _flatten(node: AdapterParams):
  keys = tuple(sorted(node))
  return ([(jax.tree_util.DictKey(k), node[k]) for k in keys],
          (keys, node.layout))


def _unflatten(aux, children) -> AdapterParams:
  keys, layout = aux
  return AdapterParams(zip(keys, children), layout=layout)


jax.tree_util.register_pytree_with_keys(AdapterParams, _flatten, _unflatten)


def layout_of(params: Any, path: str) -> KernelLayout:
  """The layout an adapter was made for.

  Raises:
    ValueError: for a plain dict (an adapter built by hand or read from a
      file that does not record layouts): which axes of the kernel are its
      input is not guessed from shapes.
  """
  layout = getattr(params, 'layout', None)
  if not isinstance(layout, KernelLayout):
    raise ValueError(
        f'adapter {path!r} carries no kernel layout (a plain '
        f'{type(params).__name__}); make adapters with lorajax.init, or '
        f'attach layouts with lorajax.with_layouts(adapters, spec, params, '
        f'fn=apply_fn, args=(example,)) so it is read from the function')
  return layout


@dataclasses.dataclass(frozen=True)
class DotDims:
  """One ``dot_general`` that consumes an adapted kernel, in the axes of the
  per-call kernel as stored (a transpose on the way is already undone).

  The product is ``dot_general(x, W)`` (or ``(W, x)``) with these
  dimensions; its result is ``[*batch, *x_free, *W_free]`` (or ``[*batch,
  *W_free, *x_free]``), ``W_free`` in increasing axis order.

  Attributes:
    x_contract, w_contract: paired contracting axes of ``x`` and the kernel.
    x_batch, w_batch: paired batch axes (order of the result's batch axes).
    kernel_is_lhs: whether the kernel is the left operand.
    kernel_dtype: dtype the function casts the kernel to before the call.
    precision, preferred_element_type: passed on from the original call.
    w_lead_free: kernel axes the layout treats as batch axes (one adapter
      per index) but that this product leaves free (a ``vmap``-ed ensemble
      whose input is shared by all members).
  """
  x_contract: tuple[int, ...]
  w_contract: tuple[int, ...]
  kernel_is_lhs: bool
  kernel_dtype: Any = None
  precision: Any = None
  preferred_element_type: Any = None
  x_batch: tuple[int, ...] = ()
  w_batch: tuple[int, ...] = ()
  w_lead_free: tuple[int, ...] = ()


def kernel_value(kernel: Any) -> jax.Array:
  """The dense kernel for a stored leaf (an array or a FrozenKernel)."""
  if isinstance(kernel, FrozenKernel):
    return kernel.dequantize()
  return kernel


def add_delta(kernel: Any, delta: jax.Array) -> jax.Array:
  """``W + delta`` (a merge), summed in float32, in the kernel's dtype."""
  w = kernel_value(kernel)
  return (w.astype(jnp.float32) + delta).astype(w.dtype)


def remove_delta(kernel: jax.Array, delta: jax.Array) -> jax.Array:
  """``W - delta`` (an unmerge), in float32, in the kernel's dtype."""
  return (kernel.astype(jnp.float32) - delta).astype(kernel.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout on the adapter input; identity without an rng."""
  if rng is None or rate <= 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def base_dot(x: jax.Array, w: jax.Array, dims: DotDims) -> jax.Array:
  """The original ``dot_general`` of ``x`` and the (per-call) kernel ``w``,
  in ``lorajax.matmul.product``'s form (a bfloat16 or wide one on the CPU
  runs faster that way)."""
  x_dims = (tuple(dims.x_contract), tuple(dims.x_batch))
  w_dims = (tuple(dims.w_contract), tuple(dims.w_batch))
  (lhs, l_dims), (rhs, r_dims) = (((w, w_dims), (x, x_dims))
                                  if dims.kernel_is_lhs
                                  else ((x, x_dims), (w, w_dims)))
  dn = ((l_dims[0], r_dims[0]), (l_dims[1], r_dims[1]))
  return matmul.product(lhs, rhs, dn, dims.precision,
                        dims.preferred_element_type)


def kernel_dot(x: jax.Array, kernel: Any, dims: DotDims) -> jax.Array:
  """``base_dot`` for a stored kernel: an array, or a FrozenKernel's own dot
  (which may avoid keeping a dense copy, e.g. a quantized kernel)."""
  if isinstance(kernel, FrozenKernel):
    return kernel.dot(x, dims)
  return base_dot(x, kernel.astype(dims.kernel_dtype), dims)


# --- s·(x·a)·b on [*B, M, K] x [*B, K, r] x [*B, r, N] ----------------------

def _bdot(u, v, cu: int, cv: int, nb: int, precision=None, preferred=None):
  """``dot_general`` contracting ``u``'s axis ``cu`` with ``v``'s ``cv``,
  with the first ``nb`` axes of both as batch axes."""
  batch = tuple(range(nb))
  return lax.dot_general(u, v, (((cu,), (cv,)), (batch, batch)),
                         precision=precision, preferred_element_type=preferred)


def _lr_fwd(x, a, b, scale, precision, preferred):
  nb = x.ndim - 2
  xa = _bdot(x, a, nb + 1, nb, nb, precision, preferred)           # [*B, M, r]
  xa = xa * jnp.asarray(scale, xa.dtype)
  y = _bdot(xa, b.astype(xa.dtype), nb + 1, nb, nb, precision, preferred)
  return y, (x, a, b, xa)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _low_rank(x, a, b, scale, precision, preferred):
  return _lr_fwd(x, a, b, scale, precision, preferred)[0]


def _lr_bwd(scale, precision, preferred, res, g):
  """The gradients, with every big operand contracted in its stored layout.

  Differentiated as written, ``db`` would be ``dot(g, xa)ᵀ``, which XLA
  computes by transposing the big ``g`` [M, N] (on CPU, fused with the
  producers of ``g``: 0.5 s for a [4096, 1536] GELU gradient). Here only the
  small [M, r] factors are transposed.
  """
  del preferred
  x, a, b, xa = res
  nb = x.ndim - 2
  g = g.astype(xa.dtype)
  gxa = _bdot(g, b.astype(g.dtype), nb + 1, nb + 1, nb, precision)
  gxa = gxa * jnp.asarray(scale, gxa.dtype)                         # [*B, M, r]
  db = _bdot(xa, g, nb, nb, nb, precision)                          # [*B, r, N]
  # da is formed as [r, K]. For plain matrices it is transposed after a
  # barrier: XLA would fold the transpose into the product and compute an
  # [M, K]ᵀ·[M, r] dot with an r-wide result, 4x slower on CPU (1.5 vs
  # 0.35 ms at M=4096, K=384). Not with batch axes: there the barrier's
  # layout trips an XLA CPU check in batched dot emission (jaxlib 0.10.2).
  dat = _bdot(gxa.astype(x.dtype), x, nb, nb, nb, precision)       # [*B, r, K]
  da = jnp.swapaxes(lax.optimization_barrier(dat) if nb == 0 else dat,
                    -1, -2)                                         # [*B, K, r]
  dx = _bdot(gxa.astype(x.dtype), a, nb + 1, nb + 1, nb, precision)  # [*B, M, K]
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank.defvjp(_lr_fwd, _lr_bwd)


def _perm(order: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(i) for i in order)


def _transpose(x: jax.Array, perm: Sequence[int]) -> jax.Array:
  perm = _perm(perm)
  return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def low_rank_dot(x: jax.Array, a: jax.Array, b: jax.Array, dims: DotDims,
                 scale: float, out_dtype: Any) -> jax.Array:
  """``s·(x·a)·b`` laid out like ``base_dot(x, W, dims)`` would lay it out.

  ``x`` is viewed as ``[*B, M, K]`` (batch axes first, its contracting axes
  last in ``a``'s order; a reshape, free for a Dense layer) and the two
  small products run on (batched) matrices, with a backward pass that never
  transposes a big operand. The product has a custom VJP: reverse mode works;
  plain ``jax.jvp`` through it raises ``TypeError``.

  Args:
    x: the other operand of the original ``dot_general``.
    a: ``[*batch, *contract, r]`` (batch and contract axes in increasing
      kernel-axis order).
    b: ``[*batch, r, *free]``.
    dims: the original call's dimensions.
    scale: s.
    out_dtype: dtype of the original result.
  Returns:
    The delta, shaped like the original result.
  """
  w_batch_all = sorted(dims.w_batch + dims.w_lead_free)
  w_contract = sorted(dims.w_contract)
  nbt, nbf = len(dims.w_batch), len(dims.w_lead_free)
  # Factors: lead axes into (true batch in call order, lead-free sorted).
  lead_order = ([w_batch_all.index(w) for w in dims.w_batch]
                + [w_batch_all.index(w) for w in sorted(dims.w_lead_free)])
  nl = len(lead_order)
  a = _transpose(a, lead_order + list(range(nl, a.ndim)))
  b = _transpose(b, lead_order + list(range(nl, b.ndim)))
  # x: [*x_batch, *x_free, *x_contract in a's order].
  x_contract = [0] * len(w_contract)
  for xc, wc in zip(dims.x_contract, dims.w_contract):
    x_contract[w_contract.index(wc)] = xc
  x_batch = list(dims.x_batch)
  x_free = [i for i in range(x.ndim) if i not in x_contract + x_batch]
  x2 = _transpose(x, x_batch + x_free + x_contract)
  bshape = tuple(x.shape[i] for i in x_batch)
  fshape = tuple(x.shape[i] for i in x_free)
  x2 = x2.reshape(*bshape, prod(fshape), -1)
  lead_free_shape = a.shape[nbt:nl]
  if nbf:  # Every lead-free index sees the same input.
    x2 = jnp.broadcast_to(x2[(slice(None),) * nbt + (None,) * nbf],
                          bshape + lead_free_shape + x2.shape[nbt:])
  a2 = a.astype(x.dtype).reshape(*a.shape[:nl], -1, a.shape[-1])
  free_shape = b.shape[nl + 1:]
  b2 = b.reshape(*b.shape[:nl + 1], -1)
  delta = _low_rank(x2, a2, b2, float(scale), dims.precision,
                    dims.preferred_element_type)        # [*B, *F, M, N]
  delta = delta.reshape(*bshape, *lead_free_shape, *fshape, *free_shape)
  # Kernel-free axes of the result: lead-free and free, in kernel order.
  w_free = [i for i in range(len(w_contract) + len(free_shape) + nl)
            if i not in w_contract and i not in dims.w_batch]
  w_free_sorted_src = []   # where each result kernel-free axis is in delta
  lf_sorted = sorted(dims.w_lead_free)
  nxf = len(fshape)
  free_kernel_axes = [i for i in w_free if i not in dims.w_lead_free]
  for w in w_free:
    if w in dims.w_lead_free:
      w_free_sorted_src.append(nbt + lf_sorted.index(w))
    else:
      w_free_sorted_src.append(nbt + nbf + nxf + free_kernel_axes.index(w))
  xf_src = list(range(nbt + nbf, nbt + nbf + nxf))
  batch_src = list(range(nbt))
  order = (batch_src + w_free_sorted_src + xf_src if dims.kernel_is_lhs
           else batch_src + xf_src + w_free_sorted_src)
  return _transpose(delta, order).astype(out_dtype)


# --- s·a·b as a kernel ------------------------------------------------------

def _to_kernel_order(layout: KernelLayout) -> tuple[int, ...]:
  """Permutation from ``[*stack, *batch, *contract, *free]`` to kernel order."""
  s, nb, nc = layout.stack, len(layout.batch), len(layout.contract)
  src = {ax: s + i for i, ax in enumerate(layout.batch)}
  src.update({ax: s + nb + i for i, ax in enumerate(layout.contract)})
  src.update({ax: s + nb + nc + i for i, ax in enumerate(layout.free)})
  return tuple(range(s)) + tuple(src[i] for i in range(layout.ndim - s))


def kernel_matrix(w: jax.Array, layout: KernelLayout) -> jax.Array:
  """A (stacked, batched) kernel as float32 matrices ``[*lead, in, out]``:
  the contracted axes flattened into ``in``, the free ones into ``out``."""
  s = layout.stack
  perm = (tuple(range(s)) + tuple(s + i for i in layout.batch)
          + tuple(s + i for i in layout.contract)
          + tuple(s + i for i in layout.free))
  lead, cshape, fshape = layout.split_shape(w.shape)
  return jnp.transpose(w.astype(jnp.float32), perm).reshape(
      *lead, prod(cshape), prod(fshape))


def delta_weight(a: jax.Array, b: jax.Array, layout: KernelLayout,
                 scale: float) -> jax.Array:
  """``s·a·b`` as a float32 tensor laid out like the (stacked) kernel."""
  n = layout.lead
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  # [*lead, *c, r] x [*lead, r, *f] -> [*lead, *c, *f]
  d = lax.dot_general(a32, b32, (((a.ndim - 1,), (n,)),
                                 (tuple(range(n)), tuple(range(n)))))
  return jnp.transpose(d, _to_kernel_order(layout)) * scale


def principal_factors(w: jax.Array, layout: KernelLayout, rank: int,
                      scale: float) -> dict[str, jax.Array]:
  """PiSSA's factors: ``s·a·b`` is the best rank-``rank`` approximation of
  ``w`` (its top singular triplets, ``√S`` split between ``a`` and ``b``),
  float32, shaped ``a`` [*lead, *contract, r], ``b`` [*lead, r, *free]."""
  lead, cshape, fshape = layout.split_shape(w.shape)
  u, sv, vt = jnp.linalg.svd(kernel_matrix(w, layout), full_matrices=False)
  root = jnp.sqrt(sv[..., :rank] / scale)                      # [*lead, r]
  a = u[..., :, :rank] * root[..., None, :]
  b = vt[..., :rank, :] * root[..., :, None]
  return {'a': a.reshape(*lead, *cshape, rank),
          'b': b.reshape(*lead, rank, *fshape)}


def orthonormal_factors(w: jax.Array, layout: KernelLayout, rank: int
                        ) -> dict[str, jax.Array]:
  """OLoRA's factors (Büyükakyüz, 2024): the QR decomposition of the kernel
  as ``[out, in]``, ``W = Q·R``, gives ``b = Q[:, :r]ᵀ`` (orthonormal) and
  ``a = R[:r]ᵀ``, float32, shaped as ``principal_factors``' (PEFT's
  ``init_lora_weights='olora'``)."""
  lead, cshape, fshape = layout.split_shape(w.shape)
  q, r = jnp.linalg.qr(jnp.swapaxes(kernel_matrix(w, layout), -1, -2))
  a = jnp.swapaxes(r[..., :rank, :], -1, -2)              # [*lead, in, r]
  b = jnp.swapaxes(q[..., :, :rank], -1, -2)              # [*lead, r, out]
  return {'a': a.reshape(*lead, *cshape, rank),
          'b': b.reshape(*lead, rank, *fshape)}


def column_norm(w: jax.Array, layout: KernelLayout) -> jax.Array:
  """L2 norm over the contracted axes, one per output unit (per stacked
  layer): ``[*stack, *free]`` float32 for a layout without batch axes."""
  axes = tuple(layout.stack + c for c in layout.contract)
  w32 = w.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(w32 * w32, axis=axes))


__all__ = ['AdapterParams', 'DotDims', 'FrozenKernel', 'KernelLayout',
           'base_dot', 'column_norm', 'delta_weight', 'dropout',
           'is_kernel_node', 'kernel_dot', 'kernel_matrix', 'kernel_value',
           'layout_of', 'low_rank_dot', 'orthonormal_factors',
           'principal_factors', 'prod']
