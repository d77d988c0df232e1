"""EVA: LoRA's ``a`` from the principal directions of each layer's inputs.

EVA (Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning
via Explained Variance Adaptation") runs the frozen model over batches of
the fine-tuning data and fits, per targeted kernel, an incremental PCA of
the kernel's input rows (one row per real token). ``a`` starts as the top
right-singular vectors (``b = 0``, so the model is unchanged at step 0),
and the rank budget (the sum of the rules' ranks) is redistributed across
the layers by explained variance, each layer getting at most
``round(rank·rho)``; a layer that gets none loses its adapter. Kernels fed
the same input (query, key and value) share one fit.

``Lora(init='eva')`` marks the rules; ``init`` here replaces them by one
rule per kernel with its EVA rank (a rank pattern) and makes the adapters.
The procedure is PEFT 0.21.2's (``get_eva_state_dict``: the same
convergence test on consecutive components, cycling the batches until every
needed component has converged, the same rank redistribution, whitening and
alpha adjustment) with exact SVDs in NumPy (``eva_pca``). Inputs are read at
each targeted ``dot_general`` by a probe provider through
``jax.debug.callback``, so any function ``lorajax.lora`` adapts works; the
batches run jitted.

Example:

  >>> import jax, jax.numpy as jnp, numpy as np, lorajax
  >>> rng = np.random.default_rng(0)
  >>> params = {'up': {'kernel': jnp.asarray(rng.normal(size=(8, 6)),
  ...                                        jnp.float32)}}
  >>> fn = lambda p, batch: batch['x'] @ p['up']['kernel']
  >>> batches = [{'x': rng.normal(size=(4, 16, 8)) * np.arange(8, 0, -1)}
  ...            for _ in range(3)]
  >>> spec = lorajax.LoraSpec([(r'up/kernel', lorajax.Lora(2, init='eva'))])
  >>> out = init(spec, params, batches, fn=fn, config=EvaConfig(rho=1.0))
  >>> out.ranks, out.adapters['up']['kernel']['a'].shape
  ({'up/kernel': 2}, (8, 2))
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Callable, Iterable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from lorajax import kernels
from lorajax import rewrite
from lorajax import spec as spec_lib
from lorajax.methods import eva_pca
from lorajax.methods import low_rank

PyTree = Any


@dataclasses.dataclass(frozen=True)
class EvaConfig:
  """PEFT's ``EvaConfig`` fields lorajax implements.

  Attributes:
    rho: each layer's rank is at most ``round(rank·rho)`` (>= 1; 1 keeps
      every layer at its rule's rank).
    tau: a component has converged when its cosine similarity with the
      previous step's is at least ``tau``.
    whiten: divide each ``a`` column by the square root of its singular
      value.
    adjust_scaling_factors: scale each layer's alpha by ``new_rank/rank``,
      so that ``alpha/rank`` stays the rule's.
    max_steps: forward passes (the batches cycled) before giving up on
      convergence with an error; PEFT cycles without a bound.
  """
  rho: float = 2.0
  tau: float = 0.99
  whiten: bool = False
  adjust_scaling_factors: bool = True
  max_steps: int = 1000

  def __post_init__(self):
    if not self.rho >= 1.0:
      raise ValueError(f'EVA rho must be >= 1, got {self.rho}')
    if not 0.0 <= self.tau <= 1.0:
      raise ValueError(f'EVA tau must be in [0, 1], got {self.tau}')
    if int(self.max_steps) < 1:
      raise ValueError(f'EVA max_steps must be >= 1, got {self.max_steps}')


class EvaResult(NamedTuple):
  """What ``init`` made.

  Attributes:
    spec: the rules with every EVA rule replaced by one ``Lora`` rule per
      kernel (its rank and alpha) or ``'freeze'`` for rank 0.
    adapters: ``{'a': components.T, 'b': 0}`` per kernel of rank > 0.
    ranks: path -> rank (0 for the kernels that lost their adapter).
    steps: forward passes run.
  """
  spec: spec_lib.LoraSpec
  adapters: PyTree
  ranks: dict[str, int]
  steps: int


def is_eva(action: Any) -> bool:
  """True for a provider with ``init='eva'``."""
  return getattr(action, 'init', None) == 'eva'


def uses_eva(spec: spec_lib.LoraSpec) -> bool:
  """True if a rule of ``spec`` has an ``init='eva'`` provider."""
  return any(is_eva(a) for _, a in spec.rules)


@dataclasses.dataclass(frozen=True)
class _Probe(spec_lib.Adapter):
  """Computes the base product and sends the input rows to ``sink``."""
  path: str = ''
  sink: Callable[..., None] | None = None

  has_params = False

  def param_shapes(self, kernel_shape, layout):
    del kernel_shape, layout
    return {}

  def init_params(self, key, kernel, layout):
    del key, kernel, layout
    return {}

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del params, rng, context
    rest = [i for i in range(x.ndim) if i not in dims.x_contract]
    # The contracted axes in the kernel's order (as kernel_matrix flattens).
    order = [c for _, c in sorted(zip(dims.w_contract, dims.x_contract))]
    rows = jnp.transpose(x, rest + order)
    rows = rows.reshape(*rows.shape[:len(rest)], -1)
    jax.debug.callback(self.sink, self.path, rows, ordered=True)
    return kernels.kernel_dot(x, kernel, dims)

  def merge(self, kernel, params, layout):
    del params, layout
    return kernels.kernel_value(kernel)


class _Capture:
  """Runs ``fn`` with probes on the EVA kernels; collects their rows."""

  def __init__(self, fn, spec, paths, token_mask):
    self.wanted, self.got, self.token_mask = set(paths), {}, token_mask
    rules = [(re.escape(p), _Probe(path=p, sink=self._sink)) for p in paths]
    rules += [(p, a) for p, a in spec.rules if not is_eva(a)]
    self.apply = jax.jit(rewrite.lora(fn, spec_lib.LoraSpec(rules)))

  def _sink(self, path, rows):
    if path in self.wanted:
      self.got.setdefault(path, []).append(np.asarray(rows, np.float32))

  def __call__(self, params, batch, wanted) -> dict[str, np.ndarray]:
    self.wanted, self.got = set(wanted), {}
    jax.block_until_ready(self.apply(params, {}, batch))
    jax.effects_barrier()
    mask = None if self.token_mask is None else np.asarray(
        self.token_mask(batch), bool)
    out = {}
    for path, calls in self.got.items():
      rows = _one_input(path, calls, mask)
      out[path] = (rows.reshape(-1, rows.shape[-1]) if mask is None
                   else rows[mask])
    return out


def _one_input(path: str, calls: list[np.ndarray],
               mask: np.ndarray | None) -> np.ndarray:
  """The input rows of ``path`` that EVA fits, from each time one call of
  ``fn`` multiplied it: with a token mask, the call whose leading axes are
  the mask's (the shipped BERT's [CLS] readout multiplies its last layer's
  kernels a second time, with one query); any other choice is refused."""
  if mask is not None:
    fitting = [r for r in calls if r.shape[:-1] == mask.shape]
    if not fitting:
      raise ValueError(
          f'{path}: its input rows have shape {calls[0].shape[:-1]} but the '
          f'token mask {mask.shape}; pass a token_mask of the inputs\' '
          'leading axes (or None to take every row)')
    calls = fitting
  if any(r.shape != calls[0].shape or not np.array_equal(r, calls[0])
         for r in calls[1:]):
    shapes = ', '.join(str(r.shape[:-1]) for r in calls)
    raise ValueError(
        f'{path}: one call of fn multiplied it {len(calls)} times on '
        f'different inputs ({shapes}); EVA fits one input a kernel. Pass a '
        'token_mask (the call whose rows match it is fitted) or a fn that '
        'multiplies the kernel once (the shipped BERT: '
        'BertConfig(cls_readout=False))')
  return calls[0]


def _check(spec, params, batches, fn):
  """The EVA paths and their providers; refuses what EVA does not do."""
  adapted = spec_lib.resolve(spec, params).adapted
  paths = {}
  for path, provider in adapted.items():
    if is_eva(provider):
      if type(provider) is not low_rank.Lora:   # pylint: disable=unidiomatic-typecheck
        raise ValueError(f"{path}: {type(provider).__name__}(init='eva') is "
                         'not implemented; EVA initializes Lora rules')
      paths[path] = provider
    elif provider.has_params:
      raise ValueError(
          f'{path}: lorajax.eva.init makes the adapters of Lora(init=\'eva\') '
          f'rules only, and this spec also has {type(provider).__name__}; '
          'give every adapter rule init=\'eva\'')
  if not paths:
    raise ValueError("the spec has no Lora(init='eva') rule")
  if not batches:
    raise ValueError('EVA needs at least one batch')
  layouts = rewrite.discover_layouts(fn, spec, params, batches[0])
  for path in paths:
    layout = layouts.get(path)
    if layout is None:
      raise ValueError(f'{path}: targeted but never multiplied by fn')
    if layout.stack or layout.batch:
      what = 'stacked by scan' if layout.stack else 'with batch axes'
      raise ValueError(
          f'{path}: EVA of a kernel {what} ({layout.describe()}) is not '
          'implemented: its layers or experts would share one input fit; '
          'use an unscanned model')
  return paths, layouts


def init(spec: spec_lib.LoraSpec, params: PyTree, batches: Iterable[Any], *,
         fn: Callable[..., Any],
         token_mask: Callable[[Any], Any] | None = None,
         config: EvaConfig = EvaConfig()) -> EvaResult:
  """EVA's ranks and starting adapters for the ``Lora(init='eva')`` rules.

  Args:
    spec: rules; every adapter rule must be ``Lora(init='eva')`` (``'train'``,
      ``'freeze'`` and parameter-free providers such as ``Quantized`` may be
      there too). Each rule's rank counts towards the budget.
    params: the frozen base ``fn`` takes.
    batches: a finite sequence of batches, cycled until convergence.
    fn: ``fn(params, batch)``, the model's forward pass.
    token_mask: ``batch -> bool [B, T]`` of the rows to fit (real tokens:
      PEFT takes the attention mask and labels != -100); None fits every
      row of every input.
    config: ``EvaConfig``.

  Returns:
    ``EvaResult``; ``lorajax.lora(fn, result.spec)(params,
    result.adapters, batch)`` equals ``fn(params, batch)``.

  Raises:
    ValueError: another adapter rule, a kernel stacked by scan or with
      batch axes, a maximum rank above a kernel's input size, or no
      convergence within ``config.max_steps`` passes.
  """
  batches = list(batches)
  paths, layouts = _check(spec, params, batches, fn)
  capture = _Capture(fn, spec, list(paths), token_mask)
  first = capture(params, batches[0], paths)
  missing = [p for p in paths if p not in first]
  if missing:
    raise ValueError(f'{missing[0]}: no input rows reached the probe')
  order = list(first)   # the order fn multiplies the kernels in
  leaders, shared = _groups(first, order)
  most = {p: round(paths[p].rank * config.rho) for p in order}
  for leader in leaders:   # a group's fit serves its largest maximum
    group = [leader] + [f for f, l in shared.items() if l == leader]
    top = max(most[p] for p in group)
    most.update({p: top for p in group})
    if top > first[leader].shape[1]:
      raise ValueError(f'{leader}: rank·rho = {top} is more than its '
                       f'{first[leader].shape[1]} input features')
  budget = sum(p.rank for p in paths.values())
  fits = {l: eva_pca.IncrementalPca(most[l], config.tau) for l in leaders}
  ranks, steps = _converge(lambda batch, wanted: capture(params, batch,
                                                         wanted),
                           batches, first, fits, shared, most, budget, config)
  logging.info('EVA: %d passes; ranks %s', steps, ranks)
  return _result(spec, params, paths, layouts, fits,
                 {p: shared.get(p, p) for p in order}, ranks, steps, config)


def _groups(first, order):
  """``(leaders, {follower: leader})``: kernels whose inputs were equal on
  the first batch share the earlier one's fit (PEFT hashes them)."""
  leaders, shared = [], {}
  for path in order:
    same = next((l for l in leaders if first[l].shape == first[path].shape
                 and np.array_equal(first[l], first[path])), None)
    if same is None:
      leaders.append(path)
    else:
      shared[path] = same
  return leaders, shared


