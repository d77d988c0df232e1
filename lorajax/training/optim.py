"""The optimizer of a run: AdamW, warmup + decay, clipping, a decay mask.

Only the trainable tree (``{'adapters': ..., 'params': ...}``) is ever given
to the optimizer, so frozen leaves hold no optimizer state. Gradient
accumulation is done by ``lorajax.training.step.train_step`` (micro-batches
under ``lax.scan``), so one step is always one update.

Example:

  >>> tx, schedule = make_optimizer(learning_rate=1e-3, num_steps=100,
  ...                               warmup_steps=10)
  >>> float(schedule(0)), round(float(schedule(10)), 6)
  (0.0, 0.001)
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import optax

from lorajax import spec as spec_lib

PyTree = Any
DECAYS = ('cosine', 'linear', 'constant')


def make_schedule(*, learning_rate: float, num_steps: int,
                  warmup_steps: int = 0, decay: str = 'cosine',
                  end_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then ``decay`` to the end.

  Args:
    learning_rate: the peak.
    num_steps: total steps; the decay ends here.
    warmup_steps: steps of linear warmup (clipped to ``num_steps``).
    decay: ``'cosine'``, ``'linear'`` or ``'constant'``.
    end_factor: final rate as a fraction of the peak.

  Returns:
    An optax schedule ``step -> learning rate``.

  Raises:
    ValueError: for an unknown decay or a non-positive ``num_steps``.
  """
  if decay not in DECAYS:
    raise ValueError(f'decay={decay!r}; expected one of {DECAYS}')
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps}; expected >= 1')
  warmup_steps = int(min(max(warmup_steps, 0), num_steps))
  end = learning_rate * end_factor
  rest = max(num_steps - warmup_steps, 1)
  if decay == 'cosine':
    after = optax.cosine_decay_schedule(learning_rate, rest,
                                        alpha=end_factor)
  elif decay == 'linear':
    after = optax.linear_schedule(learning_rate, end, rest)
  else:
    after = optax.constant_schedule(learning_rate)
  if not warmup_steps:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(tree: PyTree) -> PyTree:
  """True for leaves of two or more axes (kernels, embeddings, LoRA factors),
  False for biases and norm scales, which weight decay should not shrink."""
  return jax.tree.map(lambda x: np.ndim(x) >= 2, tree)


def parse_lr_factors(text: str | Mapping[str, float] | None
                     ) -> tuple[tuple[str, float], ...]:
  """``'regex=factor,regex=factor'`` (or a mapping) as ordered pairs.

  The config form is a string so that a sweep can vary it like any other
  field, e.g. ``'params/classifier/.*=10'`` or LoRA+'s
  ``'adapters/.*/b=16'``.
  """
  if not text:
    return ()
  if isinstance(text, Mapping):
    items = list(text.items())
  else:
    items = []
    for part in str(text).split(','):
      part = part.strip()
      if not part:
        continue
      pattern, sep, value = part.rpartition('=')
      if not sep or not pattern:
        raise ValueError(f'lr_factors entry {part!r} is not "regex=factor" '
                         f'(in {text!r})')
      try:
        items.append((pattern.strip(), float(value)))
      except ValueError:
        raise ValueError(f'lr_factors entry {part!r}: {value!r} is not a '
                         'number') from None
  out = []
  for pattern, factor in items:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'lr_factors pattern {pattern!r} is not a regex: '
                       f'{e}') from None
    if not np.isfinite(factor) or factor < 0:
      raise ValueError(f'lr_factors factor for {pattern!r} must be finite '
                       f'and >= 0, got {factor}')
    out.append((pattern, float(factor)))
  return tuple(out)


class _NoState(NamedTuple):
  pass


def scale_by_path(rules: tuple[tuple[str, float], ...]
                  ) -> optax.GradientTransformation:
  """Multiplies each leaf's update by the factor of the first rule whose
  regex fully matches its ``/``-joined path (1 where none does).

  Placed after AdamW this is a per-group learning rate (weight decay is
  scaled with it, as in a torch parameter group). Every rule must match a
  leaf of the tree given to ``init``; one that matches none is an error
  listing the paths there are.
  """
  compiled = [(re.compile(p), p, f) for p, f in rules]

  def factors(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, _ in flat:
      name = spec_lib.path_str(path)
      out.append(next((f for rx, _, f in compiled if rx.fullmatch(name)),
                      1.0))
    return flat, treedef, out

  def init_fn(params):
    flat, _, _ = factors(params)
    names = [spec_lib.path_str(p) for p, _ in flat]
    for rx, pattern, _ in compiled:
      if not any(rx.fullmatch(n) for n in names):
        kinds = list(dict.fromkeys(re.sub(r'\d+', '<n>', n) for n in names))
        shown = ', '.join(kinds[:20]) + (' ...' if len(kinds) > 20 else '')
        raise ValueError(f'lr_factors rule {pattern!r} matches no trainable '
                         f'leaf; the trainable paths are: {shown}')
    return _NoState()

  def update_fn(updates, state, params=None):
    del params
    flat, treedef, fs = factors(updates)
    scaled = [u if f == 1.0 else u * jax.numpy.asarray(f, u.dtype)
              for (_, u), f in zip(flat, fs)]
    return jax.tree_util.tree_unflatten(treedef, scaled), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(*, learning_rate: float, num_steps: int,
                   warmup_steps: int = 0, decay: str = 'cosine',
                   end_factor: float = 0.0, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float = 0.0,
                   lr_factors: str | Mapping[str, float] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on a schedule, after optional global-norm clipping.

  Args:
    learning_rate, num_steps, warmup_steps, decay, end_factor: see
      ``make_schedule``.
    weight_decay: decoupled weight decay, masked by ``decay_mask``.
    b1, b2, eps: Adam's.
    clip_norm: clip gradients to this global norm first; 0 disables.
    lr_factors: per-path learning-rate factors (``parse_lr_factors``),
      e.g. a 10x rate for a new classifier head, or LoRA+ (a larger rate
      for the ``b`` factors).

  Returns:
    ``(tx, schedule)``. The moments are kept in each leaf's dtype (float32
    for the trainable tree).
  """
  schedule = make_schedule(learning_rate=learning_rate, num_steps=num_steps,
                           warmup_steps=warmup_steps, decay=decay,
                           end_factor=end_factor)
  parts = []
  if clip_norm and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay, mask=decay_mask))
  rules = parse_lr_factors(lr_factors)
  if rules:
    parts.append(scale_by_path(rules))
  return optax.chain(*parts), schedule


def from_config(optim: Any, num_steps: int
                ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``make_optimizer`` from a config's ``optim`` block."""
  return make_optimizer(
      learning_rate=optim.learning_rate, num_steps=num_steps,
      warmup_steps=optim.warmup_steps, decay=optim.decay,
      end_factor=optim.end_factor, weight_decay=optim.weight_decay,
      b1=optim.b1, b2=optim.b2, eps=optim.eps, clip_norm=optim.clip_norm,
      lr_factors=optim.get('lr_factors', ''))
