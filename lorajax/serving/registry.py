"""Many named adapters over one frozen base.

``AdapterRegistry`` keeps one set of base params and any number of named
adapters. Each adapter is stored with its scale folded into ``b`` and a
canonical spec (``Lora(rank=r)`` per kernel path), so two adapters that
target the same kernels at the same ranks share one spec and therefore one
compiled function: switching between them does not recompile, whatever their
``alpha``. ``None`` is the base (adapters disabled). A batch can also mix
adapters per example (``apply_mixed``), through ``MultiLora`` stacks of all
registered adapters, in one compiled function whatever the mix.

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'w': jnp.eye(2)}
  >>> apply_fn = lambda p, x: x @ p['w']
  >>> spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=1))])
  >>> ad = lorajax.init(spec, params, jax.random.key(0))
  >>> pos = jax.tree.map(jnp.ones_like, ad)           # +1·(x·1)·1ᵀ
  >>> neg = jax.tree.map(lambda v: -jnp.ones_like(v) if v.shape == (1, 2)
  ...                    else jnp.ones_like(v), ad)   # b = -1
  >>> reg = AdapterRegistry(apply_fn, params)
  >>> reg.add('pos', pos, spec); reg.add('neg', neg, spec)
  >>> reg.activate('pos'); reg(jnp.ones((1, 2)))
  Array([[3., 3.]], dtype=float32)
  >>> reg.apply_mixed(['pos', None, 'neg'], jnp.ones((3, 2)))
  Array([[ 3.,  3.],
         [ 1.,  1.],
         [-1., -1.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from lorajax import rewrite
from lorajax import spec as spec_lib
from lorajax import spec_paths
from lorajax.methods import low_rank as lora_lib
from lorajax.methods import multi
from lorajax.serving import weighted

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered adapter.

  Attributes:
    spec: canonical spec (scale 1 ``Lora`` rules, ``'train'`` leaves).
    adapters: the adapters, scale folded into ``b``.
    params: the base with this adapter's trained leaves put in.
    factors: per-kernel factors, for stacking and combining.
    trained: paths trained outright (a classifier head), if any.
  """
  spec: spec_lib.LoraSpec
  adapters: PyTree
  params: PyTree
  factors: dict[str, multi.Factors]
  trained: tuple[str, ...]


def _replace_leaves(params: PyTree, trained: PyTree) -> PyTree:
  def copy(tree):
    return {k: copy(v) for k, v in tree.items()} if isinstance(tree, dict) \
        else tree
  out = copy(params)
  for path, value in spec_lib.flatten_paths(trained):
    old = spec_lib.get_by_path(params, path)
    if tuple(jnp.shape(value)) != tuple(jnp.shape(old)):
      raise ValueError(f'trained leaf {path!r} has shape {jnp.shape(value)}, '
                       f'the base has {jnp.shape(old)}')
    spec_lib.set_by_path(out, path, jnp.asarray(value, old.dtype))
  return out


