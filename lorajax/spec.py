"""Rules that say, for every parameter, whether it is adapted, trained or frozen.

A ``LoraSpec`` is an ordered list of ``(regex, action)`` rules over the
``/``-joined paths of a parameter pytree (``params/encoder/layer_0/attention/
query/kernel``). Each path is matched with ``re.fullmatch``; the first rule
that matches decides. An action is an adapter provider (``Lora(rank=8)``,
``Dora(...)``, ...), the string ``"train"`` or the string ``"freeze"``.

Every leaf must be covered by some rule, and every rule that asks for an
adapter or for training must match at least one leaf: a typo in a regex is an
error, not a silently frozen model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from lorajax.kernels import AdapterParams  # pylint: disable=unused-import
from lorajax.kernels import DotDims
from lorajax.kernels import FrozenKernel
from lorajax.kernels import is_kernel_node
from lorajax.kernels import KernelLayout

PyTree = Any
TRAIN = 'train'
FREEZE = 'freeze'


class Adapter:
  """Base class of adapter providers (``Lora``, ``Dora``, ``QLora``, ...).

  A provider says how ``y = x ⊗ W`` is computed for the kernels its rule
  targets and which parameters it owns. Subclasses are frozen dataclasses and
  implement ``param_shapes``, ``init_params``, ``dot`` and ``merge``.
  Every method that needs the kernel's layout is given it: it was read
  from the function when the adapter was made and travels with it
  (``AdapterParams.layout``).

  Attributes:
    has_params: False for providers that own no trainable parameters (a
      quantized frozen base): ``init`` stores ``{}`` for them and an adapter
      tree may omit their paths.
  """

  has_params = True
  # Whether the provider adapts kernels with batch axes (one adapter per
  # index: MoE experts, ensemble members); others are refused by name.
  supports_batch = False
  # Kernel axes to treat as batch axes although a product leaves them free
  # (see ``Lora.batch_axes``); None: only dot_general's batch axes.
  batch_axes: tuple[int, ...] | None = None

  def init_params(self, key: jax.Array, kernel: Any, layout: KernelLayout
           ) -> dict[str, jax.Array]:
    raise NotImplementedError

  def dot(self, x: jax.Array, kernel: Any, params: dict[str, jax.Array],
          dims: 'DotDims', *, rng: jax.Array | None,
          context: Any = None) -> jax.Array:
    """Computes the adapted ``dot_general``; ``context`` is the caller's
    ``lora_context`` (None unless given)."""
    raise NotImplementedError

  def merge(self, kernel: Any, params: dict[str, jax.Array],
            layout: KernelLayout) -> jax.Array:
    raise NotImplementedError

  def param_shapes(self, kernel_shape: Sequence[int], layout: KernelLayout
                   ) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter parameters for a kernel used as ``layout``."""
    raise NotImplementedError

  def kernel_aval(self, stored: Any) -> jax.ShapeDtypeStruct:
    """The kernel the model sees, for a stored leaf (array or FrozenKernel)."""
    if isinstance(stored, FrozenKernel):
      return stored.aval()
    return jax.ShapeDtypeStruct(np.shape(stored), stored.dtype)

  def validate(self, path: str, kernel_shape: Sequence[int],
               layout: KernelLayout) -> None:
    """Raises ValueError when this provider cannot adapt such a kernel."""
    del path, kernel_shape, layout


