"""Activations that keep only their input for the backward pass.

Differentiated as written, an activation such as the exact GELU
(``0.5 x erfc(-x / sqrt 2)``) or the tanh GELU keeps several arrays of its
input's size for the backward pass: a product's factors, an ``erfc`` or
``tanh`` value. In a transformer's feed-forward block that input is the
widest activation of the layer; on a MiniLM-sized user BERT (32 × 128
tokens, float32) those residuals are 288 MB of the step's 700 MB of XLA
temporaries.

:func:`plan` finds, among a jaxpr's top-level equations, a region of
elementwise equations (``_UNARY``, ``_BINARY`` with a literal scalar, and
``jit`` calls made only of them, such as ``jax.nn.silu``) that reads one
array ``x`` and gives one array ``y`` read elsewhere, with at least one
transcendental function in it. The LoRA rewrite (``lorajax.rewrite``) then
computes ``y`` with a custom derivative that keeps ``x`` alone and runs the
region again, differentiated, in the backward pass: the values and
gradients are the region's own (the same operations), the residuals one
array. It applies on the CPU, where it was measured (other backends keep
XLA's own residuals); ``LORAJAX_ELEMENTWISE_REMAT=off`` turns it off.

Example (the exact GELU of ``flax.linen.gelu(x, approximate=False)``):

  >>> import jax, jax.numpy as jnp
  >>> gelu = lambda x: 0.5 * x * jax.lax.erfc(-x * 0.7071067811865476)
  >>> jaxpr = jax.make_jaxpr(gelu)(jnp.ones((4, 8))).jaxpr
  >>> [len(r.eqns) for r in plan(jaxpr, set())]   # mul neg mul erfc mul
  [5]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
from jax import lax
import numpy as np

from lorajax.runtime.attention_match import NoFuse
from lorajax.runtime.jaxpr_view import call_body, is_literal

SWITCH = 'LORAJAX_ELEMENTWISE_REMAT'

_UNARY = frozenset({
    'neg', 'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'logistic',
    'erf', 'erfc', 'sin', 'cos', 'sqrt', 'rsqrt', 'cbrt', 'abs', 'sign',
    'integer_pow', 'square', 'copy', 'copy_p', 'convert_element_type',
    'reduce_precision'})
_BINARY = frozenset({'add', 'sub', 'mul', 'div', 'max', 'min', 'pow'})
_TRANSCENDENTAL = frozenset({'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh',
                             'logistic', 'erf', 'erfc', 'sin', 'cos'})
_CALLS = ('jit', 'pjit', 'closed_call')


def enabled() -> bool:
  """On the CPU (where it was measured), unless ``LORAJAX_ELEMENTWISE_REMAT``
  is ``off``."""
  if os.environ.get(SWITCH, '').strip().lower() in ('off', '0', 'false',
                                                    'no'):
    return False
  return jax.default_backend() == 'cpu'



def _floating(a) -> bool:
  return jax.dtypes.issubdtype(a.aval.dtype, np.floating)


def _body(eqn):
  body = call_body(eqn, _CALLS)
  return None if body is None else body[0]


def _kind(eqn, depth: int = 0) -> str | None:
  """'plain' or 'transcendental' for an elementwise equation whose inputs
  are one shape (apart from literal scalars) and whose output has it;
  None for any other."""
  name = eqn.primitive.name
  arrays = [a for a in eqn.invars if not is_literal(a)]
  if len(eqn.outvars) != 1 or not arrays or not _floating(eqn.outvars[0]):
    return None
  shape = eqn.outvars[0].aval.shape
  if any(a.aval.shape != shape or not _floating(a) for a in arrays):
    return None
  if any(is_literal(a) and np.ndim(a.val) != 0 for a in eqn.invars):
    return None
  if name in _UNARY or name in _BINARY:
    return 'transcendental' if name in _TRANSCENDENTAL else 'plain'
  body = _body(eqn)
  if body is None or depth > 4 or body.constvars or len(arrays) != len(
      eqn.invars):
    return None
  kinds = [_kind(e, depth + 1) for e in body.eqns]
  if not kinds or None in kinds:
    return None
  return 'transcendental' if 'transcendental' in kinds else 'plain'


def _size(eqn) -> int:
  body = _body(eqn)
  return 1 if body is None else sum(_size(e) for e in body.eqns)


@dataclasses.dataclass
class Region:
  """One region found by :func:`plan`: equations ``eqns`` (top-level
  indices, in order) read ``x`` and give ``y``."""
  x: Any
  y: Any
  eqns: list[int]
  jaxpr: Any = dataclasses.field(repr=False)

  @property
  def tops(self) -> list[int]:
    return self.eqns

  def compute(self, read: Callable[[Any], Any]) -> list[Any]:
    """``[y]`` through the custom derivative. ``read(var)`` gives a
    top-level variable's value.

    Raises:
      NoFuse: ``x`` is not an array here (a targeted kernel).
    """
    x = read(self.x)
    if not isinstance(x, (jax.Array, np.ndarray)):
      raise NoFuse(type(x).__name__)
    return [_recomputed(self._apply)(x)]

  def _apply(self, x):
    env = {self.x: x}

    def value(a):
      return a.val if is_literal(a) else env[a]

    for i in self.eqns:
      eqn = self.jaxpr.eqns[i]
      out = eqn.primitive.bind(*[value(a) for a in eqn.invars],
                               **eqn.primitive.get_bind_params(eqn.params))
      env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results
                     else [out]))
    return env[self.y]


def _recomputed(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """``f`` with a derivative that keeps its input and runs ``f`` again."""

  @jax.custom_vjp
  def g(x):
    return f(x)

  def fwd(x):
    return f(x), x

  def bwd(x, ct):
    # Tied to the cotangent, so that XLA does not move the recomputation
    # into the forward pass and keep its results alive in between.
    x, ct = lax.optimization_barrier((x, ct))
    return jax.vjp(f, x)[1](ct)

  g.defvjp(fwd, bwd)
  return g


def plan(jaxpr, taken: set[int]) -> list[Region]:
  """The regions among ``jaxpr``'s top-level equations, none of them using
  an equation in ``taken``."""
  eqns = jaxpr.eqns
  kinds = [None if i in taken else _kind(e) for i, e in enumerate(eqns)]
  uses: dict[Any, list[int]] = {}
  for i, e in enumerate(eqns):
    for a in e.invars:
      if not is_literal(a):
        uses.setdefault(a, []).append(i)
  outs = {v for v in jaxpr.outvars if not is_literal(v)}
  found, used = [], set()
  for i, e in enumerate(eqns):
    if kinds[i] is None or i in used:
      continue
    arrays = {a for a in e.invars if not is_literal(a)}
    if len(arrays) != 1:
      continue
    x = arrays.pop()
    region, have = [i], {x, e.outvars[0]}
    for j in range(i + 1, len(eqns)):
      ins = [a for a in eqns[j].invars if not is_literal(a)]
      if kinds[j] is not None and j not in used and all(a in have
                                                         for a in ins):
        region.append(j)
        have.add(eqns[j].outvars[0])
    made = {eqns[j].outvars[0] for j in region}
    leaving = [v for v in made if v in outs or any(
        u not in region for u in uses.get(v, []))]
    if (len(leaving) != 1 or sum(_size(eqns[j]) for j in region) < 2
        or 'transcendental' not in {kinds[j] for j in region}
        or eqns[region[-1]].outvars[0] is not leaving[0]):
      continue
    found.append(Region(x=x, y=leaving[0], eqns=region, jaxpr=jaxpr))
    used |= set(region)
  return found
