"""Rows a function computes and never reads, left out of its jaxpr.

A classifier written as ``head(encoder(x)[:, 0])`` runs its last layer for
every token, although only the ``[CLS]`` row reaches the loss. Everything
in that layer except the keys and values is row-wise along the sequence
axis: the dense products, the LayerNorms, the residual additions, the
activations and the queries' side of the attention. In a 6-layer MiniLM
that is about 14% of the step's work.

:func:`prune` finds, in a traced function, a top-level ``slice`` that keeps
at most half of one axis (``x[:, 0]`` is ``slice`` and ``squeeze``), walks
back through the equations whose output rows along that axis depend only
on the same rows of their inputs (``_ELEMENTWISE`` and the rules in
``_in_axes``),
and traces the function again with those equations computing only the kept
rows. An equation whose output some other consumer reads in full, or that
is not row-wise (a reduction over the axis, a gather, a custom derivative,
a loop), is computed as written and sliced where the kept rows are read.
Only the amount of work changes: the values are the function's own to
float rounding, and so are the gradients (the rows left out never reached
the output). Random bits drawn inside the function are drawn whole and
sliced; adapter dropout of the LoRA rewrite (``lora_rng``), drawn when a
pruned product is evaluated, draws its mask for the kept rows only, so its
bits differ from an unpruned run's.

``jit`` calls are inlined first (their bodies, like ``jnp.where``'s, take
part in the walk); other higher-order equations are kept whole. The LoRA
rewrite (``lorajax.lora``, ``lorajax.fuse_attention``) prunes every traced
function; ``LORAJAX_DEAD_ROWS=off`` turns it off.

Example (only row 0 of the product is read):

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x, w: jnp.tanh(x @ w)[:, 0]
  >>> closed = jax.make_jaxpr(f)(jnp.ones((2, 8, 4)), jnp.ones((4, 3)))
  >>> pruned = prune(closed)
  >>> [e.outvars[0].aval.shape for e in pruned.jaxpr.eqns
  ...  if e.primitive.name == 'dot_general']
  [(2, 1, 3)]
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax import lax
import jax.extend.core as jex

from lorajax.runtime import jaxpr_view

SWITCH = 'LORAJAX_DEAD_ROWS'

# Equations whose every operand has the output's rank (or is a scalar) and
# whose output element depends only on the operands' elements at the same
# index (an operand of size 1 along an axis is broadcast along it).
_ELEMENTWISE = frozenset({
    'neg', 'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'logistic',
    'erf', 'erfc', 'erf_inv', 'sin', 'cos', 'tan', 'sqrt', 'rsqrt', 'cbrt',
    'abs', 'sign', 'floor', 'ceil', 'round', 'is_finite', 'integer_pow',
    'square', 'copy', 'copy_p', 'convert_element_type', 'reduce_precision',
    'stop_gradient', 'add', 'sub', 'mul', 'div', 'rem', 'max', 'min', 'pow',
    'atan2', 'nextafter', 'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'and', 'or',
    'not', 'xor', 'select_n', 'clamp'})
_REDUCE = frozenset({'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod',
                     'reduce_and', 'reduce_or', 'argmax', 'argmin'})

_ALL = 'all'   # a value read in full


def enabled() -> bool:
  """Unless ``LORAJAX_DEAD_ROWS`` is ``off``."""
  return os.environ.get(SWITCH, '').strip().lower() not in (
      'off', '0', 'false', 'no')


def _shape(v) -> tuple[int, ...]:
  return tuple(getattr(v.aval, 'shape', ()))


def _kept_range(eqn) -> tuple[int, int, int] | None:
  """``(axis, start, stop)`` if ``eqn`` is a ``slice`` that keeps a range
  of at most half of one axis (unit strides) and the whole of every
  other."""
  if eqn.primitive.name != 'slice':
    return None
  p = eqn.params
  if p.get('strides') not in (None, ) and any(s != 1 for s in p['strides']):
    return None
  shape = _shape(eqn.invars[0])
  cut = [(a, s, e) for a, (s, e, n) in enumerate(
      zip(p['start_indices'], p['limit_indices'], shape)) if (s, e) != (0, n)]
  if len(cut) != 1:
    return None
  # At most half the axis: a shift by one (a language model's labels,
  # ``logits[:, :-1]``) saves nothing worth tracing the function again.
  axis, start, stop = cut[0]
  return cut[0] if 2 * (stop - start) <= shape[axis] else None


def _in_axes(eqn, axis: int) -> list[int | None] | None:
  """For an equation whose output is wanted only in some rows of ``axis``:
  each operand's axis holding those rows (None: the operand is read whole,
  e.g. a bias of size 1 there, or the other side of a product), or None if
  the output's rows along ``axis`` depend on other rows of an operand."""
  name = eqn.primitive.name
  out = _shape(eqn.outvars[0])
  ins = [_shape(v) for v in eqn.invars]
  if name in _ELEMENTWISE:
    axes = []
    for shape in ins:
      if not shape:
        axes.append(None)
      elif len(shape) != len(out):
        return None
      elif shape[axis] == out[axis]:
        axes.append(axis)
      elif shape[axis] == 1:
        axes.append(None)
      else:
        return None
    return axes
  if name == 'broadcast_in_dim':
    dims = tuple(eqn.params['broadcast_dimensions'])
    if axis in dims and ins[0][dims.index(axis)] == out[axis]:
      return [dims.index(axis)] + [None] * (len(ins) - 1)
    return [None] * len(ins)
  if name == 'reshape':
    if (eqn.params.get('dimensions') is not None or len(ins) != 1
        or ins[0][:axis + 1] != out[:axis + 1]):
      return None
    return [axis]
  if name == 'transpose':
    return [eqn.params['permutation'][axis]]
  if name in _REDUCE:
    kept = [a for a in range(len(ins[0])) if a not in eqn.params['axes']]
    return [kept[axis]]
  if name == 'squeeze':
    kept = [a for a in range(len(ins[0]))
            if a not in eqn.params['dimensions']]
    return [kept[axis]]
  if name == 'slice':
    if (ins[0][axis] != out[axis]
        or (eqn.params.get('strides') or (1,) * len(out))[axis] != 1):
      return None
    return [axis]
  if name == 'dot_general':
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    if axis < len(lb):
      return [lb[axis], rb[axis]]
    lfree = [a for a in range(len(ins[0])) if a not in lc and a not in lb]
    rfree = [a for a in range(len(ins[1])) if a not in rc and a not in rb]
    j = axis - len(lb)
    if j < len(lfree):
      return [lfree[j], None]
    return [None, rfree[j - len(lfree)]]
  return None


