"""QLoRA: a quantized frozen base, with or without LoRA on top.

Two providers and the functions that put a base into quantized form:

- ``Quantized(quant)``: the kernel is only dequantized at its
  ``dot_general`` (``x·dequant(W)``); no trainable parameters.
- ``QLora(rank, alpha, ..., quant='nf4')``: ``x·dequant(W) + s·(x·a)·b``. A
  plain ``Lora`` on a quantized kernel computes the same; ``QLora`` also says
  how ``quantize_params`` quantizes its kernels.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'q_proj': {'kernel': jnp.ones((64, 8))},
  ...           'k_proj': {'kernel': jnp.ones((64, 8))}}
  >>> spec = lorajax.LoraSpec([(r'q_proj/kernel', QLora(rank=2)),
  ...                          (r'k_proj/kernel', Quantized()),
  ...                          (r'.*', 'freeze')])
  >>> qparams = quantize_params(params, spec)
  >>> adapters = lorajax.init(spec, qparams, jax.random.key(0))
  >>> fn = lambda p, x: x @ p['q_proj']['kernel'] + x @ p['k_proj']['kernel']
  >>> lorajax.lora(fn, spec)(qparams, adapters, jnp.ones((1, 64)))[0, :2]
  Array([128., 128.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from lorajax import rewrite
from lorajax import spec as spec_lib
from lorajax import kernels
from lorajax.methods import loftq as loftq_lib
from lorajax.methods import low_rank
from lorajax.methods import quant

PyTree = Any


def _check_method(method: str) -> None:
  if method not in quant.METHODS:
    raise ValueError(f'quantization method {method!r}; expected one of '
                     f'{quant.METHODS}')


def _need_quantized(kernel: Any, who: str) -> None:
  if not isinstance(kernel, quant.QuantizedKernel):
    shape = tuple(getattr(kernel, 'shape', ()))
    raise ValueError(
        f'{who} got a dense kernel of shape {shape}; quantize the base first: '
        f'params = lorajax.quantize_params(params, spec)')


@dataclasses.dataclass(frozen=True)
class Quantized(spec_lib.Adapter):
  """A frozen kernel stored quantized: ``y = x·dequant(W)``.

  Attributes:
    quant: ``'nf4'`` (4-bit NormalFloat, block-wise absmax) or ``'int8'``
      (absmax per output unit).
    block_size: NF4 values per absmax block.
    double_quant: NF4 absmax values stored as int8 with a second-level
      scale per 256 blocks.
  """
  quant: str = 'nf4'
  block_size: int = 64
  double_quant: bool = True

  supports_batch = False

  has_params = False

  def __post_init__(self):
    _check_method(self.quant)

  def quantize(self, w: jax.Array, layout: spec_lib.KernelLayout
               ) -> quant.QuantizedKernel:
    return quant.quantize(w, self.quant, layout, block_size=self.block_size,
                          double_quant=self.double_quant)

  def param_shapes(self, kernel_shape, layout):
    del kernel_shape, layout
    return {}

  def init_params(self, key, kernel, layout):
    del key, kernel, layout
    return {}

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del params, rng, context
    _need_quantized(kernel, 'Quantized')
    return kernel.dot(x, dims)

  def merge(self, kernel, params, layout):
    del params, layout
    return kernels.kernel_value(kernel)


@dataclasses.dataclass(frozen=True)
class QLora(low_rank.Lora):
  """LoRA on a quantized frozen kernel: ``x·dequant(W) + s·(x·a)·b``.

  Attributes (besides ``Lora``'s rank, alpha, use_rslora, dropout, init):
    quant: ``'nf4'`` or ``'int8'``, used by ``quantize_params``.
    block_size: NF4 values per absmax block.
    double_quant: NF4 double quantization of the block scales.
    loftq_iter: with ``init='loftq'`` (``lorajax.methods.loftq``), the
      alternations of quantization and SVD that choose the quantized kernel
      and the starting factors together; ``lorajax.init`` must then see the
      float kernel.
  """
  quant: str = 'nf4'
  block_size: int = 64
  double_quant: bool = True
  loftq_iter: int = 1

  supports_batch = False

  def __post_init__(self):
    super().__post_init__()
    _check_method(self.quant)
    if self.init in low_rank.RESIDUAL_INITS:
      raise ValueError(f'QLora does not take init={self.init!r}: the '
                       'residual kernel would have to be re-quantized; use '
                       'Lora')
    if (isinstance(self.loftq_iter, bool)
        or not isinstance(self.loftq_iter, (int, np.integer))
        or self.loftq_iter < 1):
      raise ValueError(f'QLora loftq_iter must be an integer >= 1, got '
                       f'{self.loftq_iter!r}')
    if self.loftq_iter != 1 and self.init != 'loftq':
      raise ValueError(f'QLora loftq_iter={self.loftq_iter} is read only '
                       f"with init='loftq', not init={self.init!r}")

  def _loftq(self, w, layout, *, factors: bool):
    return loftq_lib.loftq(
        w, layout, method=self.quant, block_size=self.block_size,
        double_quant=self.double_quant, rank=self.rank, scale=self.scale,
        num_iter=self.loftq_iter, factors=factors)

  def quantize(self, w: jax.Array, layout: spec_lib.KernelLayout
               ) -> quant.QuantizedKernel:
    if self.init == 'loftq':
      return self._loftq(w, layout, factors=False)[0]
    return quant.quantize(w, self.quant, layout, block_size=self.block_size,
                          double_quant=self.double_quant)

  def init_params(self, key, kernel, layout):
    if self.init != 'loftq':
      return super().init_params(key, kernel, layout)
    loftq_lib.check_float(kernel, 'QLora')
    return self._loftq(kernel, layout, factors=True)[1]

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    _need_quantized(kernel, 'QLora')
    return super().dot(x, kernel, params, dims, rng=rng, context=context)


def _ndim(leaf: Any) -> int:
  if isinstance(leaf, spec_lib.FrozenKernel):
    return len(leaf.aval().shape)
  return np.ndim(leaf)


def _targets(params: PyTree, spec_or_rules: Any, method: str | None
             ) -> dict[str, Any]:
  """path -> the provider (or ``Quantized(method)``) that quantizes it."""
  if isinstance(spec_or_rules, spec_lib.LoraSpec):
    out = {}
    for path, provider in spec_lib.resolve(spec_or_rules, params
                                           ).adapted.items():
      if hasattr(provider, 'quantize'):
        out[path] = provider
      elif method is not None:
        out[path] = Quantized(method)
    return out
  if method is None:
    raise ValueError('quantize_params with regex rules needs method= '
                     "('nf4' or 'int8')")
  patterns = [p if isinstance(p, str) else p[0] for p in spec_or_rules]
  leaves = spec_lib.flatten_paths(params)
  out = {}
  for pattern in patterns:
    hits = [path for path, leaf in leaves
            if re.fullmatch(pattern, path) and _ndim(leaf) >= 2]
    if not hits:
      kernels = [p for p, leaf in leaves if _ndim(leaf) >= 2]
      raise ValueError(f'quantization rule {pattern!r} matches no kernel; '
                       f'kernels: ' + ', '.join(kernels[:64]))
    out.update({path: Quantized(method) for path in hits if path not in out})
  return out


def quantize_params(params: PyTree, spec_or_rules: Any,
                    method: str | None = None, *,
                    fn: Callable[..., Any] | None = None,
                    args: tuple[Any, ...] = (),
                    kwargs: dict[str, Any] | None = None) -> PyTree:
  """Replaces the targeted kernels by quantized nodes.

  Args:
    params: the parameter tree.
    spec_or_rules: a ``LoraSpec`` (its ``Quantized``/``QLora`` kernels are
      quantized with their own settings; with ``method``, its other adapted
      kernels too), or a sequence of regexes (or ``(regex, action)`` pairs)
      naming the kernels to quantize with ``method``.
    method: ``'nf4'`` or ``'int8'``.
    fn, args, kwargs: the function that uses the kernels and example inputs,
      needed for kernels of more than two axes (to know which axes are
      stacked layers and which are contracted), as for ``lorajax.init``.

  Returns:
    ``params`` with quantized kernels; already quantized ones are kept.

  Raises:
    ValueError: unknown method, a rule that matches no kernel, or a kernel
      of more than two axes without ``fn``.
  """
  if method is not None:
    _check_method(method)
  targets = _targets(params, spec_or_rules, method)
  leaves = dict(spec_lib.flatten_paths(params))
  targets = {p: q for p, q in targets.items()
             if not isinstance(leaves[p], spec_lib.FrozenKernel)}
  layouts = {}
  if fn is not None and targets:
    probe = spec_lib.LoraSpec([(re.escape(p), Quantized()) for p in targets]
                              + [(r'.*', spec_lib.FREEZE)])
    layouts = rewrite.discover_layouts(fn, probe, params, *args,
                                       **(kwargs or {}))

  def convert(keypath, leaf):
    path = spec_lib.path_str(keypath)
    if path not in targets:
      return leaf
    if path in layouts:
      layout = layouts[path]
    elif np.ndim(leaf) == 2:
      layout = spec_lib.KernelLayout.dense()
    else:
      raise ValueError(
          f'{path!r} has shape {np.shape(leaf)}: pass fn= and args= to '
          f'quantize_params so its stacked and input axes are known')
    return targets[path].quantize(leaf, layout)

  return jax.tree_util.tree_map_with_path(convert, params,
                                          is_leaf=spec_lib.is_kernel_node)


def quantized_paths(params: PyTree) -> list[str]:
  """The paths that hold quantized kernels."""
  return [p for p, leaf in spec_lib.flatten_paths(params)
          if isinstance(leaf, quant.QuantizedKernel)]