Action = Any  # Adapter | 'train' | 'freeze'


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Ordered ``(regex, action)`` rules; first full match wins.

  Example:

    >>> import jax.numpy as jnp, lorajax
    >>> spec = LoraSpec([(r'.*/(query|value)/kernel', lorajax.Lora(rank=8)),
    ...                  (r'.*classifier/.*', 'train'),
    ...                  (r'.*', 'freeze')])
    >>> params = {'attn': {'query': {'kernel': jnp.ones((16, 16))},
    ...                    'key': {'kernel': jnp.ones((16, 16))}},
    ...           'classifier': {'bias': jnp.zeros(2)}}
    >>> sorted(resolve(spec, params).adapted), resolve(spec, params).trained
    (['attn/query/kernel'], ['classifier/bias'])
  """
  rules: tuple[tuple[str, Action], ...]

  def __init__(self, rules: Iterable[tuple[str, Action]]):
    rules = tuple((str(p), a) for p, a in rules)
    for i, (pattern, action) in enumerate(rules):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f'rule {i} regex {pattern!r} does not compile: {e}'
                         ) from None
      if not (isinstance(action, Adapter) or action in (TRAIN, FREEZE)):
        raise ValueError(
            f'rule {i} ({pattern!r}) has action {action!r}; expected an '
            f"adapter such as Lora(rank=8), 'train' or 'freeze'")
    object.__setattr__(self, 'rules', rules)


def key_str(entry: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_str(keypath: Sequence[Any]) -> str:
  """``/``-joins a JAX key path: ``('params', 'dense', 'kernel')``."""
  return '/'.join(key_str(k) for k in keypath)


def flatten_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``(path, leaf)`` pairs, in JAX flattening order; FrozenKernels are leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_kernel_node)
  return [(path_str(p), leaf) for p, leaf in flat]


@dataclasses.dataclass(frozen=True)
class Resolution:
  """The outcome of matching a spec against one parameter tree.

  Attributes:
    actions: path -> action, for every leaf, in flattening order.
    rule_of: path -> index of the rule that decided it.
  """
  actions: dict[str, Action]
  rule_of: dict[str, int]

  @property
  def adapted(self) -> dict[str, Adapter]:
    return {p: a for p, a in self.actions.items() if isinstance(a, Adapter)}

  @property
  def trained(self) -> list[str]:
    return [p for p, a in self.actions.items() if a == TRAIN]


def _shape_of(leaf: Any) -> tuple[int, ...]:
  if isinstance(leaf, FrozenKernel):
    return tuple(leaf.aval().shape)
  return tuple(np.shape(leaf))


def resolve(spec: LoraSpec, params: PyTree) -> Resolution:
  """Matches every leaf of ``params`` against ``spec``.

  Raises:
    ValueError: a leaf no rule covers; an adapter or ``'train'`` rule that
      matches no leaf (the message lists the kernel paths that exist); an
      adapter rule matching a leaf that is not a kernel of ndim >= 2.
  """
  leaves = flatten_paths(params)
  if not leaves:
    raise ValueError('the parameter tree has no leaves')
  compiled = [(re.compile(p), a) for p, a in spec.rules]
  actions, rule_of = {}, {}
  for path, leaf in leaves:
    for i, (regex, action) in enumerate(compiled):
      if regex.fullmatch(path):
        actions[path], rule_of[path] = action, i
        break
    else:
      raise ValueError(
          f'parameter {path!r} (shape {_shape_of(leaf)}) is covered by no '
          f"rule; add a rule for it, e.g. (r'.*', 'freeze') as the last one")
  kernels = [p for p, leaf in leaves if len(_shape_of(leaf)) >= 2]
  for i, (pattern, action) in enumerate(spec.rules):
    if action == FREEZE or i in rule_of.values():
      continue
    what = 'kernel' if isinstance(action, Adapter) else 'parameter'
    shown = kernels if isinstance(action, Adapter) else [p for p, _ in leaves]
    raise ValueError(
        f'rule {i} {pattern!r} -> {action!r} matches no {what} that an '
        f'earlier rule has not taken. Available {what} paths '
        f'({len(shown)}): ' + ', '.join(shown[:64])
        + (' ...' if len(shown) > 64 else ''))
  shapes = dict((p, _shape_of(leaf)) for p, leaf in leaves)
  for path, action in actions.items():
    if isinstance(action, Adapter) and len(shapes[path]) < 2:
      raise ValueError(
          f'rule {rule_of[path]} {spec.rules[rule_of[path]][0]!r} gives an '
          f'adapter to {path!r} of shape {shapes[path]}, which is not a '
          f'kernel (ndim >= 2); narrow the regex, e.g. end it in /kernel')
  return Resolution(actions, rule_of)


def set_by_path(tree: dict, path: str, value: Any) -> None:
  """Sets ``tree[k1][k2]...`` for a ``/``-joined path, creating dicts."""
  keys = path.split('/')
  node = tree
  for k in keys[:-1]:
    node = node.setdefault(k, {})
  node[keys[-1]] = value


def get_by_path(tree: PyTree, path: str) -> Any:
  node = tree
  for k in path.split('/'):
    try:
      node = node[k]
    except (KeyError, TypeError, IndexError):
      raise KeyError(f'no entry {path!r} (missing at {k!r})') from None
  return node
