"""Split parameters into trainable and frozen parts, and the optimizer mask.

The training step differentiates only the trainable argument:

  trainable = {'adapters': adapters, 'params': train}   # small
  frozen = frozen                                        # the base
  jax.value_and_grad(loss)(trainable, frozen, batch)

so frozen leaves get no gradient and no optimizer state. For code that keeps
one tree, ``optimizer(tx, labels)`` wraps ``tx`` with ``optax.partition`` and
``optax.set_to_zero`` on frozen labels, which also holds no state for them.

Any pytree of parameters works: nested dicts, lists, tuples, NamedTuples,
registered dataclasses (``flax.struct.dataclass``), ``flax.nnx.State`` (from
``nnx.split``) and any mix of them. A part is ``params`` with the other part's
leaves taken out:

- in a plain ``dict`` the entry is removed, and a dict left empty is removed
  from its parent (the format checkpoints store for dict trees);
- in any other container (list, tuple, NamedTuple, dataclass, ``State``, a
  dict subclass, ...) the entry is ``None`` -- an empty pytree, so ``jit``
  and optax accept it -- and the container keeps its type, its length and
  its static data; a container left with only ``None`` is itself removed
  from (or ``None`` in) its parent;
- subtrees that hold no leaf at all in ``params`` (``{}``, ``[]``, ``None``)
  go to the frozen part, so nothing is lost;
- the root is never removed: an empty part is ``{}`` for a dict root and the
  root container with ``None`` everywhere otherwise.

``combine(*partition(params, spec))`` has the treedef and the leaves (the very
objects) of ``params``.
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


class _Empty:
  """Marks a subtree with nothing left in it (distinct from a real None)."""

  def __repr__(self) -> str:
    return '<empty>'


_EMPTY = _Empty()


def _join(prefix: str, key: str) -> str:
  return f'{prefix}/{key}' if prefix else key


def _children(node: Any):
  """``(treedef, [(key, child), ...])`` one level down, or None for a leaf.

  ``treedef.unflatten`` of as many children (``None`` allowed) rebuilds the
  node with its type and static data. ``None`` is a node with no children.
  """
  if spec_lib.is_kernel_node(node):
    return None
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      node, is_leaf=lambda x: x is not node)
  if len(flat) == 1 and not flat[0][0] and flat[0][1] is node:
    return None
  return treedef, [(path[0], child) for path, child in flat]


def _is_plain_dict(node: Any) -> bool:
  # Only plain dicts are pruned; a dict subclass may carry static data.
  return type(node) is dict  # pylint: disable=unidiomatic-typecheck


def _describe(node: Any) -> str:
  if node is None:
    return 'None'
  kids = _children(node)
  if kids is None:
    return f'a leaf of shape {tuple(np.shape(node))}' if hasattr(
        node, 'shape') else f'a leaf of type {type(node).__name__}'
  if _is_plain_dict(node):
    return f'a dict with keys {sorted(map(str, node))[:16]}'
  keys = [spec_lib.key_str(k) for k, _ in kids[1]]
  return f'a {type(node).__name__} with entries {keys[:16]}'


def _select(node: Any, path: str, keep: set[str], keep_leafless: bool) -> Any:
  """``node`` with only the leaves whose path is in ``keep``, or _EMPTY."""
  kids = _children(node)
  if kids is None:
    return node if path in keep else _EMPTY
  treedef, items = kids
  if not items:
    return node if keep_leafless else _EMPTY
  if _is_plain_dict(node):
    out = {}
    for k, child in node.items():
      sub = _select(child, _join(path, str(k)), keep, keep_leafless)
      if sub is not _EMPTY:
        out[k] = sub
    return out or _EMPTY
  subs = [_select(child, _join(path, spec_lib.key_str(k)), keep,
                  keep_leafless) for k, child in items]
  if all(s is _EMPTY for s in subs):
    return _EMPTY
  return treedef.unflatten([None if s is _EMPTY else s for s in subs])


def _empty_root(params: PyTree) -> PyTree:
  if _is_plain_dict(params):
    return {}
  treedef, items = _children(params)
  return treedef.unflatten([None] * len(items))


def partition(params: PyTree, spec: spec_lib.LoraSpec
              ) -> tuple[PyTree, PyTree]:
  """Returns ``(train, frozen)``: two trees holding disjoint leaves.

  ``train`` holds the leaves whose rule says ``'train'``; ``frozen`` holds
  the rest (the adapted kernels included). Plain dicts are pruned; other
  containers keep their shape with ``None`` where the other part's leaves
  are (see the module docstring). ``combine(train, frozen)`` gives
  ``params`` back exactly.

  Example:

    >>> import numpy as np
    >>> spec = spec_lib.LoraSpec([(r'.*head/.*', 'train'), (r'.*', 'freeze')])
    >>> train, frozen = partition(
    ...     {'layers': [{'w': np.ones(2)}], 'head': {'w': np.ones(3)}}, spec)
    >>> train
    {'head': {'w': array([1., 1., 1.])}}
    >>> frozen
    {'layers': [{'w': array([1., 1.])}]}
    >>> partition([np.ones(2), {'head': {'w': np.ones(1)}}], spec)[1]
    [array([1., 1.]), None]

  Raises:
    TypeError: ``params`` is a single leaf, not a container of parameters.
    ValueError: from ``spec.resolve`` (a leaf no rule covers, ...).
  """
  if _children(params) is None:
    raise TypeError(f'partition needs a pytree of parameters (dict, list, '
                    f'dataclass, nnx.State, ...), got a single leaf of type '
                    f'{type(params).__name__}')
  resolution = spec_lib.resolve(spec, params)
  train = set(resolution.trained)
  frozen = set(resolution.actions) - train
  parts = (_select(params, '', train, keep_leafless=False),
           _select(params, '', frozen, keep_leafless=True))
  return tuple(_empty_root(params) if p is _EMPTY else p for p in parts)


def _merge(x: Any, y: Any, path: str) -> Any:
  if x is None:
    return y
  if y is None:
    return x
  x_kids, y_kids = _children(x), _children(y)
  where = repr(path) if path else 'the root'
  if x_kids is None and y_kids is None:
    raise ValueError(f'combine: {where} is in more than one tree')
  if _is_plain_dict(x) and _is_plain_dict(y):
    out = dict(x)
    for k, v in y.items():
      out[k] = _merge(x[k], v, _join(path, str(k))) if k in x else v
    return out
  if x_kids is None or y_kids is None or x_kids[0] != y_kids[0]:
    raise ValueError(f'combine: the trees differ at {where}: one has '
                     f'{_describe(x)}, another {_describe(y)}; combine '
                     f'takes parts of one tree, as partition returns them')
  merged = [_merge(a, b, _join(path, spec_lib.key_str(k)))
            for (k, a), (_, b) in zip(x_kids[1], y_kids[1])]
  return x_kids[0].unflatten(merged)


def combine(*trees: PyTree) -> PyTree:
  """Joins trees with disjoint leaves (the inverse of ``partition``).

  Plain dicts are unioned key by key; any other container must have the same
  type, entries and static data in every tree that has it, and ``None`` in
  one tree gives way to the other's entry. ``{}`` and ``None`` stand for an
  empty part. Works on traced values inside ``jit``.

  Example:

    >>> combine({'a': 1, 'b': {'c': 2}}, {'b': {'d': 3}})
    {'a': 1, 'b': {'c': 2, 'd': 3}}
    >>> combine([1, None, (None, 4)], [None, 2, (3, None)])
    [1, 2, (3, 4)]

  Raises:
    ValueError: a leaf in more than one tree; containers that differ at a
      path (a list in one tree and a tuple in another, other keys, other
      lengths, a leaf against a container).
  """
  out: Any = None
  for tree in trees:
    if tree is None or (_is_plain_dict(tree) and not tree):
      continue
    out = _merge(out, tree, '')
  return {} if out is None else out


def labels(params: PyTree, spec: spec_lib.LoraSpec) -> PyTree:
  """``'trainable'``/``'frozen'`` per leaf of ``params`` (adapted kernels are
  frozen: their adapters, not they, are trained).

  The result has the structure of ``params`` (any pytree), so it can be
  handed to ``optimizer`` / ``optax.partition``.

  Example:

    >>> spec = spec_lib.LoraSpec([(r'1/.*', 'train'), (r'.*', 'freeze')])
    >>> labels([{'w': 0.}, (1., 2.)], spec)
    [{'w': 'frozen'}, ('trainable', 'trainable')]
  """
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
  """The number of scalars in ``tree``; a FrozenKernel counts as its kernel.

  Example:

    >>> count({'a': [np.zeros((2, 3)), None], 'b': (np.zeros(4),)})
    10
  """
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=spec_lib.is_kernel_node):
    shape = (leaf.aval().shape if spec_lib.is_kernel_node(leaf)
             else np.shape(leaf))
    total += int(np.prod(shape))
  return total


def trainable_report(spec: spec_lib.LoraSpec, params: PyTree,
                     adapters: PyTree, *, tokens: PyTree = None,
                     log: bool = False) -> str:
  """Returns ``trainable params: N || all params: M || trainable%: P`` and,
  per rule, the paths it matched. ``all`` counts the base plus the adapters.

  ``tokens``: trained token rows (``{'embed': [n, d], ...}``,
  ``lorajax.methods.tokens``): their ``n·d`` values count as trainable (and
  in ``all``, as PEFT counts its ``trainable_tokens_delta``), not the
  ``[V, d]`` tables they are written into, which stay frozen.

  The caller prints or logs the text; ``log=True`` also writes it to absl
  INFO on process 0 (kept for old callers; off by default).
  """
  resolution = spec_lib.resolve(spec, params)
  trained = [leaf for path, leaf in spec_lib.flatten_paths(params)
             if resolution.actions[path] == spec_lib.TRAIN]
  n_tokens = count(tokens) if tokens else 0
  n_train = count(adapters) + count(trained) + n_tokens
  n_all = count(params) + count(adapters) + n_tokens
  lines = [f'trainable params: {n_train:,d} || all params: {n_all:,d} || '
           f'trainable%: {100.0 * n_train / max(n_all, 1):.4f}']
  if tokens:
    lines.append(f'trainable token rows: {n_tokens:,d} values (' + ', '.join(
        f'{k} {tuple(np.shape(v))}' for k, v in sorted(tokens.items())) + ')')
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
    logging.info('%s', text)
  return text
