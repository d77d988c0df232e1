"""The optimizer of a run: AdamW, warmup + decay, clipping, a decay mask.

Only the trainable tree (``{'adapters': ..., 'params': ...}``) is ever given
to the optimizer, so frozen leaves hold no optimizer state. Gradient
accumulation is done by ``lorajax.training.step.train_step`` (micro-batches
under ``lax.scan``), so one step is always one update.

Example:

  >>> tx, schedule = make_optimizer(learning_rate=1e-3, num_steps=100)
  >>> float(schedule(0))
  0.0
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

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


def make_optimizer(*, learning_rate: float, num_steps: int,
                   warmup_steps: int = 0, decay: str = 'cosine',
                   end_factor: float = 0.0, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float = 0.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on a schedule, after optional global-norm clipping.

  Args:
    learning_rate, num_steps, warmup_steps, decay, end_factor: see
      ``make_schedule``.
    weight_decay: decoupled weight decay, masked by ``decay_mask``.
    b1, b2, eps: Adam's.
    clip_norm: clip gradients to this global norm first; 0 disables.

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
  return optax.chain(*parts), schedule


def from_config(optim: Any, num_steps: int
                ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``make_optimizer`` from a config's ``optim`` block."""
  return make_optimizer(
      learning_rate=optim.learning_rate, num_steps=num_steps,
      warmup_steps=optim.warmup_steps, decay=optim.decay,
      end_factor=optim.end_factor, weight_decay=optim.weight_decay,
      b1=optim.b1, b2=optim.b2, eps=optim.eps, clip_norm=optim.clip_norm)
