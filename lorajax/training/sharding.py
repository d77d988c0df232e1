"""Shardings of a run over a ``('data', 'model')`` device mesh.

The layout ``lorajax.training.parallel``'s mesh runner uses:

- batch leaves ``[B, ...]``: rows over ``'data'``;
- frozen leaves (and trained leaves that are not adapters) of two or more
  axes: one axis over ``'model'`` (FSDP) — the largest axis divisible by the
  ``'model'`` size, the last of equal ones, never a stack axis of scanned
  layers; everything else replicated;
- adapters follow their base kernel with the rank axis replicated: LoRA's
  ``a`` ``[*stack, *in, r]`` shards its ``in`` axes as the kernel's
  contracting axes are sharded, ``b`` ``[*stack, r, *out]`` its ``out`` axes
  as the kernel's free axes; other adapter leaves shaped ``[*stack, *out]``
  (DoRA's magnitude) follow the free axes, the rest are replicated;
- optimizer state: each parameter-shaped subtree follows the trainable tree;
  counters, the step and the RNG are replicated.

The rules are pure functions over shapes that return ``PartitionSpec`` trees
(no devices needed); ``named`` binds them to a mesh.

Example:

  >>> fsdp_spec((32, 64), 2)
  P(None, 'model')
  >>> fsdp_spec((30, 7), 4)
  P()
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import lorajax
from lorajax import kernels as kernel_lib
from lorajax import spec as spec_lib
from lorajax.training import step as step_lib

PyTree = Any
DATA = 'data'
MODEL = 'model'


def is_spec(x: Any) -> bool:
  """Whether ``x`` is a ``PartitionSpec`` (a leaf of a spec tree)."""
  return isinstance(x, P)


def make_mesh(data: int = -1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``Mesh`` of shape ``(data, model)`` with axes ``('data', 'model')``.

  Devices are ordered by process, so process ``p`` of ``P`` holds the
  ``p``-th block of ``'data'`` rows: the block of every global batch that
  ``lorajax.data.loader.BatchIterator`` gives it. The mesh's axes are
  ``Auto`` (the compiler propagates shardings inside the step).

  Args:
    data: size of the data axis; -1 takes all devices left.
    model: size of the model (FSDP) axis.
    devices: defaults to ``jax.devices()`` (all processes).

  Raises:
    ValueError: sizes that do not multiply to the device count, or a model
      axis that would span processes.
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f'mesh model={model} does not divide the {n} devices')
  data = n // model if data == -1 else data
  if data * model != n:
    raise ValueError(f'mesh data={data} x model={model} needs {data * model} '
                     f'devices; there are {n}')
  grid = np.array(devices, dtype=object).reshape(data, model)
  procs = sorted({d.process_index for d in devices})
  for row in grid:
    if len({d.process_index for d in row}) > 1:
      raise ValueError(
          f'mesh model={model} spans processes {procs}: each process has '
          f'{n // len(procs)} devices; use a model axis that divides that')
  return Mesh(grid, (DATA, MODEL))


def fsdp_spec(shape: Sequence[int], model_size: int, *,
              skip: int = 0) -> P:
  """The FSDP spec of one leaf: one large axis over ``'model'``.

  Args:
    shape: the leaf's shape.
    model_size: the size of the ``'model'`` mesh axis.
    skip: leading axes never sharded (stack axes of scanned layers).

  Returns:
    ``P()`` for leaves of fewer than two axes, a model axis of size 1, or no
    divisible axis; else ``'model'`` on the largest divisible axis (the last
    of equal ones) and None elsewhere.
  """
  shape = tuple(shape)
  if model_size <= 1 or len(shape) < 2:
    return P()
  axes = [i for i in range(skip, len(shape)) if shape[i] % model_size == 0]
  if not axes:
    return P()
  best = max(axes, key=lambda i: (shape[i], i))
  return P(*(MODEL if i == best else None for i in range(len(shape))))


def adapter_specs(kernel_spec: P, kernel_ndim: int,
                  layout: spec_lib.KernelLayout,
                  shapes: Mapping[str, Sequence[int]]) -> dict[str, P]:
  """Specs of one kernel's adapter leaves, following the kernel's.

  Args:
    kernel_spec: the base kernel's spec.
    kernel_ndim: its number of axes.
    layout: how the kernel is used (stack, contracting and free axes).
    shapes: adapter leaf name -> shape (``{'a': ..., 'b': ...}`` for LoRA).

  Returns:
    name -> spec: ``a`` ``P(*stack, *in, None)``, ``b``
    ``P(*stack, None, *out)``, a ``[*stack, *out]`` leaf ``P(*stack, *out)``,
    anything else ``P()``.
  """
  k = tuple(kernel_spec) + (None,) * (kernel_ndim - len(kernel_spec))
  call = k[layout.stack:]
  stack = k[:layout.stack] + tuple(call[i] for i in layout.batch)
  ins = tuple(call[i] for i in layout.contract)
  outs = tuple(call[i] for i in layout.free)
  out = {}
  for name, shape in shapes.items():
    ndim = len(shape)
    if name == 'a' and ndim == len(stack) + len(ins) + 1:
      out[name] = P(*stack, *ins, None)
    elif name == 'b' and ndim == len(stack) + 1 + len(outs):
      out[name] = P(*stack, None, *outs)
    elif ndim == len(stack) + len(outs) and ndim:
      out[name] = P(*stack, *outs)
    else:
      out[name] = P()
  return out


def _kernel_and_adapter_specs(params: PyTree, adapters: PyTree,
                              spec: spec_lib.LoraSpec, model_size: int
                              ) -> tuple[dict[str, P], dict[str, dict]]:
  """Specs of adapted kernels (path -> spec) and of their adapter leaves."""
  kernels, adapter = {}, {}
  for path, provider in spec_lib.resolve(spec, params).adapted.items():
    kernel = spec_lib.get_by_path(params, path)
    shape = tuple(provider.kernel_aval(kernel).shape)
    if not provider.has_params:
      continue  # A quantized base with no adapter: the frozen rule applies.
    ad = spec_lib.get_by_path(adapters, path)
    layout = kernel_lib.layout_of(ad, path)
    quantized = spec_lib.is_kernel_node(kernel)
    kernels[path] = P() if quantized else fsdp_spec(shape, model_size,
                                                    skip=layout.stack)
    adapter[path] = adapter_specs(kernels[path], len(shape), layout,
                                  {n: np.shape(v) for n, v in ad.items()})
  return kernels, adapter


def param_specs(trainable: PyTree, frozen: PyTree, spec: spec_lib.LoraSpec,
                model_size: int) -> tuple[PyTree, PyTree]:
  """Specs of the trainable tree and the frozen base.

  Args:
    trainable: ``{'adapters': ..., 'params': ...}`` and optionally
      ``'prompts'`` (replicated), arrays or shapes.
    frozen: the frozen base (quantized kernels are kept whole: replicated).
    spec: the spec that split them.
    model_size: size of the ``'model'`` mesh axis.

  Returns:
    ``(trainable_specs, frozen_specs)``: trees of ``PartitionSpec`` shaped
    like the inputs (a quantized kernel node gets one spec).
  """
  params = lorajax.combine(trainable.get('params', {}), frozen)
  adapters = trainable.get('adapters', {})
  kernels, per_kernel = _kernel_and_adapter_specs(params, adapters, spec,
                                                  model_size)

  def plain(keypath, x):
    path = spec_lib.path_str(keypath)
    if spec_lib.is_kernel_node(x):
      return P()
    if path in kernels:
      return kernels[path]
    return fsdp_spec(np.shape(x), model_size)

  def adapter(keypath, _):
    kernel_path, _, name = spec_lib.path_str(keypath).rpartition('/')
    return per_kernel.get(kernel_path, {}).get(name, P())

  map_paths = jax.tree_util.tree_map_with_path
  out = {k: v for k, v in trainable.items()}
  out['adapters'] = map_paths(adapter, adapters)
  if 'params' in trainable:
    out['params'] = map_paths(plain, trainable['params'],
                              is_leaf=spec_lib.is_kernel_node)
  for small in ('prompts', 'tokens'):  # Small, used whole: replicated.
    if small in trainable:
      out[small] = jax.tree.map(lambda _: P(), trainable[small])
  return out, map_paths(plain, frozen, is_leaf=spec_lib.is_kernel_node)


def state_specs(tx: optax.GradientTransformation, state: step_lib.TrainState,
                trainable_specs: PyTree) -> step_lib.TrainState:
  """Specs of a ``TrainState``: optimizer state follows ``trainable_specs``."""
  opt = optax.tree_map_params(tx, lambda _, s: s, state.opt_state,
                              trainable_specs,
                              transform_non_params=lambda _: P())
  return step_lib.TrainState(step=P(), trainable=trainable_specs,
                             opt_state=opt, rng=P())


def named(mesh: Mesh, specs: PyTree) -> PyTree:
  """A tree of ``NamedSharding``s from a tree of specs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=is_spec)


