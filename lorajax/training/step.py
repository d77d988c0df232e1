"""One train step and one eval step, pure functions for jit, pmap or a Mesh.

A task supplies two functions (see ``lorajax.training.tasks``)::

  loss_fn(trainable, frozen, batch, rng) -> (mean_loss, stats)
  eval_fn(trainable, frozen, batch) -> stats

where ``stats`` is a dict of float32 *sums* (``loss_sum``, ``count``, and e.g.
``correct``): sums add up over micro-batches, devices and batches, so every
runner reports the same numbers. The step differentiates only the trainable
tree, ``{'adapters': ..., 'params': ...}``; the frozen base is an argument
(never a constant baked into the program) and gets no gradient.

Runners bind the keyword-only arguments with ``functools.partial``:

  step = jax.jit(functools.partial(train_step, loss_fn=..., tx=...))
  step = jax.pmap(functools.partial(train_step, ..., axis_name='batch'),
                  axis_name='batch')   # grads pmean-ed, stats psum-ed

Example:

  >>> import optax
  >>> def loss_fn(trainable, frozen, batch, rng):
  ...   err = batch['x'] * (frozen['w'] + trainable['b']) - batch['y']
  ...   return (err ** 2).mean(), {'loss_sum': (err ** 2).sum(),
  ...                              'count': jnp.float32(err.size)}
  >>> tx = optax.sgd(0.1)
  >>> state = create_state({'b': jnp.zeros(())}, tx, seed=0)
  >>> batch = {'x': jnp.ones(4), 'y': 3 * jnp.ones(4)}
  >>> state, stats = train_step(state, {'w': jnp.ones(())}, batch,
  ...                           loss_fn=loss_fn, tx=tx)
  >>> float(stats['loss_sum']), round(float(state.trainable['b']), 3)
  (16.0, 0.4)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

PyTree = Any
Stats = dict[str, jax.Array]
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array],
                  tuple[jax.Array, Stats]]
EvalFn = Callable[[PyTree, PyTree, PyTree], Stats]


class TrainState(NamedTuple):
  """Everything a run carries from step to step, and checkpoints.

  Attributes:
    step: int32 ``[]``, updates done so far.
    trainable: ``{'adapters': ..., 'params': ...}`` float32 leaves.
    opt_state: the optax state of ``trainable``.
    rng: uint32 ``[2]`` raw key data; step ``s`` uses
      ``fold_in(rng, s)`` (and the device index under pmap), so a resumed
      run draws the same dropout masks.
  """
  step: jax.Array
  trainable: PyTree
  opt_state: optax.OptState
  rng: jax.Array


def create_state(trainable: PyTree, tx: optax.GradientTransformation,
                 seed: int) -> TrainState:
  """A fresh ``TrainState`` at step 0 (float32 trainable leaves)."""
  trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=tx.init(trainable),
                    rng=jax.random.key_data(jax.random.key(seed)))


def step_rng(state: TrainState, axis_name: str | None = None) -> jax.Array:
  """The PRNG key of this step (and device, under ``axis_name``)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, lax.axis_index(axis_name))
  return key


def _micro_batches(batch: PyTree, accum_steps: int) -> PyTree:
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into '
                       f'accum_steps={accum_steps} micro-batches')
    return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
  return jax.tree.map(split, batch)


