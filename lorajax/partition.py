"""Split parameters into trainable and frozen parts, and the optimizer mask.

The training step differentiates only the trainable argument:

  trainable = {'adapters': adapters, 'params': train}   # small
  frozen = frozen                                        # the base
  jax.value_and_grad(loss)(trainable, frozen, batch)

so frozen leaves get no gradient and no optimizer state. For code that keeps
one tree, ``optimizer(tx, labels)`` wraps ``tx`` with ``optax.partition`` and
``optax.set_to_zero`` on frozen labels, which also holds no state for them.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import jax
import numpy as np
import optax

from lorajax import spec as spec_lib

PyTree = Any
TRAINABLE, FROZEN = 'trainable', 'frozen'


def _prune(tree: PyTree, keep: set[str], prefix: str = '') -> PyTree:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      path = f'{prefix}/{k}' if prefix else str(k)
      sub = _prune(v, keep, path)
      if sub is not None:
        out[k] = sub
    return out or None
  return tree if prefix in keep else None


def partition(params: PyTree, spec: spec_lib.LoraSpec
              ) -> tuple[PyTree, PyTree]:
  """Returns ``(train, frozen)``: nested dicts holding disjoint leaves.

  ``train`` holds the leaves whose rule says ``'train'``; ``frozen`` holds
  the rest (the adapted kernels included). ``combine(train, frozen)`` gives
  ``params`` back. Empty parts are ``{}``.
  """
  if not isinstance(params, dict):
    raise TypeError(f'partition needs nested dicts of parameters, got '
                    f'{type(params).__name__}')
  resolution = spec_lib.resolve(spec, params)
  train = set(resolution.trained)
  frozen = set(resolution.actions) - train
  return _prune(params, train) or {}, _prune(params, frozen) or {}


def combine(*trees: PyTree) -> PyTree:
  """Unions nested dicts with disjoint leaves (inverse of ``partition``)."""
  out: dict[str, Any] = {}
  for tree in trees:
    for path, leaf in spec_lib.flatten_paths(tree):
      try:
        spec_lib.get_by_path(out, path)
      except KeyError:
        spec_lib.set_by_path(out, path, leaf)
        continue
      raise ValueError(f'combine: {path!r} is in more than one tree')
  return out


def labels(params: PyTree, spec: spec_lib.LoraSpec) -> PyTree:
  """``'trainable'``/``'frozen'`` per leaf of ``params`` (adapted kernels are
  frozen: their adapters, not they, are trained)."""
  resolution = spec_lib.resolve(spec, params)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: (TRAINABLE if resolution.actions[spec_lib.path_str(p)]
                    == spec_lib.TRAIN else FROZEN),
      params, is_leaf=spec_lib.is_kernel_node)


def optimizer(tx: optax.GradientTransformation, param_labels: PyTree
              ) -> optax.GradientTransformation:
  """``tx`` on trainable labels, ``set_to_zero`` (no state) on frozen ones."""
  return optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                         param_labels)


def count(tree: PyTree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(
      tree, is_leaf=spec_lib.is_kernel_node) if not isinstance(
          x, spec_lib.FrozenKernel)) + sum(
              int(np.prod(x.aval().shape)) for x in jax.tree_util.tree_leaves(
                  tree, is_leaf=spec_lib.is_kernel_node)
              if isinstance(x, spec_lib.FrozenKernel)))


def trainable_report(spec: spec_lib.LoraSpec, params: PyTree,
                     adapters: PyTree, *, log: bool = True) -> str:
  """``trainable params: N || all params: M || trainable%: P`` and, per rule,
  the paths it matched. ``all`` counts the base plus the adapters."""
  resolution = spec_lib.resolve(spec, params)
  train, _ = partition(params, spec)
  n_train = count(adapters) + count(train)
  n_all = count(params) + count(adapters)
  lines = [f'trainable params: {n_train:,d} || all params: {n_all:,d} || '
           f'trainable%: {100.0 * n_train / max(n_all, 1):.4f}']
  for i, (pattern, action) in enumerate(spec.rules):
    paths = [p for p, r in resolution.rule_of.items() if r == i]
    lines.append(f'rule {i} {pattern!r} -> {action!r}: {len(paths)} '
                 f'parameter(s)')
    shown = 8 if action == spec_lib.FREEZE else 200  # frozen: just a sample
    lines.extend(f'    {p}' for p in paths[:shown])
    if len(paths) > shown:
      lines.append(f'    ... {len(paths) - shown} more')
  text = '\n'.join(lines)
  if log and jax.process_index() == 0:
    for line in lines:
      logging.info('%s', line)
  return text
