"""Finds softmax attention in a jaxpr, for the fused CPU kernel.

A user's own model writes its attention with ``jnp.einsum``, ``jnp.where``
and ``jax.nn.softmax`` (Flax's ``nn.MultiHeadDotProductAttention`` does the
same). Traced, that is a chain of equations::

  scores = dot_general(q, k)              contracting the head dim
  scores = scores * c  or  scores / c     optional, c a scalar (any number)
  scores = transpose(scores)              optional, any number
  scores = select_n(pred, fill, scores)   optional: jnp.where(pred, scores,
                                          fill), fill a constant <= -1e9
  probs  = exp(scores - max(scores)) / sum(exp(...))   over the key axis
  out    = dot_general(probs, v)          contracting the key axis

:func:`plan` finds such chains, through ``jit`` and ``custom_jvp`` calls, when
every value in a chain is used only by the next step of it (nothing else
reads the scores or the probabilities) and all of it is float32. The LoRA
rewrite (``lorajax.rewrite``) then computes ``out`` with
``lorajax.runtime.cpu_attention.attention`` in one call instead of the chain,
and leaves everything else as traced. ``pred`` may be any boolean array
broadcast to the scores: ``[B, S]``, ``[B, T, S]``, ``[T, S]`` for a causal
mask, or one per head (each head is then its own sequence in the kernel).
An additive bias, a softcap, dropout on the probabilities or a fill of
``-inf`` (which makes a query with no key NaN, where the kernel gives
uniform weights) leave the chain to XLA. Even a bias that is 0 or
float32's lowest value (Hugging Face's Flax attention) does: where a query
sees no key, XLA's derivative of ``s + bias`` passes gradient to the
hidden scores and the kernel's (like ``jnp.where``'s) does not.

The values are those of the chain to float rounding: masked scores become
float32's lowest value in the kernel, which gives the same probabilities as
any fill <= -1e9 (their ``exp`` underflows to 0, and a row with no visible
key is uniform in both).

Example:

  >>> import jax, jax.numpy as jnp
  >>> def attend(q, k, v, mask):
  ...   s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / 4.0
  ...   s = jnp.where(mask[:, None, None, :], s, -1e9)
  ...   return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)
  >>> x = jnp.ones((2, 8, 4, 16))
  >>> jaxpr = jax.make_jaxpr(attend)(x, x, x, jnp.ones((2, 8), bool)).jaxpr
  >>> found = plan(jaxpr)
  >>> len(found.finals), found.finals[max(found.finals)].scale
  (1, 0.25)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.extend.core as jex
import numpy as np

from lorajax.runtime import jaxpr_view
from lorajax.runtime.attention_match import Match
from lorajax.runtime.jaxpr_view import Flat, FlatEqn, is_literal

# Equations whose bodies the rewrite evaluates itself when a chain is inside.
_ENTERED = jaxpr_view.LOOKED_THROUGH + ('scan', 'remat', 'remat2',
                                        'checkpoint', 'cond')
# A masked score's fill must be at most this (see the module docstring).
FILL_LIMIT = -1e9
_F32 = np.dtype(np.float32)


def _scalar(flat: Flat, a) -> Any:
  """A Python float if ``a`` is a constant with one value (a literal, a
  constant, or a cast or broadcast of one), else None."""
  a = flat.canon(a)
  while (e := flat.made_by(a, 'convert_element_type', 'broadcast_in_dim')):
    a = e.ins[0]
  if is_literal(a):
    value = np.asarray(a.val)
  elif a in flat.consts:
    value = np.asarray(flat.consts[a])
  else:
    return None
  return float(value.reshape(-1)[0]) if value.size == 1 else None


@dataclasses.dataclass
class Plan:
  """Where to fuse in one jaxpr's top-level equations."""
  finals: dict[int, Match]   # the equation that yields a chain's output
  deferred: set[int]         # the chain's other equations (never run)
  calls: set[int]            # calls, scans, remats, conds with a chain
                             # further down

  def __bool__(self):
    return bool(self.finals or self.calls)


def _dims(eqn):
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  return tuple(lc), tuple(rc), tuple(lb), tuple(rb)


def _f32(a) -> bool:
  return not is_literal(a) and np.dtype(a.aval.dtype) == _F32


def _free(rank, contract, batch):
  return [i for i in range(rank) if i not in contract and i not in batch]