class AdapterRegistry:
  """Named LoRA adapters over one frozen base (see the module docstring).

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs)`` of the base model.
    params: the base parameters (the inner params dict).
    static_argnames: keyword arguments of ``apply_fn`` that must be Python
      values under ``jit`` (e.g. ``('deterministic',)``).
  """

  def __init__(self, apply_fn: Callable[..., Any], params: PyTree, *,
               static_argnames: Sequence[str] = ()):
    self._apply_fn = apply_fn
    self._params = params
    self._static = tuple(static_argnames)
    self._universe = [p for p, _ in spec_lib.flatten_paths(params)]
    self._entries: dict[str, Entry] = {}
    self._active: str | None = None
    self._fns: dict[Any, Callable[..., Any]] = {}
    # A private wrapper: jit caches are per function, and apply_fn may be
    # jitted elsewhere too.
    self._base = jax.jit(lambda p, *a, **k: apply_fn(p, *a, **k),
                         static_argnames=self._static)
    self._stack: tuple[tuple[str, ...], str, Any, Any] | None = None

  # ---- contents -------------------------------------------------------------

  @property
  def names(self) -> list[str]:
    return list(self._entries)

  @property
  def params(self) -> PyTree:
    return self._params

  def entry(self, name: str) -> Entry:
    if name not in self._entries:
      raise KeyError(f'no adapter {name!r}; registered: {self.names}')
    return self._entries[name]

  def add(self, name: str, adapters: PyTree, spec: spec_lib.LoraSpec, *,
          trained: PyTree | None = None) -> None:
    """Registers ``adapters`` (made with ``spec`` for this base) as ``name``.

    Args:
      name: a new name.
      adapters: the adapter tree.
      spec: its spec; adapter rules must be ``Lora``.
      trained: leaves the spec trains outright (e.g. a classifier head),
        nested like the params; by default they are the base's.

    Raises:
      ValueError: a taken name; a spec, adapters or trained leaves that do
        not fit the base (the message names the path and shapes).
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f'adapter names are non-empty strings, got {name!r}')
    if name in self._entries:
      raise ValueError(f'an adapter named {name!r} is registered already')
    resolution = spec_lib.resolve(spec, self._params)
    rewrite.check_adapter_paths(adapters, resolution.adapted)
    factors = multi.lora_factors(adapters, spec, self._params)
    leaves = dict(spec_lib.flatten_paths(self._params))
    for path, f in factors.items():
      provider = resolution.adapted[path]
      provider.validate(path, provider.kernel_aval(leaves[path]).shape,
                        f.layout)
    trained_paths = tuple(resolution.trained)
    params = self._params
    if trained is not None:
      given = {p for p, _ in spec_lib.flatten_paths(trained)}
      unmarked = sorted(given - set(trained_paths))
      if unmarked:
        raise ValueError(f'trained leaves {unmarked[:4]} are not marked '
                         f"'train' by the spec")
      params = _replace_leaves(self._params, trained)
    actions = {p: lora_lib.Lora(rank=int(f.a.shape[-1]))
               for p, f in sorted(factors.items())}
    actions.update({p: spec_lib.TRAIN for p in trained_paths})
    canonical = spec_paths.spec_from_actions(actions, self._universe)
    canon_adapters = {}
    for path, f in factors.items():
      spec_lib.set_by_path(canon_adapters, path, spec_lib.AdapterParams(
          {'a': f.a, 'b': f.b}, layout=f.layout))
    self._entries[name] = Entry(canonical, canon_adapters, params, factors,
                                trained_paths)
    self._stack = None

  def add_bundle(self, name: str, bundle: Any) -> None:
    """Registers a loaded ``AdapterBundle`` or ``PeftAdapter``.

    Raises:
      ValueError: also for a PEFT adapter with trained token rows
        (``trainable_token_indices``), which the registry does not serve.
    """
    if getattr(bundle, 'tokens', None) is not None:
      raise ValueError(
          f'adapter {name!r} trains token rows (trainable_token_indices), '
          'which the registry does not serve; run it alone: '
          'lorajax.lora(apply_fn, bundle.spec)(bundle.params_for(params), '
          'bundle.adapters, ...)')
    self.add(name, bundle.adapters, bundle.spec,
             trained=bundle.trained or None)

  def remove(self, name: str) -> None:
    self.entry(name)
    del self._entries[name]
    if self._active == name:
      self._active = None
    self._stack = None

  # ---- running one adapter -------------------------------------------------

  @property
  def active(self) -> str | None:
    return self._active

  def activate(self, name: str | None) -> None:
    """Makes ``name`` the adapter ``__call__`` runs; ``None`` is the base."""
    if name is not None:
      self.entry(name)
    self._active = name

  def disable(self) -> None:
    """Runs the base model from now on (same as ``activate(None)``)."""
    self._active = None

  def _fn(self, spec: spec_lib.LoraSpec) -> Callable[..., Any]:
    if spec not in self._fns:
      self._fns[spec] = jax.jit(rewrite.lora(self._apply_fn, spec),
                                static_argnames=self._static)
    return self._fns[spec]

  def apply(self, name: str | None, *args, **kwargs) -> Any:
    """Runs the model with adapter ``name`` (``None``: the base)."""
    if name is None:
      return self._base(self._params, *args, **kwargs)
    entry = self.entry(name)
    return self._fn(entry.spec)(entry.params, entry.adapters, *args, **kwargs)

  def __call__(self, *args, **kwargs) -> Any:
    return self.apply(self._active, *args, **kwargs)

  def bound(self, name: str | None) -> tuple[Callable[..., Any], PyTree]:
    """``(apply, tree)`` with ``apply(tree, *args, **kwargs)`` running ``name``.

    ``apply`` is one object per compiled shape signature, so code that jits
    it as a static argument (``lorajax.models.lm.generate``) reuses its
    compilations when switching between same-shape adapters.
    """
    if name is None:
      return self._apply_fn, self._params
    entry = self.entry(name)
    key = ('bound', entry.spec)
    if key not in self._fns:
      inner = rewrite.lora(self._apply_fn, entry.spec)
      self._fns[key] = lambda tree, *a, **k: inner(tree['params'],
                                                   tree['adapters'], *a, **k)
    return self._fns[key], {'params': entry.params,
                            'adapters': entry.adapters}

  def compiled_count(self) -> int:
    """Executables compiled so far by the registry's jitted functions."""
    fns = [self._base] + [f for k, f in self._fns.items()
                          if not (isinstance(k, tuple) and k[0] == 'bound')]
    return sum(f._cache_size() for f in fns)  # pylint: disable=protected-access

  # ---- many adapters in one batch ------------------------------------------

  def indices(self, names: Sequence[str | None]) -> jax.Array:
    """Per-example indices into the registry order; ``None`` -> -1 (base)."""
    order = {n: i for i, n in enumerate(self._entries)}
    for n in names:
      if n is not None and n not in order:
        raise KeyError(f'no adapter {n!r}; registered: {self.names}')
    return jnp.asarray([-1 if n is None else order[n] for n in names],
                       jnp.int32)

  def stacked(self, mode: str = 'auto') -> tuple[spec_lib.LoraSpec, PyTree]:
    """``MultiLora`` spec and stacked adapters of every registered adapter."""
    names = tuple(self._entries)
    if not names:
      raise ValueError('the registry holds no adapters')
    if self._stack is None or self._stack[:2] != (names, mode):
      for name in names:
        if self._entries[name].trained:
          raise ValueError(
              f'adapter {name!r} trains {self._entries[name].trained[:3]} '
              f'outright; per-example batches can only mix adapters')
      spec, stacked = multi.stack_factors(
          [self._entries[n].factors for n in names], self._params, mode=mode)
      self._stack = (names, mode, spec, stacked)
    return self._stack[2], self._stack[3]

  def apply_mixed(self, names: Sequence[str | None], *args,
                  mode: str = 'auto', **kwargs) -> Any:
    """Runs a batch whose example ``i`` uses adapter ``names[i]``."""
    spec, stacked = self.stacked(mode)
    return self._fn(spec)(self._params, stacked, *args,
                          lora_context=self.indices(names), **kwargs)

  # ---- combining -----------------------------------------------------------

  def combine(self, new_name: str, names: Sequence[str], *,
              weights: Sequence[float] | None = None, method: str = 'cat',
              rank: int | None = None) -> None:
    """Registers a weighted sum of registered adapters (``weighted_adapter``)."""
    for n in names:
      if self.entry(n).trained:
        raise ValueError(f'adapter {n!r} trains leaves outright; only '
                         f'low-rank adapters can be combined')
    weights = [1.0] * len(names) if weights is None else list(weights)
    factors = weighted.weighted_factors(
        [self.entry(n).factors for n in names], weights, method=method,
        rank=rank)
    adapters, spec = weighted.factors_to_adapters(factors, self._params)
    self.add(new_name, adapters, spec)
