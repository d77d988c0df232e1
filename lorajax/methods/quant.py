"""Quantized frozen kernels: NF4 (QLoRA) and int8, stored packed.

A quantized kernel is a ``FrozenKernel`` pytree node that stands where the
float kernel stood in the parameter tree, so ``lorajax.partition`` and
``flatten_paths`` see it as one leaf and ``jax.jit`` takes its packed arrays
as arguments. The rewrite hands it to the kernel's provider at the
``dot_general``, which computes ``x·dequant(W)`` (``Quantized``) or
``x·dequant(W) + s·(x·a)·b`` (``QLora``, or ``Lora`` on a quantized kernel).

The dequantized kernel is formed in the function's compute dtype at the
product, under a ``custom_vjp`` whose backward pass (``dx = g·Wᵀ``) rebuilds
it from the codes instead of keeping it alive from the forward pass, so a
training step holds about one layer's dense kernel at a time, never a dense
copy of the base (``tests/test_methods.py`` checks XLA's memory analysis).

Formats (both keep any leading scanned-layer axes, so ``nn.scan`` slices a
quantized kernel like a float one):

- ``Nf4Kernel``: the per-layer kernel flattened (row-major) into blocks of
  64 values; each value is the index of the nearest of the 16 NF4 levels
  after dividing by its block's absmax; two 4-bit indices per byte (first in
  the high nibble). Double quantization (QLoRA): the float32 absmax values
  minus their mean are stored as int8 with one float32 scale per 256
  blocks. 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per parameter.
- ``Int8Kernel``: symmetric int8 with one float32 absmax scale per output
  unit (per entry of the kernel's non-contracted axes).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from lorajax import spec as spec_lib
from lorajax import kernels

# The 16 NF4 levels of QLoRA (Dettmers et al., 2023): quantiles of N(0, 1),
# 8 positive and 7 negative, with an exact zero, normalized to [-1, 1].
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
METHODS = ('nf4', 'int8')


def _ceil_to(n: int, m: int) -> int:
  return -(-n // m) * m


class QuantizedKernel(spec_lib.FrozenKernel):
  """Shared behaviour of the quantized nodes: the memory-aware product."""

  method = ''  # 'nf4' or 'int8' in subclasses.

  def dequantize(self, dtype: Any = None) -> jax.Array:
    raise NotImplementedError

  def quantize_like(self, w: jax.Array) -> 'QuantizedKernel':
    """Quantizes a dense kernel of this node's shape with its settings."""
    raise NotImplementedError

  def dot(self, x: jax.Array, dims: spec_lib.DotDims) -> jax.Array:
    dtype = jnp.dtype(dims.kernel_dtype or self.aval().dtype)
    return _quantized_dot(x, self, (dims, dtype, x.shape, jnp.dtype(x.dtype)))