def _match(flat: Flat, i: int) -> tuple[Match, list[int]] | None:
  """The chain starting at the scores product ``flat.eqns[i]``, and the
  indices of its equations; None if the equations after it are not one."""
  e = flat.eqns[i]
  if e.eqn.params.get('preferred_element_type') not in (None, _F32):
    return None
  lc, rc, lb, rb = _dims(e.eqn)
  lhs, rhs = e.ins
  nb = len(lb)
  if (len(lc) != 1 or nb > 2 or not (_f32(lhs) and _f32(rhs))
      or lhs.aval.ndim != nb + 2 or rhs.aval.ndim != nb + 2):
    return None
  batch = [f'b{j}' for j in range(nb)]
  layout = batch + ['l', 'r']
  cur, chain = e.outs[0], [i]
  scale, scale_vars = 1.0, []
  mask = None

  def step():
    j = flat.only_use(cur)
    return (j, flat.eqns[j]) if j is not None else (None, None)

  # Scale, transpose and mask, in any order (the mask at most once).
  while True:
    j, n = step()
    if n is None:
      break   # the softmax reads the scores twice
    name = n.eqn.primitive.name
    if name == 'transpose':
      layout = [layout[p] for p in n.eqn.params['permutation']]
    elif name in ('mul', 'div') and mask is None:
      other = n.ins[1] if n.ins[0] is cur else n.ins[0]
      if name == 'div' and n.ins[0] is not cur or other is cur:
        return None
      if not is_literal(other) and other.aval.shape != ():
        return None
      c = _scalar(flat, other)
      if c is None:
        scale_vars.append((other, name))
      else:
        scale = scale * c if name == 'mul' else scale / c
    elif name == 'select_n' and mask is None and len(n.ins) == 3:
      pred, a, b = n.ins
      if (a is cur) == (b is cur) or is_literal(pred) or pred.aval.dtype != bool:
        return None
      fill = _scalar(flat, b if a is cur else a)
      if fill is None or not -np.inf < fill <= FILL_LIMIT:
        return None
      mask = (pred, list(layout), b is cur)
    else:
      break
    chain.append(j)
    cur = n.outs[0]

  # The softmax over one axis: max, subtract, exp, sum, divide.
  x, uses = cur, flat.uses.get(cur, [])
  if len(uses) != 2 or x in flat.escaping or not _f32(x):
    return None
  ops = {flat.eqns[u].eqn.primitive.name: u for u in uses}
  if set(ops) != {'reduce_max', 'sub'}:
    return None
  rmax = flat.eqns[ops['reduce_max']]
  axes = tuple(rmax.eqn.params['axes'])
  if len(axes) != 1 or layout[axes[0]] not in ('l', 'r'):
    return None
  axis = axes[0]
  m = _reduced(flat, rmax, axis, x, chain, ('max', 'stop_gradient'))
  sub = flat.eqns[ops['sub']]
  if m is None or sub.ins[0] is not x or sub.ins[1] is not m:
    return None
  chain += [ops['reduce_max'], ops['sub']]
  j = flat.only_use(sub.outs[0])
  if j is None or flat.eqns[j].eqn.primitive.name != 'exp':
    return None
  chain.append(j)
  ex = flat.eqns[j].outs[0]
  uses = flat.uses.get(ex, [])
  ops = {flat.eqns[u].eqn.primitive.name: u for u in uses}
  if len(uses) != 2 or ex in flat.escaping or set(ops) != {'reduce_sum',
                                                            'div'}:
    return None
  rsum = flat.eqns[ops['reduce_sum']]
  if tuple(rsum.eqn.params['axes']) != (axis,):
    return None
  s = _reduced(flat, rsum, axis, x, chain, ())
  div = flat.eqns[ops['div']]
  if s is None or div.ins[0] is not ex or div.ins[1] is not s:
    return None
  chain += [ops['reduce_sum'], ops['div']]
  probs = div.outs[0]

  # The probabilities times v, contracting the key axis.
  j = flat.only_use(probs)
  if j is None or flat.eqns[j].eqn.primitive.name != 'dot_general':
    return None
  fin = flat.eqns[j]
  if fin.eqn.params.get('preferred_element_type') not in (None, _F32):
    return None
  flc, frc, flb, frb = _dims(fin.eqn)
  p_left = fin.ins[0] is probs
  if fin.ins[0] is fin.ins[1]:
    return None
  v = fin.ins[1] if p_left else fin.ins[0]
  pc, vc = (flc, frc) if p_left else (frc, flc)
  pb, vb = (flb, frb) if p_left else (frb, flb)
  if (pc != (axis,) or len(vc) != 1 or not _f32(v)
      or v.aval.ndim != nb + 2 or sorted(layout[a] for a in pb) != batch):
    return None
  keys = layout[axis]
  query = 'r' if keys == 'l' else 'l'
  rename = {keys: 's', query: 't'}
  names = [rename.get(n, n) for n in layout]
  v_axes = {names[a]: d for a, d in zip(pb, vb)}
  v_axes['s'] = vc[0]
  v_axes['d'] = _free(nb + 2, vc, vb)[0]
  p_free = names[_free(nb + 2, pc, pb)[0]]   # 't'
  out_names = [names[a] for a in pb] + (
      [p_free, 'd'] if p_left else ['d', p_free])
  chain.append(j)

  qv, kv = (lhs, rhs) if keys == 'r' else (rhs, lhs)
  qc, kc = (lc, rc) if keys == 'r' else (rc, lc)
  qb, kb = (lb, rb) if keys == 'r' else (rb, lb)
  q_axes = dict(zip(batch, qb), t=_free(nb + 2, qc, qb)[0], d=qc[0])
  k_axes = dict(zip(batch, kb), s=_free(nb + 2, kc, kb)[0], d=kc[0])
  if qv.aval.shape[q_axes['d']] != v.aval.shape[v_axes['d']]:
    return None   # the kernel's values share the queries' head size

  mask_var, mask_names, visible = None, [], True
  if mask is not None:
    pred, at, visible = mask
    # Look through the broadcasts that make pred the scores' shape.
    amap = list(range(len(at)))
    mask_var = pred
    while True:
      bcast = flat.made_by(mask_var, 'broadcast_in_dim')
      if bcast is None:
        break
      dims = bcast.eqn.params['broadcast_dimensions']
      amap = [amap[d] for d in dims]
      mask_var = bcast.ins[0]
    shape = mask_var.aval.shape
    mask_names = []
    for ax, size in zip(amap, shape):
      n = {'l': rename['l'], 'r': rename['r']}.get(at[ax], at[ax])
      mask_names.append('_' if size == 1 else n)
  match = Match(q=qv, k=kv, v=v, q_axes=q_axes, k_axes=k_axes,
                v_axes=v_axes, batch=batch, out_names=out_names,
                out_var=fin.outs[0], scale=scale, scale_vars=scale_vars,
                mask=mask_var, mask_names=mask_names, mask_visible=visible,
                mask_eqns=[], consts=flat.consts, exposed=flat.exposed)
  return match, chain


