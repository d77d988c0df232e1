"""AdaLoRA's rank allocator as pure functions, and its place in a train step.

PEFT's ``RankAllocator`` (``peft/tuners/adalora/layer.py``), step ``t``
(1 for the first update), after the optimizer has updated the parameters:

1. While ``t < total_step - tfinal``: the sensitivity of every entry of
   every ``a``, ``e``, ``b``, ``I = |w · ∂L/∂w|`` (the updated ``w``, this
   step's gradient), is smoothed, ``Ī ← β₁Ī + (1-β₁)I``, and its
   uncertainty tracked, ``Ū ← β₂Ū + (1-β₂)|I - Ī|``.
2. The budget (``budget_schedule``): ``init_r`` triplets a kernel until
   ``tinit``, then falling as a cubic to ``target_r`` a kernel at
   ``total_step - tfinal``, then constant; an allocation runs every
   ``delta_t`` steps while it falls, and at ``total_step - tfinal``.
3. An allocation scores triplet ``i`` of a kernel as
   ``s(e_i) + mean s(a_:,i) + mean s(b_i,:)`` with ``s = Ī·Ū``, and sets to
   zero the ``e_i`` of the ``init_bgt - budget`` lowest scores over all
   kernels (those at or below the k-th smallest score: ties go too).
4. After ``total_step - tfinal`` the mask of that last allocation is applied
   at every step. The EMAs are not updated after it, so the last
   allocation computed again gives the same mask; that is what is done.

``RankAllocator`` holds the static part (the schedule and where the
adapters are); its state, ``AllocatorState``, is a pytree of arrays (jit,
pmap and mesh carry it, Orbax saves it). ``rank_allocation(tx, allocator)``
puts the allocator after an optax optimizer, so a train step needs no
change and a checkpoint of the optimizer state resumes it exactly;
``training_hooks`` also adds the orthogonality penalty to a loss.

The EMAs are kept for every leaf of the tree the optimizer sees (zero
outside the AdaLoRA factors) so that the state has the parameters' structure
where optax and the sharding rules look for it (``optax.tree_map_params``).

Example:

  >>> p = adalora.AdaLora(init_r=4, target_r=2, total_step=10)
  >>> [budget_schedule(p, t, init_bgt=8, target_bgt=4) for t in (0, 1, 5)]
  [(8, False), (6, True), (4, True)]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorajax import spec as spec_lib
from lorajax.methods import adalora

PyTree = Any
FACTORS = ('a', 'e', 'b')


def budget_schedule(p: adalora.AdaLora, step: int, *, init_bgt: int,
                    target_bgt: int) -> tuple[int, bool]:
  """``(budget, whether to allocate)`` at ``step``, as PEFT computes them
  (Python floats, ``int`` truncation)."""
  if step <= p.tinit:
    return init_bgt, False
  if step > p.total_step - p.tfinal:
    return target_bgt, True
  mul_coeff = 1 - (step - p.tinit) / (p.total_step - p.tfinal - p.tinit)
  budget = int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt)
  return budget, step % p.delta_t == 0


class AllocatorState(NamedTuple):
  """The allocator's arrays.

  Attributes:
    ipt: the smoothed sensitivity ``Ī``, shaped like the parameter tree.
    unc: its smoothed uncertainty ``Ū``, shaped like the parameter tree.
    count: int32 ``[]``, updates done so far.
  """
  ipt: PyTree
  unc: PyTree
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class RankAllocator:
  """AdaLoRA's allocator for the adapters at ``paths`` of a parameter tree.

  Attributes:
    schedule: the provider whose schedule fields apply (shared by every
      AdaLoRA rule; ``total_step`` set).
    paths: ``/``-joined paths of the adapter nodes (``{'a', 'e', 'b'}``) in
      the tree given to ``init`` and ``update``.
  """
  schedule: adalora.AdaLora
  paths: tuple[str, ...]

  def __post_init__(self):
    p = self.schedule
    if p.total_step is None:
      raise ValueError('AdaLora total_step is None; the rank allocator '
                       'needs the number of steps of the run (PEFT\'s '
                       'AdaLoraConfig requires it too)')
    if p.target_r > p.init_r:
      raise ValueError(f'AdaLora target_r={p.target_r} is larger than '
                       f'init_r={p.init_r}: the budget would grow')
    if not self.paths:
      raise ValueError('RankAllocator needs the paths of AdaLoRA adapters; '
                       'got none')

  @classmethod
  def from_spec(cls, spec: spec_lib.LoraSpec, params: PyTree,
                prefix: str = '') -> 'RankAllocator | None':
    """The allocator of ``spec``'s AdaLoRA rules, or None without any.

    Args:
      spec: the spec.
      params: the base parameters it resolves against.
      prefix: where the adapter tree sits in the tree the allocator will
        see (``'adapters'`` for a train state's ``{'adapters', 'params'}``).
    """
    found = adalora.adalora_paths(spec, params)
    if not found:
      return None
    join = (lambda p: f'{prefix}/{p}') if prefix else (lambda p: p)  # pylint: disable=unnecessary-lambda-assignment
    return cls(adalora.one_schedule(found.values()),
               tuple(join(p) for p in sorted(found)))

  def budgets(self, tree: PyTree) -> tuple[int, int]:
    """``(init_bgt, target_bgt)``: triplets at the start, and at the end
    (``target_r`` for every kernel, each stacked layer one kernel)."""
    shapes = [np.shape(spec_lib.get_by_path(tree, f'{p}/e'))
              for p in self.paths]
    n = sum(int(np.prod(s[:-1], dtype=np.int64)) for s in shapes)
    return (sum(int(np.prod(s, dtype=np.int64)) for s in shapes),
            self.schedule.target_r * n)

  def table(self, tree: PyTree) -> tuple[np.ndarray, np.ndarray]:
    """``budget_schedule`` for steps ``0 .. total_step + 1`` (the last row
    stands for every later step): int32 budgets and bool allocate flags."""
    init_bgt, target_bgt = self.budgets(tree)
    rows = [budget_schedule(self.schedule, t, init_bgt=init_bgt,
                            target_bgt=target_bgt)
            for t in range(self.schedule.total_step + 2)]
    return (np.array([b for b, _ in rows], np.int32),
            np.array([m for _, m in rows], bool))

  def init(self, params: PyTree) -> AllocatorState:
    """Zero EMAs shaped like ``params``, at step 0."""
    zeros = lambda t: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
        lambda x: jnp.zeros(jnp.shape(x), jnp.float32), t)
    return AllocatorState(zeros(params), zeros(params),
                          jnp.zeros((), jnp.int32))

  def update(self, state: AllocatorState, params: PyTree, grads: PyTree
             ) -> tuple[dict[str, jax.Array], AllocatorState]:
    """One step: EMAs updated, and which ``e`` entries to zero now.

    Args:
      state: the state after the previous step.
      params: the parameters after this step's optimizer update.
      grads: this step's gradients (same tree).

    Returns:
      ``(drop, state)``: ``drop`` maps each adapter path to a bool
      ``[*lead, r]``, True where ``e`` is to be set to zero this step
      (all False when no allocation runs).
    """
    p = self.schedule
    step = state.count + 1
    learning = step < p.total_step - p.tfinal
    leaf = lambda t, path, k: spec_lib.get_by_path(t, f'{path}/{k}')  # pylint: disable=unnecessary-lambda-assignment
    ipt, unc = _copy(state.ipt), _copy(state.unc)
    for path in self.paths:
      for k in FACTORS:
        w, g = leaf(params, path, k), leaf(grads, path, k)
        sens = jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32))
        i_old, u_old = leaf(state.ipt, path, k), leaf(state.unc, path, k)
        i_new = p.beta1 * i_old + (1 - p.beta1) * sens
        u_new = p.beta2 * u_old + (1 - p.beta2) * jnp.abs(sens - i_new)
        spec_lib.set_by_path(ipt, f'{path}/{k}',
                             jnp.where(learning, i_new, i_old))
        spec_lib.set_by_path(unc, f'{path}/{k}',
                             jnp.where(learning, u_new, u_old))
    scores = {path: triplet_scores(
        {k: leaf(ipt, path, k) * leaf(unc, path, k) for k in FACTORS})
              for path in self.paths}
    budget_t, allocate_t = self.table(params)
    row = jnp.clip(step, 0, len(budget_t) - 1)
    init_bgt, _ = self.budgets(params)
    allocate = jnp.asarray(allocate_t)[row] | (
        step == p.total_step - p.tfinal)
    keep = keep_mask(scores, init_bgt - jnp.asarray(budget_t)[row])
    drop = {path: allocate & ~keep[path] for path in self.paths}
    return drop, AllocatorState(ipt, unc, step)

  def apply(self, params: PyTree, drop: dict[str, jax.Array]) -> PyTree:
    """``params`` with the dropped ``e`` entries set to zero."""
    out = _copy(params)
    for path, d in drop.items():
      e = spec_lib.get_by_path(params, f'{path}/e')
      spec_lib.set_by_path(out, f'{path}/e', jnp.where(d, jnp.zeros_like(e),
                                                      e))
    return out


def triplet_scores(element: dict[str, jax.Array]) -> jax.Array:
  """A triplet's score from its entries' ``Ī·Ū``: ``e``'s, plus the mean of
  its column of ``a`` (over the contracted axes) and of its row of ``b``
  (over the free axes); ``[*lead, r]``."""
  e = element['e']
  nlead = e.ndim - 1
  a, b = element['a'], element['b']
  a_mean = jnp.mean(a, axis=tuple(range(nlead, a.ndim - 1)))
  b_mean = jnp.mean(b, axis=tuple(range(nlead + 1, b.ndim)))
  return e + (a_mean + b_mean)


def keep_mask(scores: dict[str, jax.Array], k: jax.Array
              ) -> dict[str, jax.Array]:
  """True for the triplets above the ``k``-th smallest score of all
  (PEFT's ``kthvalue`` threshold, ties dropped); all True for ``k <= 0``."""
  flat = jnp.concatenate([jnp.ravel(s) for s in scores.values()])
  ordered = jnp.sort(flat)
  threshold = jnp.where(k > 0, ordered[jnp.clip(k - 1, 0, flat.size - 1)],
                        -jnp.inf)
  return {path: s > threshold for path, s in scores.items()}


def _copy(tree: PyTree) -> PyTree:
  """The nested dicts of ``tree`` copied (leaves and layouts shared)."""
  if isinstance(tree, spec_lib.AdapterParams):
    return spec_lib.AdapterParams(
        {k: _copy(v) for k, v in tree.items()}, layout=tree.layout)
  if isinstance(tree, dict):
    return {k: _copy(v) for k, v in tree.items()}
  return tree


class RankAllocationState(NamedTuple):
  """``rank_allocation``'s optimizer state: the wrapped optimizer's and the
  allocator's."""
  inner: optax.OptState
  allocator: AllocatorState


def rank_allocation(tx: optax.GradientTransformation,
                    allocator: RankAllocator) -> optax.GradientTransformation:
  """``tx`` followed by the rank allocator.

  The updates returned make ``optax.apply_updates(params, updates)`` the
  parameters ``tx`` gives, with the allocated ``e`` entries exactly zero
  (their update is ``-e``). The allocator sees this step's raw gradients
  (before any clipping inside ``tx``), as the paper's sensitivity
  ``|w·∂L/∂w|``.
  """
  def init_fn(params):
    return RankAllocationState(tx.init(params), allocator.init(params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('rank_allocation needs params in update()')
    updates, inner = tx.update(grads, state.inner, params)
    new = optax.apply_updates(params, updates)
    drop, alloc = allocator.update(state.allocator, new, grads)
    updates = _copy(updates)
    for path, d in drop.items():
      e_upd = spec_lib.get_by_path(updates, f'{path}/e')
      e_old = spec_lib.get_by_path(params, f'{path}/e')
      spec_lib.set_by_path(updates, f'{path}/e',
                           jnp.where(d, -e_old.astype(e_upd.dtype), e_upd))
    return updates, RankAllocationState(inner, alloc)

  return optax.GradientTransformation(init_fn, update_fn)


def training_hooks(spec: spec_lib.LoraSpec, params: PyTree,
                   loss_fn: Callable[..., Any],
                   tx: optax.GradientTransformation, *,
                   prefix: str = 'adapters'
                   ) -> tuple[Callable[..., Any], optax.GradientTransformation]:
  """AdaLoRA's two additions to a train step, or ``(loss_fn, tx)`` as they
  are when ``spec`` has no AdaLoRA rule.

  Args:
    spec: the run's spec; params: the base it resolves against.
    loss_fn: ``(trainable, frozen, batch, rng) -> (loss, stats)``; the
      returned one adds ``orth_reg_weight`` times PEFT's orthogonality
      penalty to the differentiated loss (``stats``, what is logged, stay
      the task's own).
    tx: the optimizer; the returned one is ``rank_allocation(tx, ...)``.
    prefix: where the adapters sit in the trainable tree.
  """
  allocator = RankAllocator.from_spec(spec, params, prefix)
  if allocator is None:
    return loss_fn, tx
  weight = float(allocator.schedule.orth_reg_weight)

  def with_penalty(trainable, frozen, batch, rng):
    loss, stats = loss_fn(trainable, frozen, batch, rng)
    if weight:
      loss = loss + adalora.orth_regularization(trainable, allocator.paths,
                                                weight)
    return loss, stats

  return with_penalty, rank_allocation(tx, allocator)
