"""Evaluates a jaxpr equation by equation, with adapted kernels in it.

``evaluate`` is the interpreter behind ``lorajax.lora``: a
``lorajax.kernel_ref.KernelRef`` flows through dtype casts, transposes,
``jit``-ed helpers, ``scan`` (stacked kernels are sliced together with their
stacked adapters), ``remat``, ``cond`` and custom derivative calls into the
``dot_general`` or row ``gather`` that consumes it; any other use is refused.
Equations without adapted kernels run as traced, except on the CPU: softmax
attention chains (``lorajax.runtime.attention_pattern``) and activation
regions (``lorajax.runtime.elementwise_remat``) are computed another way
with the same values, and wide or bfloat16 products go through
``lorajax.matmul.product``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
from jax import lax
import jax.extend.core as jex

from lorajax import kernel_ref
from lorajax import matmul
from lorajax.runtime import attention_match
from lorajax.runtime import attention_pattern
from lorajax.runtime import cpu_attention
from lorajax.runtime import elementwise_remat
from lorajax.runtime import recompute

_INLINE = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call',
           'custom_vjp_call', 'custom_vjp_call_jaxpr')
_IDENTITY = ('copy', 'copy_p', 'sharding_constraint')
_REMAT = ('remat', 'remat2', 'checkpoint')


def _scan(eqn, invals, ctx: kernel_ref.Ctx):
  p = eqn.params
  nc, nk = p['num_consts'], p['num_carry']
  consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
  if kernel_ref.refs_in(init):
    raise kernel_ref.RewriteError(
        f'targeted kernel {kernel_ref.refs_in(init)[0].path!r} is a scan '
        f'carry; only scanned (xs) or constant kernels are supported')
  xs_plain, xs_ref_leaves, xs_slots = kernel_ref.pack(xs)
  keys = None
  if ctx.rng is not None:
    keys = jax.random.split(ctx.next_key(), p['length'])
  body_jaxpr = p['jaxpr']

  def body(carry, x):
    plain, ref_leaves, key = x
    sub = ctx.child(key, ctx.context, loop=True)
    xs_vals = kernel_ref.unpack(xs_slots, plain, ref_leaves, sliced=True)
    outs = evaluate(body_jaxpr.jaxpr, body_jaxpr.consts,
                 list(consts) + list(carry) + xs_vals, sub)
    kernel_ref.no_ref_outputs(outs, 'scan')
    return list(outs[:nk]), list(outs[nk:])

  carry, ys = lax.scan(body, list(init), (xs_plain, xs_ref_leaves, keys),
                       length=p['length'], reverse=p['reverse'],
                       unroll=p['unroll'])
  return list(carry) + list(ys)


def _remat(eqn, invals, ctx: kernel_ref.Ctx):
  p = eqn.params
  plain, ref_leaves, slots = kernel_ref.pack(invals)
  # A block without adapted kernels draws no dropout key (the keys of the
  # adapters after it stay those it had as a plain jax.checkpoint).
  key = ctx.next_key() if ref_leaves else None
  outer = plain

  def f(plain, ref_leaves, key, context):
    vals = kernel_ref.unpack(slots, plain, ref_leaves, sliced=False)
    sub = ctx.child(key, context)
    if sub.param_ids is not None:   # fn's parameters, as traced in here
      sub.param_ids = frozenset(id(x) for x, y in zip(plain, outer)
                                if id(y) in ctx.param_ids)
    return kernel_ref.no_ref_outputs(evaluate(p['jaxpr'], [], vals, sub),
                                     'checkpoint')

  args = (plain, ref_leaves, key, ctx.context)
  if p.get('policy') is None and ctx.param_ids is not None:
    # Whole-block remat outside a loop: recompute only once the block's
    # cotangent exists (XLA's CPU scheduler otherwise runs recomputations
    # early, all alive at once). Tied: the activations among the plain
    # inputs (traced, floating, not a parameter of fn).
    tie = [isinstance(x, jax.core.Tracer) and id(x) not in ctx.param_ids
           for x in jax.tree.leaves(plain)]
    tie += [False] * (len(jax.tree.leaves(args)) - len(tie))
    return recompute.after_cotangent(f, tie)(*args)
  return jax.checkpoint(f, prevent_cse=p.get('prevent_cse', True),
                        policy=p.get('policy'))(*args)


def _cond(eqn, invals, ctx: kernel_ref.Ctx):
  index, ops = invals[0], invals[1:]
  plain, ref_leaves, slots = kernel_ref.pack(ops)
  key = ctx.next_key()

  def branch(closed):
    def g(plain, ref_leaves, key):
      vals = kernel_ref.unpack(slots, plain, ref_leaves, sliced=False)
      outs = evaluate(closed.jaxpr, closed.consts, vals,
                      ctx.child(key, ctx.context))
      return kernel_ref.no_ref_outputs(outs, 'cond')
    return g

  return lax.switch(index, [branch(b) for b in eqn.params['branches']],
                    plain, ref_leaves, key)


def _inline(eqn, invals, ctx: kernel_ref.Ctx):
  p = eqn.params
  closed = p.get('jaxpr', p.get('call_jaxpr', p.get('fun_jaxpr')))
  if isinstance(closed, jex.ClosedJaxpr):
    return evaluate(closed.jaxpr, closed.consts, invals, ctx)
  return evaluate(closed, [], invals, ctx)


def _with_refs(eqn, invals, ctx: kernel_ref.Ctx):
  name = eqn.primitive.name
  refs = kernel_ref.refs_in(invals)
  if name == 'convert_element_type':
    return [dataclasses.replace(refs[0], dtype=eqn.params['new_dtype'])]
  if name in _IDENTITY and len(invals) == 1:
    return [refs[0]]
  if name == 'transpose':
    ref = refs[0]
    axes = ref.axes
    return [dataclasses.replace(
        ref, perm=tuple(axes[i] for i in eqn.params['permutation']))]
  if name == 'dot_general':
    return [kernel_ref.dot(eqn, invals, ctx)]
  if name == 'scan':
    return _scan(eqn, invals, ctx)
  if name == 'gather':
    return [kernel_ref.gather(eqn, invals, ctx)]
  if name in _REMAT:
    return _remat(eqn, invals, ctx)
  if name == 'cond':
    return _cond(eqn, invals, ctx)
  if name in _INLINE:
    return _inline(eqn, invals, ctx)
  raise kernel_ref.RewriteError(
      f'targeted kernel {refs[0].path!r} (shape {refs[0].view_shape}) is used '
      f'by primitive {name!r}, which the LoRA rewrite does not support; only '
      f'dot_general (through casts, transposes, jit, scan, remat, cond and '
      f'custom derivative calls) can consume an adapted kernel. Exclude this '
      f'parameter from the adapter rule.')


def evaluate(jaxpr, consts, args, ctx: kernel_ref.Ctx) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  fuse = _fusion_plan(jaxpr)
  for i, eqn in enumerate(jaxpr.eqns):
    if fuse is not None and i in fuse.deferred:
      continue   # part of a chain or region, computed at its end
    match = fuse.finals.get(i) if fuse is not None else None
    if match is not None:
      try:
        outs = match.compute(read)
      except attention_match.NoFuse:
        for j in match.tops:
          _step(jaxpr.eqns[j], read, env, ctx, inline=False)
      else:
        env.update(zip(eqn.outvars, outs))
      continue
    _step(eqn, read, env, ctx,
          inline=fuse is not None and i in fuse.calls)
  return [read(v) for v in jaxpr.outvars]


def _fusion_plan(jaxpr) -> attention_pattern.Plan | None:
  """Where ``jaxpr``'s top-level equations are computed another way: the
  softmax attention chains that the fused CPU kernel can compute
  (``lorajax.runtime.attention_pattern``; not on another backend, with
  ``LORAJAX_CPU_ATTENTION=xla`` or without a compiler), and the activations
  that keep only their input for the backward pass
  (``lorajax.runtime.elementwise_remat``). None if nothing."""
  found = attention_pattern.plan(jaxpr)
  if found and not cpu_attention.available():
    found = attention_pattern.Plan({}, set(), set())
  if elementwise_remat.enabled():
    taken = found.deferred | set(found.finals)
    for region in elementwise_remat.plan(jaxpr, taken):
      found.finals[region.eqns[-1]] = region
      found.deferred |= set(region.eqns[:-1])
  return found or None


def _enter(eqn, invals, ctx: kernel_ref.Ctx):
  name = eqn.primitive.name
  if name == 'scan':
    return _scan(eqn, invals, ctx)
  if name in _REMAT:
    return _remat(eqn, invals, ctx)
  if name == 'cond':
    return _cond(eqn, invals, ctx)
  return _inline(eqn, invals, ctx)


def _faster_on_cpu(eqn, invals) -> bool:
  """Whether ``matmul.product`` writes this ``dot_general`` another way (a
  product with an output sharding of its own is left as written)."""
  if eqn.params.get('out_sharding') is not None:
    return False
  dn, pref = (eqn.params['dimension_numbers'],
              eqn.params.get('preferred_element_type'))
  return bool(matmul.wanted(*invals, dn, pref)
              or matmul.wide_blocks(*invals, dn, pref))


def _step(eqn, read, env, ctx: kernel_ref.Ctx, *, inline: bool) -> None:
  invals = [read(v) for v in eqn.invars]
  manager = getattr(getattr(eqn, 'ctx', None), 'manager', None)
  with manager if manager is not None else contextlib.nullcontext():
    if any(isinstance(v, kernel_ref.KernelRef) for v in invals):
      outs = _with_refs(eqn, invals, ctx)
    elif inline:   # holds an attention chain inside
      outs = _enter(eqn, invals, ctx)
    elif (eqn.primitive.name in _REMAT and ctx.param_ids is not None
          and eqn.params.get('policy') is None):
      outs = _remat(eqn, invals, ctx)   # a block without adapted kernels
    elif eqn.primitive.name == 'dot_general' and _faster_on_cpu(eqn, invals):
      # A bfloat16 product (in the float32-accumulated form that the CPU's
      # bfloat16 units run) or a wide float32 one (in blocks of columns):
      # lorajax.matmul.
      outs = [matmul.product(*invals, eqn.params['dimension_numbers'],
                             eqn.params.get('precision'),
                             eqn.params.get('preferred_element_type'))]
    else:
      outs = eqn.primitive.bind(
          *invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
  for v, x in zip(eqn.outvars, outs):
    env[v] = x
