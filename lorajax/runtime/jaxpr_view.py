"""A jaxpr's equations with its calls' bodies inlined, one name per value.

The pattern finders of ``lorajax.runtime`` read a traced function as a user
wrote it, and its equations are often inside calls: ``jnp.where`` and
``jax.nn.silu`` are ``jit`` calls, and ``jnp.where``'s body is one jaxpr
shared by every layer that calls it. :class:`Flat` lists the equations with
the bodies of the calls it looks through inlined, and gives each value
computed inside a call a name of its own for that call (:class:`Inner`), so
that a value of layer 3's ``jnp.where`` is not layer 4's.

Example:

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x, m: jnp.where(m, x, 0.0) + jnp.where(m, 2 * x, 0.0)
  >>> jaxpr = jax.make_jaxpr(f)(jnp.ones(3), jnp.ones(3, bool)).jaxpr
  >>> [e.primitive.name for e in jaxpr.eqns]
  ['jit', 'mul', 'jit', 'add']
  >>> selects = [e for e in Flat(jaxpr).eqns
  ...            if e.eqn.primitive.name == 'select_n']
  >>> selects[0].eqn is selects[1].eqn, selects[0].outs == selects[1].outs
  (True, False)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.extend.core as jex

# Calls that only group equations: their body is the call's meaning.
JIT_CALLS = ('jit', 'pjit', 'closed_call', 'core_call')
# ... and calls whose body is the primal of a custom derivative.
LOOKED_THROUGH = JIT_CALLS + ('custom_jvp_call',)


def is_literal(a) -> bool:
  return isinstance(a, jex.Literal)


def call_body(eqn, calls=JIT_CALLS):
  """``(jaxpr, consts)`` of a call among ``calls``, else None."""
  if eqn.primitive.name not in calls:
    return None
  p = eqn.params
  body = p.get('jaxpr', p.get('call_jaxpr'))
  if isinstance(body, jex.ClosedJaxpr):
    return body.jaxpr, list(body.consts)
  if isinstance(body, jex.Jaxpr):
    return body, []
  return None


@dataclasses.dataclass
class FlatEqn:
  """One equation of a jaxpr with its calls inlined: canonical in/out."""
  eqn: Any
  ins: list
  outs: list
  top: int


class Inner:
  """A variable of an inlined call's body, one per call: a body shared by
  several calls (``jnp.where``'s, in every layer) has its values once per
  call."""
  __slots__ = ('var',)

  def __init__(self, var):
    self.var = var

  @property
  def aval(self):
    return self.var.aval

  def __repr__(self):
    return f'inner {self.var}'


class Flat:
  """``jaxpr``'s equations with the bodies of ``calls`` inlined.

  Every value has one canonical name: a top-level variable, a literal, or
  an ``Inner`` for a value computed inside a call (a call's inputs and
  outputs are the values they alias).
  """

  def __init__(self, jaxpr, calls=LOOKED_THROUGH):
    self.calls = calls
    self.eqns: list[FlatEqn] = []
    self.consts: dict[Any, Any] = {}   # inner closed jaxprs' constants
    self.exposed: dict[Any, Any] = {}  # canonical -> top-level variable
    self.top_names: dict[Any, Any] = {}
    self._walk(jaxpr, None, self.top_names)
    for v in list(jaxpr.invars) + list(jaxpr.constvars):
      self.exposed[v] = v
    self.producer: dict[Any, int] = {}
    self.uses: dict[Any, list[int]] = {}
    for i, e in enumerate(self.eqns):
      for v in e.outs:
        self.producer[v] = i
      for a in e.ins:
        if not is_literal(a):
          self.uses.setdefault(a, []).append(i)
    self.escaping = {self.canon(v) for v in jaxpr.outvars if not is_literal(v)}

  def canon(self, a):
    """The canonical name of a top-level variable or literal."""
    return a if is_literal(a) else self.top_names.get(a, a)

  def _walk(self, jaxpr, top, names) -> list:
    def ref(a):
      return a if is_literal(a) else names.get(a, a)

    for i, e in enumerate(jaxpr.eqns):
      t = i if top is None else top
      ins = [ref(a) for a in e.invars]
      body = call_body(e, self.calls)
      if body is None:
        outs = []
        for o in e.outvars:
          if top is not None:
            names[o] = Inner(o)
          outs.append(ref(o))
        self.eqns.append(FlatEqn(e, ins, outs, t))
      else:
        inner, consts = body
        sub: dict[Any, Any] = {}
        for v, c in zip(inner.constvars, consts):
          sub[v] = Inner(v)
          self.consts[sub[v]] = c
        sub.update(zip(inner.invars, ins))
        for o, r in zip(e.outvars, self._walk(inner, t, sub)):
          names[o] = r
      if top is None:
        for o in e.outvars:
          self.exposed.setdefault(ref(o), o)
    return [ref(o) for o in jaxpr.outvars]

  def only_use(self, v) -> int | None:
    """The one equation that reads ``v`` (None if more, none, or ``v`` is
    an output of the jaxpr)."""
    uses = self.uses.get(v, [])
    if len(uses) != 1 or v in self.escaping:
      return None
    return uses[0]

  def made_by(self, a, *names) -> FlatEqn | None:
    if is_literal(a) or a not in self.producer:
      return None
    e = self.eqns[self.producer[a]]
    return e if e.eqn.primitive.name in names else None