def _converge(capture, batches, first, fits, shared, most, budget, config):
  """PEFT's loop: fit the batches, cycled, until every fit's components up
  to its layers' current ranks have converged; ranks redistributed after
  each pass. Returns ``({path: rank}, passes)``."""
  leaders = list(fits)
  order = leaders + list(shared)
  ranks, done = dict(most), {l: False for l in leaders}
  active, steps, rows = set(leaders), 0, first
  for batch in itertools.cycle(batches):
    for leader in leaders:
      ok = bool(np.all(fits[leader].converged[:ranks[leader]]))
      if not done[leader] and ok and leader in active:
        active.discard(leader)
        done[leader] = True
      elif done[leader] and not ok:
        active.add(leader)
        done[leader] = False
    if all(done.values()):
      break
    if steps >= config.max_steps:
      slow = [l for l in leaders if not done[l]]
      raise ValueError(
          f'EVA did not converge in {steps} passes over {len(batches)} '
          f'batches: {len(slow)} input fits (e.g. {slow[0]}) still move '
          f'more than tau={config.tau}; give more batches or max_steps, '
          'or lower tau')
    rows = rows if steps == 0 else capture(batch, active)
    for leader in sorted(active):
      fits[leader].partial_fit(rows[leader])
    steps += 1
    if all(f.components is not None for f in fits.values()):
      ranks = eva_pca.distribute(
          {p: fits[shared.get(p, p)].ratio[:most[p]] for p in order},
          order, budget, shared)
  return {p: int(ranks[p]) for p in order}, steps