def _params(eqn, shape: tuple[int, ...], axis: int, n: int) -> dict:
  """``eqn``'s bind parameters for an output of ``shape``."""
  p = dict(eqn.params)
  name = eqn.primitive.name
  if name == 'broadcast_in_dim':
    p['shape'] = shape
  elif name == 'reshape':
    p['new_sizes'] = shape
  elif name == 'slice':
    limits = list(p['limit_indices'])
    limits[axis] = p['start_indices'][axis] + n
    p['limit_indices'] = tuple(limits)
  return eqn.primitive.get_bind_params(p)


def _bind(eqn, invals):
  outs = eqn.primitive.bind(*invals,
                            **eqn.primitive.get_bind_params(eqn.params))
  return outs if eqn.primitive.multiple_results else [outs]


def _inline_calls(closed: jex.ClosedJaxpr) -> jex.ClosedJaxpr:
  """``closed`` traced again with every ``jit`` call's body inlined."""

  def run(jaxpr, consts, args):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if jaxpr_view.is_literal(v) else env[v]
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      body = jaxpr_view.call_body(eqn)
      outs = _bind(eqn, invals) if body is None else run(*body, invals)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  return _retrace(closed, lambda *args: run(closed.jaxpr, closed.consts,
                                            list(args)))


def _retrace(closed: jex.ClosedJaxpr, fn) -> jex.ClosedJaxpr:
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype,
                                weak_type=getattr(a, 'weak_type', False))
           for a in closed.in_avals]
  return jax.make_jaxpr(fn)(*avals)