def _reduced(flat: Flat, red: FlatEqn, axis: int, x, chain: list[int],
             extra: tuple[str, ...]):
  """The row statistic ``red`` (a reduce over ``axis`` of ``x``) brought
  back to ``x``'s rank with that axis of size 1, through broadcasts,
  reshapes and ``extra`` steps; its variable, or None."""
  cur, steps = red.outs[0], []
  shape = list(x.aval.shape)
  shape[axis] = 1
  while cur.aval.shape != tuple(shape) or steps == []:
    j = flat.only_use(cur)
    if j is None:
      return None
    n = flat.eqns[j]
    name = n.eqn.primitive.name
    if name == 'broadcast_in_dim':
      dims = tuple(n.eqn.params['broadcast_dimensions'])
      if (cur.aval.ndim != x.aval.ndim - 1 or tuple(n.eqn.params['shape'])
          != tuple(shape)
          or dims != tuple(d for d in range(x.aval.ndim) if d != axis)):
        return None
    elif name == 'reshape':
      if tuple(n.outs[0].aval.shape) != tuple(shape) or cur.aval.ndim != (
          x.aval.ndim - 1):
        return None
    elif name == 'max' and 'max' in extra:
      other = n.ins[1] if n.ins[0] is cur else n.ins[0]
      if _scalar(flat, other) != -np.inf:
        return None
    elif name == 'stop_gradient' and name in extra:
      pass
    else:
      break
    steps.append(j)
    cur = n.outs[0]
  # stop_gradient after the broadcast (jax.nn.softmax) is one more step.
  j = flat.only_use(cur)
  if j is not None and 'stop_gradient' in extra and (
      flat.eqns[j].eqn.primitive.name == 'stop_gradient'):
    steps.append(j)
    cur = flat.eqns[j].outs[0]
  if cur.aval.shape != tuple(shape):
    return None
  chain.extend(steps)
  return cur


