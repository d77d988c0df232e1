"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024).

Every adapted kernel shares one pair of frozen random projections, ``A``
``[r, max_in]`` and ``B`` ``[max_out, r]`` (``max_in``/``max_out``: the
largest input/output size among the adapted kernels), and trains two
vectors of its own, ``λd`` ``[r]`` and ``λb`` ``[out]``::

  Δy = λb ⊙ (B[:out] · (λd ⊙ (A[:, :in] · x)))

i.e. the low-rank update ``ΔW[in, out] = (A[:, :in]ᵀ·diag(λd)) ·
(B[:out]ᵀ·diag(λb))``. PEFT's default start: ``λb = 0`` (the adapted
function is the base at step 0) and ``λd = d_initial``.

The projections are not parameters: they live in the provider
(``VeraProjections``, compared and hashed by content), so an adapter tree
holds only ``lambda_d`` and ``lambda_b``, the optimizer never sees the
projections, and a trainable count matches PEFT's (which keeps them as
buffers). ``bind_projections`` makes them for a spec's ``Vera`` rules from a
seed, sized by the kernels the rules adapt; a PEFT import brings the file's
own (PEFT draws them with torch's generator, which lorajax does not
reproduce).

Example:

  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {'q': jnp.ones((6, 4)), 'v': jnp.ones((6, 5))}
  >>> spec = bind_projections(lorajax.LoraSpec([('q|v', Vera(rank=3))]),
  ...                         params)
  >>> ad = lorajax.init(spec, params, jax.random.key(0))
  >>> ad['v']['lambda_d'].shape, ad['v']['lambda_b'].shape
  ((3,), (5,))
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import kernels
from lorajax import spec as spec_lib

PyTree = Any


class VeraProjections:
  """The shared frozen pair ``a`` ``[r, max_in]`` and ``b`` ``[max_out, r]``.

  Attributes:
    a, b: float32 numpy arrays.
    seed: the seed they were drawn from (``random``), or None when they
      were given (a PEFT file's).
  """

  def __init__(self, a: Any, b: Any, seed: int | None = None):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise ValueError(f'VeRA projections must be A [r, max_in] and B '
                       f'[max_out, r]; got {a.shape} and {b.shape}')
    a.setflags(write=False)
    b.setflags(write=False)
    self.a, self.b, self.seed = a, b, seed
    self._digest = hashlib.sha256(
        repr((a.shape, b.shape)).encode() + a.tobytes() + b.tobytes()
    ).hexdigest()

  @classmethod
  def random(cls, rank: int, max_in: int, max_out: int,
             seed: int) -> 'VeraProjections':
    """Kaiming-uniform draws (PEFT's scheme: ``±sqrt(6 / fan_in)``, fan-in
    ``max_in`` for A and ``r`` for B) from ``jax.random.key(seed)``."""
    ka, kb = jax.random.split(jax.random.key(seed))
    ba, bb = math.sqrt(6.0 / max_in), math.sqrt(6.0 / rank)
    a = jax.random.uniform(ka, (rank, max_in), jnp.float32, -ba, ba)
    b = jax.random.uniform(kb, (max_out, rank), jnp.float32, -bb, bb)
    return cls(np.asarray(a), np.asarray(b), seed=seed)

  @property
  def rank(self) -> int:
    return int(self.a.shape[0])

  @property
  def max_in(self) -> int:
    return int(self.a.shape[1])

  @property
  def max_out(self) -> int:
    return int(self.b.shape[0])

  def __eq__(self, other):
    return (isinstance(other, VeraProjections)
            and self._digest == other._digest)

  def __hash__(self):
    return hash(self._digest)

  def __repr__(self):
    origin = f'seed={self.seed}' if self.seed is not None else 'given'
    return (f'VeraProjections(r={self.rank}, max_in={self.max_in}, '
            f'max_out={self.max_out}, {origin})')


