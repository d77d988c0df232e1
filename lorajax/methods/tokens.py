"""Trainable token rows: train chosen rows of an embedding table, no more.

A user who adds tokens to a vocabulary (chat markers such as
``<|tool_call|>``) needs those rows of the embedding (and of the output
head) trained, and nothing else of a table that may hold 150k rows. As
PEFT's ``TrainableTokensLayer`` does, the trained values of the ``n`` chosen
rows are a separate ``[n, d]`` leaf, and the model runs with the table those
rows are written into::

  table' = table.at[indices].set(values)     # values [n, d], trainable

so the trainable tree, the optimizer state and every checkpoint hold
``n·d`` numbers per table, while the ``[V, d]`` table stays in the frozen
base. The values *replace* the rows (PEFT calls the leaf
``trainable_tokens_delta`` but writes it with ``index_copy``); they start as
the rows themselves, so an untrained model equals the base. Replacing rather
than adding keeps a result defined when the base's new rows were drawn at
random by a resize: the trained values never depend on them.

A ``TrainableTokens`` names the tables (``TokenTable``: a parameter path, the
axis that counts the vocabulary and the row indices). A tied output head
(``h @ embedding.T``) is the embedding itself, so it follows the embedding's
rows; an untied head kernel (a Flax ``Dense`` ``[d, V]``, vocabulary on axis
1) is a second table.

Example:

  >>> import numpy as np
  >>> params = {'embed': {'embedding': np.arange(12.).reshape(6, 2)}}
  >>> table = TokenTable('embed/embedding', (4, 1))
  >>> rows = TrainableTokens.of({'embed': table})
  >>> values = rows.init(params)
  >>> values['embed'].tolist()
  [[8.0, 9.0], [2.0, 3.0]]
  >>> out = rows.apply(params, {'embed': values['embed'] + 100})
  >>> np.asarray(out['embed']['embedding'])[[0, 1, 4]].tolist()
  [[0.0, 1.0], [102.0, 103.0], [108.0, 109.0]]
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import spec as spec_lib

PyTree = Any
# The noise of new rows: N(mean, EPSILON · covariance) of the old rows, as
# transformers' resize_token_embeddings(mean_resizing=True) draws them.
EPSILON = 1e-9


@dataclasses.dataclass(frozen=True)
class TokenTable:
  """Rows of one table that are trained.

  Attributes:
    path: the ``/``-joined parameter path (``'embed/embedding'``).
    indices: the row (token) ids, distinct.
    axis: the axis of the table that counts the vocabulary: 0 for an
      embedding ``[V, d]``, 1 for a Flax ``Dense`` head kernel ``[d, V]``.
  """
  path: str
  indices: tuple[int, ...]
  axis: int = 0

  def rows(self, table: Any) -> np.ndarray:
    """The table's ``[n, d]`` rows at ``indices`` (float32)."""
    moved = np.moveaxis(np.asarray(table), self.axis, 0)
    return np.asarray(moved[np.asarray(self.indices)], np.float32)

  def write(self, table: jax.Array, values: jax.Array) -> jax.Array:
    """``table`` with ``values`` ``[n, d]`` as its rows at ``indices``."""
    where = (slice(None),) * self.axis + (np.asarray(self.indices, np.int32),)
    return jnp.asarray(table).at[where].set(
        jnp.moveaxis(values, 0, self.axis).astype(table.dtype))