def _readable(flat: Flat, a, tops: set[int]) -> bool:
  """Whether ``a``'s value exists at the top level outside ``tops``."""
  if is_literal(a) or a in flat.consts:
    return True
  if a not in flat.exposed:
    return False
  j = flat.producer.get(a)
  return j is None or flat.eqns[j].top not in tops


def _mask_eqns(flat: Flat, var, tops: set[int], chain: set[int]):
  """The equations inside ``tops`` that compute ``var``, in order; None if
  one of them is part of the chain or has effects."""
  need: list[int] = []
  seen = set()

  def visit(a) -> bool:
    if _readable(flat, a, tops):
      return True
    j = flat.producer.get(a)
    if j is None or j in chain or flat.eqns[j].eqn.effects:
      return False
    if j not in seen:
      seen.add(j)
      if not all(visit(b) for b in flat.eqns[j].ins):
        return False
      need.append(j)
    return True

  if not visit(var):
    return None
  return [flat.eqns[j] for j in sorted(need)]


def bodies(eqn) -> list:
  """The jaxprs an equation runs: a call's, a scan's, a remat's, a cond's
  branches."""
  found = []
  for key in ('jaxpr', 'call_jaxpr', 'branches'):
    value = eqn.params.get(key)
    for body in value if isinstance(value, (list, tuple)) else [value]:
      if isinstance(body, jex.ClosedJaxpr):
        found.append(body.jaxpr)
      elif isinstance(body, jex.Jaxpr):
        found.append(body)
  return found


def _contains(jaxpr, depth: int = 0) -> bool:
  if depth > 8:
    return False
  if _find(jaxpr).finals:
    return True
  return any(_contains(b, depth + 1) for e in jaxpr.eqns for b in bodies(e))


def _find(jaxpr) -> Plan:
  flat = Flat(jaxpr)
  finals: dict[int, Match] = {}
  deferred: set[int] = set()
  taken: set[int] = set()
  for i, e in enumerate(flat.eqns):
    if e.eqn.primitive.name != 'dot_general' or i in taken:
      continue
    found = _match(flat, i)
    if found is None:
      continue
    match, chain = found
    chain_set = set(chain)
    tops = {flat.eqns[j].top for j in chain}
    if tops & (deferred | set(finals)):
      continue
    final_top = flat.eqns[chain[-1]].top
    if any(t > final_top for t in tops):
      continue
    # Nothing computed inside the skipped top-level equations may be read
    # outside them, except the output; nothing in them may have effects.
    inside = [j for j, f in enumerate(flat.eqns) if f.top in tops]
    ok = True
    for j in inside:
      f = flat.eqns[j]
      if f.eqn.effects:
        ok = False
      for o in f.outs:
        if o is match.out_var:
          continue
        if o in flat.escaping or any(flat.eqns[u].top not in tops
                                     for u in flat.uses.get(o, [])):
          ok = False
    for a in [match.q, match.k, match.v] + [v for v, _ in match.scale_vars]:
      ok = ok and _readable(flat, a, tops)
    if ok and match.mask is not None:
      eqns = _mask_eqns(flat, match.mask, tops, chain_set)
      ok = eqns is not None
      match.mask_eqns = eqns or []
    final_eqn = jaxpr.eqns[final_top]
    if flat.exposed.get(match.out_var) is None:
      ok = False   # the output must be a top-level value
    # Every output of a skipped equation is computed inside the chain's
    # equations (not an input passed through, which nobody would set).
    made_inside = {o for j in inside for o in flat.eqns[j].outs}
    for t in tops:
      for o in jaxpr.eqns[t].outvars:
        c = flat.canon(o)
        ok = ok and (c is match.out_var or (not is_literal(c)
                                            and c in made_inside))
    if not ok:
      continue
    match.tops = sorted(tops)
    match.final = final_top
    match.final_outvars = [flat.canon(o) for o in final_eqn.outvars]
    finals[final_top] = match
    deferred |= tops - {final_top}
    taken |= set(inside)
  return Plan(finals=finals, deferred=deferred, calls=set())


def plan(jaxpr) -> Plan:
  """The attention chains among ``jaxpr``'s top-level equations, and the
  equations (``jit``, ``custom_jvp``, ``scan``, ``remat``, ``cond``) that
  hold one further down."""
  found = _find(jaxpr)
  for i, e in enumerate(jaxpr.eqns):
    if i in found.finals or i in found.deferred:
      continue
    if e.primitive.name in _ENTERED and any(
        _contains(b) for b in bodies(e)):
      found.calls.add(i)
  return found
