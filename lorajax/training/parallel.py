"""The same train and eval steps run three ways: jit, pmap, or jit on a Mesh.

``make_runner(mode, ...)`` returns a ``Runner``: the few functions a training
loop needs to put things on devices, step, evaluate and fetch the state back.

- ``'jit'``: ``jax.jit`` on the default device.
- ``'pmap'``: ``jax.pmap`` data parallel over the local devices. State and
  frozen base are replicated (``[n_dev, ...]``), the batch is cut into
  ``[n_dev, B / n_dev, ...]``; gradients are ``pmean``-ed and stats
  ``psum``-ed over ``'batch'``. Metrics and checkpoints are the first
  replica's.
- ``'mesh'``: ``jax.jit`` with ``NamedSharding``s over a ``('data', 'model')``
  ``Mesh`` (``lorajax.training.sharding``): batch rows over ``'data'``,
  kernels FSDP over ``'model'``, adapters following their kernel with the
  rank axis replicated, optimizer state following the trainable leaves. With
  ``jax.distributed.initialize`` the mesh spans processes: each one feeds its
  own rows of every global batch (``BatchIterator``'s process slice).

Every mode computes the same losses and the same updates as ``'jit'`` on the
whole batch, up to float rounding, as long as every device sees the same
number of counted rows (``'pmap'`` averages per-device mean gradients) and
there is no dropout (``'pmap'`` folds the device index into the step key).

Example:

  >>> runner = make_runner('pmap', loss_fn=f, eval_fn=g, tx=tx)  # doctest: +SKIP
  >>> state, frozen = runner.place(state, frozen)  # doctest: +SKIP
  >>> state, metrics = runner.train_step(state, frozen, runner.put_batch(b))  # doctest: +SKIP
  >>> host_state = runner.to_host(runner.to_checkpoint(state))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from lorajax import spec as spec_lib
from lorajax.runtime import compiler
from lorajax.runtime import rng
from lorajax.training import config as config_lib
from lorajax.training import sharding as sharding_lib
from lorajax.training import step as step_lib

PyTree = Any
MODES = config_lib.MODES  # ('jit', 'pmap', 'mesh')
AXIS = 'batch'  # The pmap axis name.


class Runner(NamedTuple):
  """How steps run on devices (one per ``config.mode``).

  Attributes:
    place: ``(state, frozen) -> (state, frozen)`` on the devices; leaves
      already placed are kept.
    train_step: ``(state, frozen, batch) -> (state, metrics)``; metrics are
      scalars.
    eval_step: ``(trainable, frozen, batch) -> stats`` (scalars).
    put_batch: this process's host batch ``[B_local, ...]`` -> device batch.
    to_checkpoint: device state -> the ``TrainState`` to save (and the
      target to restore into): unreplicated under pmap, global sharded
      arrays on a mesh.
    to_host: a tree from ``to_checkpoint`` -> NumPy (gathered across
      processes on a mesh).
    mode: ``'jit'``, ``'pmap'`` or ``'mesh'``.
    shardings: on a mesh, ``{'state', 'frozen', 'batch'}`` shardings.
    train_steps: ``(state, frozen, batches, active) -> (state, metrics)``,
      several steps in one call (``step.scan_steps``: ``[k, B, ...]``
      batches, ``[k]`` metrics); mode ``'jit'`` only, else None.
  """
  place: Callable[..., Any]
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  put_batch: Callable[..., Any]
  to_checkpoint: Callable[..., Any]
  to_host: Callable[..., Any] = jax.device_get
  mode: str = 'jit'
  shardings: dict[str, Any] | None = None
  train_steps: Callable[..., Any] | None = None


def _steps(loss_fn, eval_fn, tx, accum_steps, axis_name=None):
  train = functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                            accum_steps=accum_steps, axis_name=axis_name)
  evaluate = functools.partial(step_lib.eval_step, eval_fn=eval_fn,
                               axis_name=axis_name)
  return train, evaluate


def jit_runner(*, loss_fn: step_lib.LossFn, eval_fn: step_lib.EvalFn,
               tx: optax.GradientTransformation, accum_steps: int = 1,
               compiler_options: dict[str, Any] | None = None) -> Runner:
  """``jax.jit`` on the default device (train step compiled with
  ``compiler_options``, e.g. ``lorajax.compiler_options()``)."""
  one, evaluate = _steps(loss_fn, eval_fn, tx, accum_steps)
  options = compiler_options or None
  train = jax.jit(one, compiler_options=options)
  several = jax.jit(functools.partial(step_lib.scan_steps, one),
                    compiler_options=options)
  return Runner(place=lambda state, frozen: jax.device_put((state, frozen)),
                train_step=train, eval_step=jax.jit(evaluate),
                put_batch=jax.device_put, to_checkpoint=lambda s: s,
                mode='jit', train_steps=several)


def _first(tree: PyTree) -> PyTree:
  """The first local replica of every ``[n_dev, ...]`` leaf."""
  return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)


def pmap_runner(*, loss_fn: step_lib.LossFn, eval_fn: step_lib.EvalFn,
                tx: optax.GradientTransformation, accum_steps: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Runner:
  """``jax.pmap`` data parallel over ``devices`` (default: local devices).

  Across processes (``jax.distributed.initialize``) the ``pmean``/``psum``
  run over every process's devices; each process feeds its own rows.
  """
  local = list(devices or jax.local_devices())
  n = len(local)
  rows = NamedSharding(Mesh(np.array(local, dtype=object), (AXIS,)), P(AXIS))
  train, evaluate = _steps(loss_fn, eval_fn, tx, accum_steps, AXIS)
  train = jax.pmap(train, axis_name=AXIS, devices=devices)
  evaluate = jax.pmap(evaluate, axis_name=AXIS, devices=devices)

  def replicate(x):
    if (isinstance(x, jax.Array) and x.ndim and x.shape[0] == n
        and x.sharding.is_equivalent_to(rows, x.ndim)):
      return x  # Already replicated (e.g. the frozen base on a resume).
    host = np.asarray(x)
    return jax.make_array_from_callback((n, *host.shape), rows,
                                        lambda index: host[None])

  def place(state, frozen):
    return jax.tree.map(replicate, (state, frozen))

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f'a batch of {x.shape[0]} rows does not split over '
                       f'{n} devices; pick a batch size divisible by {n} '
                       f'per process')
    return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), rows)

  def train_step(state, frozen, batch):
    state, metrics = train(state, frozen, batch)
    return state, _first(metrics)

  return Runner(place=place, train_step=train_step,
                eval_step=lambda *args: _first(evaluate(*args)),
                put_batch=lambda batch: jax.tree.map(split, batch),
                to_checkpoint=_first, mode='pmap')


def mesh_runner(*, loss_fn: step_lib.LossFn, eval_fn: step_lib.EvalFn,
                tx: optax.GradientTransformation, spec: spec_lib.LoraSpec,
                trainable: PyTree, frozen: PyTree, mesh: Mesh | None = None,
                accum_steps: int = 1,
                compiler_options: dict[str, Any] | None = None) -> Runner:
  """``jax.jit`` with ``NamedSharding``s over a ``('data', 'model')`` mesh.

  Args:
    loss_fn, eval_fn, tx, accum_steps: as for ``step_lib.train_step``.
    spec: the spec that split ``trainable`` and ``frozen``.
    trainable: the trainable tree (arrays or ``ShapeDtypeStruct``s): its
      shapes set the shardings.
    frozen: the frozen base (arrays or shapes).
    mesh: default ``sharding.make_mesh()`` (all devices on ``'data'``).
    compiler_options: XLA options for the train step.

  Returns:
    The runner; ``runner.shardings`` holds the ``TrainState``, frozen and
    batch shardings.
  """
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  model_size = mesh.shape[sharding_lib.MODEL]
  state_shape = jax.eval_shape(
      functools.partial(step_lib.create_state, tx=tx, seed=0), trainable)
  t_specs, f_specs = sharding_lib.param_specs(trainable, frozen, spec,
                                              model_size)
  state_sh = sharding_lib.named(
      mesh, sharding_lib.state_specs(tx, state_shape, t_specs))
  frozen_sh = sharding_lib.named(mesh, f_specs)
  batch_sh = NamedSharding(mesh, P(sharding_lib.DATA))
  replicated = NamedSharding(mesh, P())
  sharded = [s for s in jax.tree.leaves((t_specs, f_specs),
                                        is_leaf=sharding_lib.is_spec)
             if sharding_lib.MODEL in s]
  if jax.process_index() == 0:
    logging.info('mesh %s: %d leaves sharded over %r', dict(mesh.shape),
                 len(sharded), sharding_lib.MODEL)
  train, evaluate = _steps(loss_fn, eval_fn, tx, accum_steps)
  train = jax.jit(train, in_shardings=(state_sh, frozen_sh, batch_sh),
                  out_shardings=(state_sh, replicated),
                  compiler_options=compiler_options or None)
  evaluate = jax.jit(evaluate,
                     in_shardings=(state_sh.trainable, frozen_sh, batch_sh),
                     out_shardings=replicated)

  def place(state, frozen):
    return (sharding_lib.put(state, state_sh),
            sharding_lib.put(frozen, frozen_sh))

  return Runner(
      place=place, train_step=train, eval_step=evaluate,
      put_batch=functools.partial(sharding_lib.put_batch, sharding=batch_sh),
      to_checkpoint=lambda s: s, to_host=sharding_lib.to_host, mode='mesh',
      shardings={'state': state_sh, 'frozen': frozen_sh, 'batch': batch_sh})


def make_runner(mode: str, **kwargs: Any) -> Runner:
  """The runner of ``mode``: ``jit_runner``, ``pmap_runner`` or ``mesh_runner``.

  Args:
    mode: one of ``MODES``.
    **kwargs: the keyword arguments of that runner.

  Raises:
    ValueError: for an unknown mode.
  """
  runners = {'jit': jit_runner, 'pmap': pmap_runner, 'mesh': mesh_runner}
  if mode not in runners:
    raise ValueError(f'mode={mode!r}; expected one of {MODES}')
  return runners[mode](**kwargs)


def _check_divisible(config, parts: int, what: str) -> None:
  accum = int(config.optim.accum_steps)
  for field in ('batch_size', 'eval_batch_size'):
    size = int(config[field])
    per = size // jax.process_count()
    if size % jax.process_count() or per % parts:
      raise ValueError(f'config.{field}={size} does not split over {what} '
                       f'({parts} per process x {jax.process_count()} '
                       'processes)')
  if int(config.batch_size) % (parts * jax.process_count() * accum):
    raise ValueError(f'config.batch_size={config.batch_size} does not split '
                     f'into optim.accum_steps={accum} micro-batches on each '
                     f'of the {what}')


def runner_from_config(config, task, tx: optax.GradientTransformation
                       ) -> Runner:
  """The runner ``config.mode`` asks for (``config.mesh`` sizes the mesh).

  Args:
    config: a run config (``mode``, ``xla_options``, ``optim.accum_steps``,
      ``batch_size``,
      ``eval_batch_size``, and ``mesh.data`` / ``mesh.model`` for 'mesh').
    task: a ``lorajax.training.tasks.Task``.
    tx: the optimizer.

  Raises:
    ValueError: for an unknown mode, a mesh that does not fit the devices,
      or batch sizes that do not split over the devices.
  """
  mode = config.mode
  kwargs = dict(loss_fn=task.loss_fn, eval_fn=task.eval_fn, tx=tx,
                accum_steps=int(config.optim.accum_steps))
  if config.get('xla_options', True):
    rng.unroll_threefry()   # Same random bits; cheaper masks on CPU.
  if mode != 'pmap' and config.get('xla_options', True):
    kwargs['compiler_options'] = compiler.compiler_options(
        dtype=config.get('model', {}).get('dtype'))
  if mode == 'pmap':
    _check_divisible(config, jax.local_device_count(), 'local devices')
  elif mode == 'mesh':
    mesh = sharding_lib.make_mesh(data=int(config.mesh.data),
                                  model=int(config.mesh.model))
    _check_divisible(config, sharding_lib.local_data_rows(mesh),
                     "mesh 'data' shards")
    trainable, frozen = task.split_params()
    kwargs.update(spec=task.spec, trainable=trainable, frozen=frozen,
                  mesh=mesh)
  return make_runner(mode, **kwargs)