@dataclasses.dataclass(frozen=True)
class TrainableTokens:
  """The trained rows of a model's tables, by name (``'embed'``, ``'head'``).

  ``init`` gives the values (``{name: [n, d]}``) to train; ``apply`` writes
  them into the parameters, inside ``jit`` or out (what ``merge`` folds).
  """
  tables: tuple[tuple[str, TokenTable], ...]

  @classmethod
  def of(cls, tables: Mapping[str, TokenTable]) -> TrainableTokens:
    return cls(tuple(tables.items()))

  @property
  def by_name(self) -> dict[str, TokenTable]:
    return dict(self.tables)

  def check(self, params: PyTree, where: str = 'trainable tokens') -> None:
    """Raises ValueError for an index or a table that does not fit ``params``.

    ``where`` names the setting in messages (``'config.trainable_tokens'``).
    """
    leaves = dict(spec_lib.flatten_paths(params))
    for name, table in self.tables:
      if table.path not in leaves:
        raise ValueError(f'{where}: the {name} table {table.path!r} is not a '
                         f'parameter of this model')
      leaf = leaves[table.path]
      if spec_lib.is_kernel_node(leaf):
        raise ValueError(f'{where}: {table.path!r} is stored quantized; token '
                         'rows are written into a float table')
      shape = np.shape(leaf)
      if len(shape) != 2 or table.axis not in (0, 1):
        raise ValueError(f'{where}: {table.path!r} has shape {shape}; token '
                         'rows need a 2-D table')
      check_indices(table.indices, shape[table.axis],
                    f'{where} ({table.path}, {shape[table.axis]} rows)')

  def init(self, params: PyTree) -> dict[str, np.ndarray]:
    """``{name: [n, d] float32}``: the tables' rows as they are now."""
    self.check(params)
    leaves = dict(spec_lib.flatten_paths(params))
    return {name: table.rows(leaves[table.path]) for name, table in self.tables}

  def apply(self, params: PyTree, values: Mapping[str, Any]) -> PyTree:
    """``params`` (nested dicts) with ``values`` written into the rows.

    Works on traced values under ``jit``; a gradient reaches ``values``
    only, as ``params`` is not differentiated.

    Raises:
      ValueError: ``values`` without a table's entry, or rows of another
        count.
    """
    for name, table in self.tables:
      if name not in values:
        raise ValueError(f'trainable token values have no {name!r} entry '
                         f'(have {sorted(values)})')
      if np.shape(values[name])[0] != len(table.indices):
        raise ValueError(f'trainable token values {name!r} have shape '
                         f'{np.shape(values[name])}; {len(table.indices)} '
                         f'rows expected')
    out = params
    for name, table in self.tables:
      out = replace_path(out, table.path.split('/'),
                     functools.partial(table.write, values=values[name]))
    return out

  merge = apply

  def count(self, values: Mapping[str, Any]) -> int:
    """The number of trained scalars (``n·d`` per table)."""
    return sum(int(np.prod(np.shape(v))) for v in values.values())

  def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(params, *args, tokens=values, **kw)``: ``fn`` on ``params``
    with the rows written; without ``tokens`` (or ``{}``), ``fn`` as is."""
    def wrapped(params, *args, tokens=None, **kwargs):
      if tokens:
        params = self.apply(params, tokens)
      return fn(params, *args, **kwargs)
    return wrapped


def replace_path(tree: PyTree, keys: Sequence[str], fn: Callable[[Any], Any]
             ) -> PyTree:
  """``tree`` (nested dicts) with ``fn`` applied at ``keys`` (a path split
  at ``/``); the dicts on the way are copied, everything else shared."""
  if not keys:
    return fn(tree)
  if not isinstance(tree, Mapping):
    raise ValueError(f'no dict entry {keys[0]!r} in a {type(tree).__name__}')
  out = dict(tree)
  out[keys[0]] = replace_path(tree[keys[0]], keys[1:], fn)
  return out


def check_indices(indices: Sequence[Any], vocab_size: int, where: str
                  ) -> tuple[int, ...]:
  """The indices as ints, or ValueError naming ``where`` and the bad value.

  Refused: no index, a non-integer, one outside ``[0, vocab_size)``, and
  the same index twice.
  """
  if not len(indices):
    raise ValueError(f'{where}: no token index given')
  out, seen = [], set()
  for i in indices:
    if not isinstance(i, numbers.Integral) or isinstance(i, bool):
      raise ValueError(f'{where}: token index {i!r} is not an integer')
    i = int(i)
    if not 0 <= i < vocab_size:
      raise ValueError(f'{where}: token index {i} is out of range; the '
                       f'table has {vocab_size} rows (0..{vocab_size - 1})')
    if i in seen:
      raise ValueError(f'{where}: token index {i} is listed twice')
    seen.add(i)
    out.append(i)
  return tuple(out)


def grow(table: Any, new_size: int, key: jax.Array, axis: int = 0
         ) -> np.ndarray:
  """``table`` with rows appended up to ``new_size`` along ``axis``.

  The new rows are drawn as transformers' ``resize_token_embeddings`` draws
  them (``mean_resizing=True``): from a normal with the old rows' mean and
  ``EPSILON`` times their covariance, so they sit at the centre of the old
  rows (Hewitt's recipe) and differ from one another by a tiny amount. The
  draw is ``mean + sqrt(EPSILON / V) · z @ (rows - mean)`` with ``z`` of
  ``[added, V]`` standard normals (whose covariance is exactly that), in
  the table's dtype.

  Raises:
    ValueError: ``new_size`` smaller than the table.
  """
  table = np.asarray(table)
  old = np.moveaxis(table, axis, 0).astype(np.float32)
  added = new_size - old.shape[0]
  if added < 0:
    raise ValueError(f'cannot shrink a table of {old.shape[0]} rows to '
                     f'{new_size}')
  if added == 0:
    return table
  mean = old.mean(0)
  z = np.asarray(jax.random.normal(key, (added, old.shape[0]), jnp.float32))
  new = mean + np.sqrt(EPSILON / old.shape[0]) * (z @ (old - mean))
  out = np.concatenate([old, new.astype(np.float32)], 0).astype(table.dtype)
  return np.moveaxis(out, 0, axis)