def _whole(jaxpr, n: int) -> set[Any]:
  """The first ``n`` inputs of ``jaxpr`` and every value computed from
  them alone: never sliced (the LoRA rewrite needs a targeted kernel to
  reach its product unchanged)."""
  whole = set(jaxpr.invars[:n])
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if not jaxpr_view.is_literal(v)]
    if ins and all(v in whole for v in ins):
      whole.update(eqn.outvars)
  return whole


def _demands(jaxpr, whole: set[Any]
             ) -> tuple[dict[Any, Any], dict[int, tuple[int, int, int]],
                        set[int]]:
  """Backward over ``jaxpr``: each variable's demand (``_ALL`` or the
  ``(axis, start, stop)`` rows every reader wants), the equations computed
  on those rows only (index -> their output's rows) and the slices that
  become their operand's kept rows. No value in ``whole`` is sliced."""
  want: dict[Any, Any] = {}

  def ask(v, demand):
    if jaxpr_view.is_literal(v):
      return
    have = want.get(v)
    want[v] = demand if have in (None, demand) else _ALL

  for v in jaxpr.outvars:
    ask(v, _ALL)
  rows: dict[int, tuple[int, int, int]] = {}
  cuts: set[int] = set()
  for i in range(len(jaxpr.eqns) - 1, -1, -1):
    eqn = jaxpr.eqns[i]
    demand = [want.get(v) for v in eqn.outvars]
    kept = _kept_range(eqn)
    if (kept is not None and demand[0] is not None
        and eqn.invars[0] not in whole):
      ask(eqn.invars[0], kept)
      cuts.add(i)
      continue
    if (len(eqn.outvars) == 1 and isinstance(demand[0], tuple)
        and not eqn.effects):
      axis, start, stop = demand[0]
      axes = _in_axes(eqn, axis)
      if axes is not None and not any(
          a is not None and v in whole for v, a in zip(eqn.invars, axes)):
        rows[i] = demand[0]
        for v, a in zip(eqn.invars, axes):
          ask(v, _ALL if a is None else (a, start, stop))
        continue
    for v in eqn.invars:
      ask(v, _ALL)
  return want, rows, cuts


def prune(closed: jex.ClosedJaxpr, whole_inputs: int = 0
          ) -> jex.ClosedJaxpr | None:
  """``closed`` computing only the rows its slices read, or None if no
  equation loses a row (then nothing is traced again). Its first
  ``whole_inputs`` inputs (the parameters), and values computed from them
  alone, are never sliced: a product with a kernel's output features cut
  (``(x @ w)[..., :4]``) keeps the whole kernel."""
  if not enabled() or not any(_kept_range(e) for e in closed.jaxpr.eqns):
    return None
  if any(jaxpr_view.call_body(e) for e in closed.jaxpr.eqns):
    closed = _inline_calls(closed)
  jaxpr = closed.jaxpr
  want, rows, cuts = _demands(jaxpr, _whole(jaxpr, whole_inputs))
  if not rows:
    return None

  def run(*args):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    part: dict[Any, Any] = {}   # variables held as their kept rows only

    def read(v, rows_of=None):
      if jaxpr_view.is_literal(v):
        return v.val
      if rows_of is None:
        return env[v]
      if v in part:
        return part[v]
      axis, start, stop = rows_of
      return lax.slice_in_dim(env[v], start, stop, axis=axis)

    for i, eqn in enumerate(jaxpr.eqns):
      if i in cuts and want.get(eqn.invars[0]) == _kept_range(eqn):
        env[eqn.outvars[0]] = read(eqn.invars[0], _kept_range(eqn))
        continue
      if i in rows:
        axis, start, stop = rows[i]
        axes = _in_axes(eqn, axis)
        invals = [read(v, None if a is None else (a, start, stop))
                  for v, a in zip(eqn.invars, axes)]
        shape = list(_shape(eqn.outvars[0]))
        shape[axis] = stop - start
        out = eqn.primitive.bind(
            *invals, **_params(eqn, tuple(shape), axis, stop - start))
        part[eqn.outvars[0]] = out
        continue
      outs = _bind(eqn, [read(v) for v in eqn.invars])
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  return _retrace(closed, run)