@dataclasses.dataclass(frozen=True)
class Vera(spec_lib.Adapter):
  """VeRA on one kernel: trained ``λd`` ``[r]`` and ``λb`` over its output
  axes, on the shared frozen ``projections``.

  Attributes:
    rank: r (the projections' first axis).
    seed: seed of the projections ``bind_projections`` draws.
    d_initial: the start value of every ``λd`` entry.
    projections: the shared pair; None until ``bind_projections``.
  """
  rank: int = 256
  seed: int = 0
  d_initial: float = 0.1
  projections: VeraProjections | None = None

  def __post_init__(self):
    if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f'Vera rank must be a positive integer, got '
                       f'{self.rank!r}')
    if self.projections is not None and self.projections.rank != self.rank:
      raise ValueError(f'Vera rank={self.rank} but its projections have '
                       f'rank {self.projections.rank}')

  def _bound(self) -> VeraProjections:
    if self.projections is None:
      raise ValueError(
          'Vera has no projections yet: make the spec with '
          'lorajax.methods.vera.bind_projections(spec, params), which draws '
          'the shared A and B sized by the adapted kernels')
    return self.projections

  def validate(self, path, kernel_shape, layout):
    proj = self._bound()
    _, cshape, fshape = layout.split_shape(kernel_shape)
    n_in, n_out = kernels.prod(cshape), kernels.prod(fshape)
    if layout.batch:
      raise ValueError(f'{path}: Vera on kernels with batch axes is not '
                       'implemented')
    if n_in > proj.max_in or n_out > proj.max_out:
      raise ValueError(
          f'{path}: kernel [in, out] = [{n_in}, {n_out}] is larger than the '
          f'shared VeRA projections ([{proj.max_in}, {proj.max_out}]); bind '
          'them again with every adapted kernel')

  def param_shapes(self, kernel_shape, layout):
    lead, _, fshape = layout.split_shape(kernel_shape)
    return {'lambda_d': (*lead, self.rank), 'lambda_b': (*lead, *fshape)}

  def init_params(self, key, kernel, layout):
    del key
    shapes = self.param_shapes(self.kernel_aval(kernel).shape, layout)
    return {'lambda_d': jnp.full(shapes['lambda_d'], self.d_initial,
                                 jnp.float32),
            'lambda_b': jnp.zeros(shapes['lambda_b'], jnp.float32)}

  def factors(self, params, cshape, fshape) -> tuple[jax.Array, jax.Array]:
    """``a`` ``[*lead, *cshape, r]`` and ``b`` ``[*lead, r, *fshape]`` with
    ``ΔW = a·b`` (float32)."""
    proj = self._bound()
    n_in, n_out = kernels.prod(cshape), kernels.prod(fshape)
    ld = params['lambda_d'].astype(jnp.float32)
    lb = params['lambda_b'].astype(jnp.float32)
    lead = ld.shape[:-1]
    lb = lb.reshape(*lead, n_out)
    a = jnp.asarray(proj.a[:, :n_in].T) * ld[..., None, :]     # [*L, in, r]
    b = jnp.asarray(proj.b[:n_out].T) * lb[..., None, :]       # [*L, r, out]
    return (a.reshape(*lead, *cshape, self.rank),
            b.reshape(*lead, self.rank, *fshape))

  def dot(self, x, kernel, params, dims, *, rng, context=None):
    del rng, context
    shape = self.kernel_aval(kernel).shape
    contract = sorted(dims.w_contract)
    cshape = tuple(shape[i] for i in contract)
    fshape = tuple(shape[i] for i in range(len(shape)) if i not in contract)
    a, b = self.factors(params, cshape, fshape)
    y = kernels.kernel_dot(x, kernel, dims)
    return y + kernels.low_rank_dot(x, a, b, dims, 1.0, y.dtype)

  def delta(self, params, layout: spec_lib.KernelLayout,
            kernel_shape) -> jax.Array:
    """``ΔW`` (float32) laid out like the (stacked) kernel."""
    if layout.batch:
      raise ValueError('Vera on kernels with batch axes is not implemented')
    _, cshape, fshape = layout.split_shape(kernel_shape)
    a, b = self.factors(params, cshape, fshape)
    return kernels.delta_weight(a, b, layout, 1.0)

  def merge(self, kernel, params, layout):
    shape = kernels.kernel_value(kernel).shape
    return kernels.add_delta(kernel, self.delta(params, layout, shape))

  def unmerge(self, kernel, params, layout):
    return kernels.remove_delta(kernel,
                                self.delta(params, layout, kernel.shape))