def _tied(node: QuantizedKernel, like: jax.Array) -> QuantizedKernel:
  """``node`` with its arrays made data-dependent on ``like``.

  The values do not change (unless ``like`` starts with a NaN), but XLA can
  neither compute the dequantized kernel before ``like`` exists nor merge
  the forward and backward dequantizations into one buffer kept alive in
  between (it drops optimization barriers on some backends).
  """
  if not like.size:
    return node
  first = like.reshape(-1)[0]
  poison = first != first  # pylint: disable=comparison-with-itself

  def tie(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.where(poison, jnp.nan, leaf).astype(leaf.dtype)
    return jnp.where(poison, jnp.zeros((), leaf.dtype), leaf)

  return jax.tree_util.tree_map(tie, node)


def _product(x, node, static):
  dims, dtype, _, _ = static
  return kernels.base_dot(x, _tied(node, x).dequantize(dtype), dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantized_dot(x, node, static):
  """``x ⊗ dequant(node)``; the backward pass dequantizes again."""
  return _product(x, node, static)


def _quantized_dot_fwd(x, node, static):
  return _product(x, node, static), node


def _quantized_dot_bwd(static, node, g):
  dims, dtype, x_shape, x_dtype = static
  w = _tied(node, g).dequantize(dtype)
  transpose = jax.linear_transpose(
      lambda x: kernels.base_dot(x, w, dims),
      jax.ShapeDtypeStruct(x_shape, x_dtype))
  (dx,) = transpose(g)
  return dx, None


_quantized_dot.defvjp(_quantized_dot_fwd, _quantized_dot_bwd)


@struct.dataclass
class Nf4Kernel(QuantizedKernel):
  """A kernel stored as 4-bit NormalFloat codes with block-wise scales.

  Attributes:
    codes: uint8 ``[*stack, n_pad // 2]``; two level indices per byte.
    absmax: per-block scales ``[*stack, n_blocks]``: int8 codes with double
      quantization, else float32.
    group_scale: float32 ``[*stack, n_groups]`` second-level scales, or None.
    offset: float32 ``[*stack]`` mean absmax added back, or None.
    shape: the per-layer kernel shape (static).
    dtype: the dtype of the original kernel (static).
    block_size: values per absmax block (static).
    group_size: blocks per second-level scale (static).
  """
  codes: jax.Array
  absmax: jax.Array
  group_scale: jax.Array | None
  offset: jax.Array | None
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  dtype: Any = struct.field(pytree_node=False)
  block_size: int = struct.field(pytree_node=False, default=64)
  group_size: int = struct.field(pytree_node=False, default=256)

  method = 'nf4'

  def aval(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(self.codes.shape[:-1]) + self.shape,
                                self.dtype)

  def block_scales(self) -> jax.Array:
    """The float32 absmax of every block, ``[*stack, n_blocks]``."""
    if self.group_scale is None:
      return self.absmax.astype(jnp.float32)
    stack, n_blocks = self.absmax.shape[:-1], self.absmax.shape[-1]
    n_groups = self.group_scale.shape[-1]
    q = jnp.pad(self.absmax.astype(jnp.float32),
                [(0, 0)] * len(stack)
                + [(0, n_groups * self.group_size - n_blocks)])
    q = q.reshape(*stack, n_groups, self.group_size)
    d = q * (self.group_scale[..., None] / 127.0)
    d = d.reshape(*stack, n_groups * self.group_size)[..., :n_blocks]
    return d + self.offset[..., None]

  def dequantize(self, dtype: Any = None) -> jax.Array:
    stack = self.codes.shape[:-1]
    idx = jnp.stack([self.codes >> 4, self.codes & 15], axis=-1)
    idx = idx.reshape(*stack, -1, self.block_size)
    vals = jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32))
    vals = vals * self.block_scales()[..., None]
    n = math.prod(self.shape)
    vals = vals.reshape(*stack, -1)[..., :n].reshape(*stack, *self.shape)
    return vals.astype(dtype or self.dtype)

  def quantize_like(self, w):
    return quantize_nf4(w, stack=self.codes.ndim - 1,
                        block_size=self.block_size,
                        double_quant=self.group_scale is not None,
                        group_size=self.group_size)


@struct.dataclass
class Int8Kernel(QuantizedKernel):
  """A kernel stored as int8 with a float32 absmax scale per output unit.

  Attributes:
    codes: int8, the kernel's shape.
    scale: float32, the kernel's shape with the contracted axes of size 1.
    dtype: the dtype of the original kernel (static).
  """
  codes: jax.Array
  scale: jax.Array
  dtype: Any = struct.field(pytree_node=False)

  method = 'int8'

  def aval(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(self.codes.shape), self.dtype)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    w = self.codes.astype(jnp.float32) * self.scale
    return w.astype(dtype or self.dtype)

  def quantize_like(self, w):
    axes = tuple(i for i, n in enumerate(self.scale.shape)
                 if n == 1 and self.codes.shape[i] != 1)
    return quantize_int8(w, contract_axes=axes)


@functools.partial(jax.jit, static_argnames=('stack', 'block_size',
                                             'double_quant', 'group_size'))