def _put_leaf(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding,
                                                              x.ndim):
    return x
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda v: v, out_shardings=sharding)(x)
  host = np.asarray(x)  # The same value in every process.
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def put(tree: PyTree, shardings: PyTree) -> PyTree:
  """Places ``tree`` (host values, equal in every process) on ``shardings``.

  Leaves already on their sharding are kept. ``shardings`` may be a prefix
  of ``tree`` (one sharding for a quantized kernel node).
  """
  def node(sharding, sub):
    return jax.tree.map(lambda x: _put_leaf(x, sharding), sub)
  return jax.tree.map(node, shardings, tree,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def local_data_rows(mesh: Mesh) -> int:
  """How many ``'data'`` shards this process's devices hold.

  Raises:
    ValueError: if they are not one contiguous block (see ``make_mesh``).
  """
  me = jax.process_index()
  rows = sorted({i for (i, _), d in np.ndenumerate(mesh.devices)
                 if d.process_index == me})
  if rows != list(range(rows[0], rows[0] + len(rows))):
    raise ValueError(f'process {me} holds data rows {rows} of the mesh, not '
                     'one contiguous block; build it with make_mesh')
  return len(rows)


def put_batch(batch: PyTree, sharding: NamedSharding) -> PyTree:
  """A global batch from this process's rows (its slice of every batch).

  Args:
    batch: dict of ``[B_local, ...]`` host arrays.
    sharding: ``NamedSharding(mesh, P('data'))``.

  Returns:
    Global arrays ``[B_local * process_count, ...]`` sharded by rows.

  Raises:
    ValueError: if ``B_local`` does not split over this process's data
      shards.
  """
  shards = local_data_rows(sharding.mesh)

  def leaf(x):
    x = np.asarray(x)
    if x.shape[0] % shards:
      raise ValueError(f'a batch of {x.shape[0]} rows in process '
                       f'{jax.process_index()} does not split over its '
                       f'{shards} data shards; pick a batch size divisible '
                       f'by mesh data={sharding.mesh.shape[DATA]}')
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(leaf, batch)


def to_host(tree: PyTree) -> PyTree:
  """NumPy copies of every leaf, gathered across processes if need be."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, 'is_fully_addressable', True) for x in leaves):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