def _result(spec, params, paths, layouts, fits, of, ranks, steps, config):
  """The spec with EVA rules replaced per kernel, and the adapters."""
  resolution = spec_lib.resolve(spec, params)
  leaves = dict(spec_lib.flatten_paths(params))
  adapters, per_rule = {}, {}
  for path, provider in paths.items():
    rank, fit = ranks[path], fits[of[path]]
    rules = per_rule.setdefault(resolution.rule_of[path], [])
    if rank == 0:   # PEFT removes the layer's adapter
      rules.append((re.escape(path), spec_lib.FREEZE))
      continue
    if not np.all(fit.converged[:rank]):
      raise ValueError(f'{path}: given rank {rank} but only '
                       f'{int(np.sum(fit.converged))} components converged')
    u = fit.components[:rank]
    if config.whiten:
      u = u / np.sqrt(fit.singular_values[:rank])[:, None]
    alpha = float(provider.rank if provider.alpha is None else provider.alpha)
    if rank != provider.rank and config.adjust_scaling_factors:
      alpha *= rank / provider.rank
    rules.append((re.escape(path), dataclasses.replace(provider, rank=rank,
                                                       alpha=alpha)))
    layout = layouts[path]
    _, cshape, fshape = layout.split_shape(
        provider.kernel_aval(leaves[path]).shape)
    a = jnp.asarray(u.T.reshape(*cshape, rank), jnp.float32)
    b = jnp.zeros((rank, *fshape), jnp.float32)
    spec_lib.set_by_path(adapters, path, spec_lib.AdapterParams(
        {'a': a, 'b': b}, layout=layout))
  rules = []
  for i, (pattern, action) in enumerate(spec.rules):
    rules.extend(per_rule.get(i, []) if is_eva(action) else [(pattern, action)])
  return EvaResult(spec_lib.LoraSpec(rules), adapters, dict(ranks), steps)


__all__ = ['EvaConfig', 'EvaResult', 'init', 'is_eva', 'uses_eva']