def compute_grads(trainable: PyTree, frozen: PyTree, batch: PyTree,
                  rng: jax.Array, *, loss_fn: LossFn, accum_steps: int = 1
                  ) -> tuple[PyTree, Stats]:
  """Gradients of the mean loss w.r.t. ``trainable``, and summed stats.

  With ``accum_steps > 1`` the batch is cut into that many equal
  micro-batches, run one after another under ``lax.scan``; the gradient is
  the mean of their gradients.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (_, stats), grads = grad_fn(trainable, frozen, batch, rng)
    return grads, stats
  micro = _micro_batches(batch, accum_steps)
  rngs = jax.random.split(rng, accum_steps)
  first = jax.tree.map(lambda x: x[0], micro)
  stats_shape = jax.eval_shape(lambda b: grad_fn(trainable, frozen, b, rng)[0][1],
                               first)
  zeros = (jax.tree.map(jnp.zeros_like, trainable),
           jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape))

  def body(carry, xs):
    g_sum, s_sum = carry
    mb, key = xs
    (_, stats), grads = grad_fn(trainable, frozen, mb, key)
    return (jax.tree.map(jnp.add, g_sum, grads),
            jax.tree.map(jnp.add, s_sum, stats)), None

  (g_sum, stats), _ = lax.scan(body, zeros, (micro, rngs))
  return jax.tree.map(lambda g: g / accum_steps, g_sum), stats


def train_step(state: TrainState, frozen: PyTree, batch: PyTree, *,
               loss_fn: LossFn, tx: optax.GradientTransformation,
               accum_steps: int = 1, axis_name: str | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update.

  Args:
    state: the current state.
    frozen: the frozen base parameters (no gradient).
    batch: a dict of ``[B, ...]`` arrays (per device under pmap).
    loss_fn: ``(trainable, frozen, batch, rng) -> (loss, stats)``.
    tx: the optimizer.
    accum_steps: micro-batches per update (see ``compute_grads``).
    axis_name: the pmap / shard_map axis to average gradients over
      (``lax.pmean``) and to sum stats over (``lax.psum``); None on one
      device or under jit with shardings (XLA reduces there).

  Returns:
    ``(new_state, metrics)``: ``loss`` (the mean over the batch),
    ``grad_norm`` (before clipping), ``param_norm`` (after the update) and
    the summed stats.
  """
  rng = step_rng(state, axis_name)
  grads, stats = compute_grads(state.trainable, frozen, batch, rng,
                               loss_fn=loss_fn, accum_steps=accum_steps)
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
    stats = lax.psum(stats, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  metrics = dict(stats)
  metrics['loss'] = stats['loss_sum'] / jnp.maximum(stats['count'], 1.0)
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['param_norm'] = optax.tree.norm(trainable)
  new_state = TrainState(step=state.step + 1, trainable=trainable,
                         opt_state=opt_state, rng=state.rng)
  return new_state, metrics


def scan_steps(step_fn: Callable[..., tuple[PyTree, PyTree]], state: PyTree,
               frozen: PyTree, batches: PyTree, active: jax.Array
               ) -> tuple[PyTree, PyTree]:
  """Several train steps in one call: ``step_fn`` over ``len(active)``
  batches stacked on a leading axis, under ``lax.scan``.

  Where ``active[i]`` is False, step ``i`` is skipped (``lax.cond``: its
  branch does not run): the state passes through and its metrics are
  zeros. A loop whose chunks sometimes end early (an evaluation or a
  checkpoint falls inside) thus compiles one program for every chunk.

  Why: XLA's CPU runtime allocates a step's temporaries at the start of
  each call and frees them at the end; glibc hands such large blocks back
  to the kernel, which maps and zeroes them again one 4 KiB page at a time
  on the next call. In one call of ``k`` steps that happens once, not ``k``
  times (see ``config.steps_per_call``). A step inside the scan computes
  what it computes alone, up to float rounding (XLA may fuse the loop body
  differently); the step's key is still ``fold_in(rng, step)``.

  Args:
    step_fn: ``(state, frozen, batch) -> (state, metrics)``, e.g.
      ``functools.partial(train_step, loss_fn=..., tx=...)``.
    state: the state before the first step.
    frozen: the frozen base, the same for every step.
    batches: a tree of ``[k, B, ...]`` arrays, batch ``i`` at index ``i``.
    active: bool ``[k]``.

  Returns:
    ``(state after the active steps, metrics of every step)``: each metric
    ``[k]``, zeros where the step was skipped.
  """
  first = jax.tree.map(lambda x: x[0], batches)
  _, metric_shapes = jax.eval_shape(step_fn, state, frozen, first)

  def skip(s, batch):
    del batch
    return s, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype),
                           metric_shapes)

  def body(s, xs):
    batch, on = xs
    return lax.cond(on, lambda s, b: step_fn(s, frozen, b), skip, s, batch)

  return lax.scan(body, state, (batches, active))


def eval_step(trainable: PyTree, frozen: PyTree, batch: PyTree, *,
              eval_fn: EvalFn, axis_name: str | None = None) -> Stats:
  """Summed evaluation stats of one batch (``psum``-ed over ``axis_name``).

  Rows whose ``batch['valid']`` is False (padding of the last batch) must
  count for nothing; ``eval_fn`` sees ``valid`` and weights by it.
  """
  stats = eval_fn(trainable, frozen, batch)
  if axis_name is not None:
    stats = lax.psum(stats, axis_name)
  return stats


def sum_stats(total: dict[str, Any] | None, stats: dict[str, Any]
              ) -> dict[str, float]:
  """Adds one batch's stats (fetched to the host) to a running total."""
  stats = {k: float(v) for k, v in jax.device_get(stats).items()}
  if total is None:
    return stats
  return {k: total[k] + stats[k] for k in total}