def quantize_nf4(w: jax.Array, *, stack: int = 0, block_size: int = 64,
                 double_quant: bool = True, group_size: int = 256
                 ) -> Nf4Kernel:
  """Quantizes a (stacked) kernel to NF4.

  Args:
    w: the kernel; its first ``stack`` axes are scanned layers, each
      quantized on its own.
    stack: number of leading stacked axes.
    block_size: values per absmax block (even).
    double_quant: store the block absmax values as int8 (minus their mean)
      with a float32 scale per ``group_size`` blocks.
    group_size: blocks per second-level scale.

  Returns:
    An ``Nf4Kernel``. Codes are chosen against the scales that dequantizing
    will use (after double quantization), so that error is not compounded.
  """
  if block_size < 2 or block_size % 2:
    raise ValueError(f'NF4 block_size must be even and >= 2, got '
                     f'{block_size}')
  lead, shape = tuple(w.shape[:stack]), tuple(w.shape[stack:])
  n = math.prod(shape)
  n_pad = _ceil_to(n, block_size)
  flat = jnp.asarray(w, jnp.float32).reshape(*lead, n)
  flat = jnp.pad(flat, [(0, 0)] * stack + [(0, n_pad - n)])
  blocks = flat.reshape(*lead, n_pad // block_size, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  group_scale = offset = None
  stored = absmax
  if double_quant:
    n_blocks = absmax.shape[-1]
    n_groups = -(-n_blocks // group_size)
    offset = jnp.mean(absmax, axis=-1)
    d = jnp.pad(absmax - offset[..., None],
                [(0, 0)] * stack + [(0, n_groups * group_size - n_blocks)])
    d = d.reshape(*lead, n_groups, group_size)
    group_scale = jnp.max(jnp.abs(d), axis=-1)
    safe = jnp.where(group_scale > 0, group_scale, 1.0)[..., None]
    q = jnp.clip(jnp.round(d / safe * 127.0), -127, 127).astype(jnp.int8)
    stored = q.reshape(*lead, n_groups * group_size)[..., :n_blocks]
  node = Nf4Kernel(codes=jnp.zeros((*lead, n_pad // 2), jnp.uint8),
                   absmax=stored, group_scale=group_scale, offset=offset,
                   shape=shape, dtype=jnp.dtype(w.dtype),
                   block_size=block_size, group_size=group_size)
  scales = node.block_scales()[..., None]
  normalized = jnp.where(scales > 0, blocks / jnp.where(scales > 0, scales, 1),
                         0.0)
  idx = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normalized.reshape(-1))
  idx = idx.astype(jnp.uint8).reshape(*lead, n_pad // 2, 2)
  return node.replace(codes=(idx[..., 0] << 4) | idx[..., 1])


def quantize_int8(w: jax.Array, *, contract_axes: Sequence[int] = (0,)
                  ) -> Int8Kernel:
  """Quantizes a kernel to int8 with one absmax scale per output unit.

  Args:
    w: the kernel.
    contract_axes: axes of ``w`` reduced for each scale (the input axes;
      stacked and output axes keep their own scales).

  Returns:
    An ``Int8Kernel``; the round-trip error is at most half a scale step.
  """
  return _quantize_int8(w, tuple(int(a) for a in contract_axes))


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_int8(w: jax.Array, contract_axes: tuple[int, ...]
                   ) -> Int8Kernel:
  w32 = jnp.asarray(w, jnp.float32)
  absmax = jnp.max(jnp.abs(w32), axis=contract_axes, keepdims=True)
  scale = absmax / 127.0
  codes = jnp.round(w32 / jnp.where(scale > 0, scale, 1.0))
  return Int8Kernel(codes=jnp.clip(codes, -127, 127).astype(jnp.int8),
                    scale=scale, dtype=jnp.dtype(w.dtype))


def quantize(w: jax.Array, method: str, layout: spec_lib.KernelLayout, *,
             block_size: int = 64, double_quant: bool = True
             ) -> QuantizedKernel:
  """Quantizes a kernel used as ``layout`` with ``method`` ('nf4'|'int8')."""
  if method == 'nf4':
    return quantize_nf4(w, stack=layout.stack, block_size=block_size,
                        double_quant=double_quant)
  if method == 'int8':
    return quantize_int8(
        w, contract_axes=tuple(layout.stack + c for c in layout.contract))
  raise ValueError(f'quantization method {method!r}; expected one of '
                   f'{METHODS}')


def bits_per_param(node: QuantizedKernel) -> float:
  """Stored bits per kernel entry, scales included."""
  nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(node))
  return 8.0 * nbytes / math.prod(node.aval().shape)


def quantized_nbytes(params: Any) -> int:
  """Bytes of a parameter tree as stored: packed codes and scales for
  quantized kernels, ``nbytes`` for every other array."""
  return int(sum(np.asarray(x).nbytes if not hasattr(x, 'nbytes')
                 else x.nbytes for x in jax.tree_util.tree_leaves(params)))


@jax.jit
def _dequantize(node: spec_lib.FrozenKernel) -> jax.Array:
  return node.dequantize()


def dequantize_params(params: Any) -> Any:
  """Replaces every quantized kernel by its dense dequantized array."""
  return jax.tree_util.tree_map(
      lambda x: (_dequantize(x) if isinstance(x, spec_lib.FrozenKernel)
                 else x), params, is_leaf=spec_lib.is_kernel_node)
