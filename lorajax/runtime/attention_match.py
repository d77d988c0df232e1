"""An attention chain found in a jaxpr, computed by the fused CPU kernel.

``lorajax.runtime.attention_pattern`` finds the chain (scores, scale, mask,
softmax, weighted values) and records it as a :class:`Match`: the operands,
their named axes, the constant scale and the mask. ``Match.compute`` reads
the operands' values, lays them out as ``[B', T, H', D]`` and calls
``lorajax.runtime.cpu_attention.attention``, then puts the result back in
the layout of the chain's last product. :class:`NoFuse` sends the chain back
to XLA when an operand cannot take this path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lorajax.runtime import cpu_attention
from lorajax.runtime.jaxpr_view import FlatEqn, is_literal

_F32 = np.dtype(np.float32)


class NoFuse(Exception):
  """At evaluation: an input of a found chain or region cannot take the
  fused path (e.g. it is a targeted kernel); the equations run as traced."""


@dataclasses.dataclass
class Match:
  """One attention chain found by :func:`plan`."""
  q: Any                   # canonical variables of the operands
  k: Any
  v: Any
  q_axes: dict[str, int]   # logical axis -> the operand's axis
  k_axes: dict[str, int]
  v_axes: dict[str, int]
  batch: list[str]         # logical batch axes of the scores, e.g. b0, b1
  out_names: list[str]     # the final product's axes, logically
  out_var: Any             # canonical output variable
  scale: float             # the constant factor of the scores
  scale_vars: list         # (variable, 'mul' | 'div'): traced factors
  mask: Any                # canonical boolean variable, or None
  mask_names: list[str]    # its axes, logically ('_' for a size-1 axis)
  mask_visible: bool       # True: where mask, the score is kept
  mask_eqns: list[FlatEqn]    # equations to run to get mask (inside tops)
  consts: dict = dataclasses.field(repr=False)    # of inlined calls
  exposed: dict = dataclasses.field(repr=False)   # canonical -> top level
  tops: list[int] = dataclasses.field(default_factory=list)
  final: int = -1
  final_outvars: list = dataclasses.field(default_factory=list)

  def compute(self, read: Callable[[Any], Any]) -> list[Any]:
    """The values of the final top-level equation's outputs (only those
    that are the attention's output are read later; the rest are unused).

    ``read(var)`` gives a top-level variable's value.

    Raises:
      NoFuse: an operand is not a float32 array here.
    """
    local: dict[Any, Any] = {}

    def value(a):
      if is_literal(a):
        return a.val
      if a in local:
        return local[a]
      if a in self.consts:
        return self.consts[a]
      x = read(self.exposed.get(a, a))
      if not isinstance(x, (jax.Array, np.ndarray, np.generic, float, int,
                            bool)):
        raise NoFuse(f'{a} is a {type(x).__name__}')
      return x

    for e in self.mask_eqns:
      eqn = e.eqn
      outs = eqn.primitive.bind(*[value(a) for a in e.ins],
                                **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
      local.update(zip(e.outs, outs))

    q, k, v = value(self.q), value(self.k), value(self.v)
    if any(jnp.result_type(x) != _F32 for x in (q, k, v)):
      raise NoFuse('not float32')
    for var, op in self.scale_vars:
      c = jnp.asarray(value(var), jnp.float32)
      q = q * c if op == 'mul' else q / c
    sizes = {}
    for x, axes in ((q, self.q_axes), (k, self.k_axes), (v, self.v_axes)):
      for name, ax in axes.items():
        sizes[name] = x.shape[ax]
    groups = self._groups(value)
    bh, hh = groups['B'], groups['H']
    q4 = _arrange(q, self.q_axes, [bh, ['t'], hh, ['d']])
    k4 = _arrange(k, self.k_axes, [bh, ['s'], hh, ['d']])
    v4 = _arrange(v, self.v_axes, [bh, ['s'], hh, ['d']])
    mask = groups['mask']
    o = cpu_attention.attention(q4, k4, v4, mask, scale=self.scale)
    # [B', T, H', D] -> the final product's own layout.
    named = o.reshape([sizes[n] for n in bh] + [sizes['t']]
                      + [sizes[n] for n in hh] + [sizes['d']])
    order = bh + ['t'] + hh + ['d']
    out = jnp.transpose(named, [order.index(n) for n in self.out_names])
    return [out if v == self.out_var else None for v in self.final_outvars]

  def _groups(self, value) -> dict[str, Any]:
    """The kernel's sequence and head axes, and its ``[B', S]`` or
    ``[B', T, S]`` float mask."""
    full = {}
    for x, axes in ((self.q, self.q_axes), (self.k, self.k_axes)):
      for name, ax in axes.items():
        full[name] = x.aval.shape[ax]
    if self.mask is None:
      bh, hh = list(self.batch[:1]), list(self.batch[1:])
      b = math.prod(full[n] for n in bh)
      return {'B': bh, 'H': hh, 'mask': jnp.ones((b, full['s']), jnp.float32)}
    m = jnp.asarray(value(self.mask))
    if not self.mask_visible:
      m = jnp.logical_not(m)
    # Name the mask's axes; size-1 axes ('_') are dropped.
    keep = [i for i, n in enumerate(self.mask_names) if n != '_']
    m = m.reshape([m.shape[i] for i in keep])
    names = [self.mask_names[i] for i in keep]
    varies = [n for n, size in zip(names, m.shape) if size > 1]
    vary_b = [n for n in self.batch if n in varies]
    if len(vary_b) <= 1:
      rest = [n for n in self.batch if n not in vary_b]
      bh = vary_b + rest[:1] if not vary_b else vary_b
      hh = [n for n in self.batch if n not in bh]
    else:   # a mask per head: every head its own sequence
      bh, hh = list(self.batch), []
    target = bh + (['t'] if 't' in varies else []) + ['s']
    # Broadcast to the target's full sizes, then group.
    for n in target:
      if n not in names:
        m = m[..., None]
        names = names + [n]
    m = jnp.transpose(m, [names.index(n) for n in target])
    m = jnp.broadcast_to(m, [full[n] for n in target])
    b = math.prod(full[n] for n in bh)
    m = m.reshape((b,) + m.shape[len(bh):])
    return {'B': bh, 'H': hh, 'mask': m.astype(jnp.float32)}


def _arrange(x, axes: dict[str, int], groups: list[list[str]]):
  """``x`` with its named axes transposed into ``groups`` order and each
  group merged into one axis (an empty group is an axis of size 1)."""
  order = [axes[n] for g in groups for n in g]
  x = jnp.transpose(x, order)
  shape, i = [], 0
  for g in groups:
    shape.append(math.prod(x.shape[i:i + len(g)]))
    i += len(g)
  return x.reshape(shape)