def bind_projections(spec: spec_lib.LoraSpec, params: PyTree, *,
                     fn: Any = None, args: tuple[Any, ...] = (),
                     layouts: dict[str, spec_lib.KernelLayout] | None = None
                     ) -> spec_lib.LoraSpec:
  """``spec`` with its unbound ``Vera`` rules given shared projections.

  All ``Vera`` rules without projections share one pair (as PEFT shares one
  per model), drawn with ``VeraProjections.random`` from the first such
  rule's seed and sized by the largest input and output among the kernels
  they adapt. A spec without such rules is returned as it is.

  Args:
    spec: the rules.
    params: the model parameters the spec adapts.
    fn, args: the function that uses the kernels and example arguments, as
      for ``lorajax.init``: the kernels' layouts are read from it.
    layouts: path -> ``KernelLayout`` instead (``lorajax.layouts``); without
      ``fn`` or ``layouts`` a 2-D kernel is ``[in, out]``.

  Returns:
    The spec with every unbound ``Vera`` replaced by a bound one.

  Raises:
    ValueError: unbound Vera rules that disagree on rank or seed, or a
      kernel of more than two axes without a layout.
  """
  unbound = {a for _, a in spec.rules
             if isinstance(a, Vera) and a.projections is None}
  if not unbound:
    return spec
  if len({(a.rank, a.seed) for a in unbound}) > 1:
    raise ValueError(f'Vera rules share one pair of projections, so they '
                     f'need one rank and seed; got {sorted(map(repr, unbound))}')
  first = next(iter(unbound))
  if layouts is None and fn is not None:
    from lorajax import rewrite  # pylint: disable=g-import-not-at-top
    layouts = rewrite.discover_layouts(fn, spec, params, *args)
  resolution = spec_lib.resolve(spec, params)
  leaves = dict(spec_lib.flatten_paths(params))
  max_in = max_out = 0
  for path, provider in resolution.adapted.items():
    if provider not in unbound:
      continue
    shape = tuple(provider.kernel_aval(leaves[path]).shape)
    layout = (layouts or {}).get(path)
    if layout is None:
      if len(shape) != 2:
        raise ValueError(f'{path!r} has shape {shape}: pass fn=model.apply '
                         'and args=(example,) so its input axes are read '
                         'from the model, to size the VeRA projections')
      layout = spec_lib.KernelLayout.dense()
    _, cshape, fshape = layout.split_shape(shape)
    max_in = max(max_in, kernels.prod(cshape))
    max_out = max(max_out, kernels.prod(fshape))
  if not max_in:
    return spec
  proj = VeraProjections.random(first.rank, max_in, max_out, first.seed)
  return spec_lib.LoraSpec([
      (p, dataclasses.replace(a, projections=proj) if a in unbound else a)
      for p, a in spec.rules])


def projections_to_json(provider: Vera) -> dict[str, Any]:
  """``Vera`` as spec JSON: drawn projections by their seed and sizes, given
  ones (a PEFT file's) as nested lists."""
  out = {'rank': provider.rank, 'seed': provider.seed,
         'd_initial': provider.d_initial}
  proj = provider.projections
  if proj is None:
    return out
  if proj.seed is not None:
    out['projections'] = {'seed': proj.seed, 'max_in': proj.max_in,
                          'max_out': proj.max_out}
  else:
    out['projections'] = {'a': proj.a.tolist(), 'b': proj.b.tolist()}
  return out


def projections_from_json(d: dict[str, Any]) -> Vera:
  """Inverse of ``projections_to_json``."""
  d = dict(d)
  proj = d.pop('projections', None)
  if proj is not None:
    if 'a' in proj:
      proj = VeraProjections(proj['a'], proj['b'])
    else:
      proj = VeraProjections.random(int(d['rank']), int(proj['max_in']),
                                    int(proj['max_out']), int(proj['seed']))
  return Vera(projections=proj, **d)
