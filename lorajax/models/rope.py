"""Rotary position embeddings (RoPE) of the decoder families.

The "rotate half" form of Hugging Face transformers: a head's channels
``[x1, x2]`` (two halves) become ``x * cos + [-x2, x1] * sin`` with angle
``position * inv_freq``. ``Llama3Rope`` rescales the frequencies as Llama
3.1 does; tables narrower than the head rotate only its first channels
(Phi-3's partial rotary factor).

Example:

  >>> sin, cos = rope_tables(jnp.arange(3)[None], 4, 10000.0)
  >>> apply_rope(jnp.ones((1, 3, 2, 4)), sin, cos).shape
  (1, 3, 2, 4)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Llama3Rope:
  """Llama 3.1 RoPE frequency scaling (``rope_type: llama3``).

  Wavelengths longer than ``original_max_position / low_freq_factor`` are
  divided by ``factor``, those shorter than ``original_max_position /
  high_freq_factor`` kept, and the ones between interpolated smoothly.
  """
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position: int


def rope_inv_freq(head_dim: int, base: float,
                  scaling: Llama3Rope | None = None) -> np.ndarray:
  """The ``[head_dim / 2]`` float32 RoPE frequencies, scaled if asked.

  >>> rope_inv_freq(4, 10000.0).tolist()
  [1.0, 0.009999999776482582]
  """
  inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  if scaling is None:
    return inv_freq
  s = scaling
  wavelen = 2 * np.pi / inv_freq
  low_wavelen = s.original_max_position / s.low_freq_factor
  high_wavelen = s.original_max_position / s.high_freq_factor
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = ((s.original_max_position / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, head_dim: int, base: float,
                scaling: Llama3Rope | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """Returns ``(sin, cos)``, each ``[B, T, head_dim]`` float32."""
  inv_freq = rope_inv_freq(head_dim, base, scaling)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], -1)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates ``x`` ``[B, T, heads, hd]`` in the rotate-half convention.

  With tables narrower than ``hd`` (partial RoPE) only the first channels
  rotate; the rest pass through.
  """
  rot = sin.shape[-1]
  if rot < x.shape[-1]:
    return jnp.concatenate([apply_rope(x[..., :rot], sin, cos),
                            x[..., rot:]], -1)
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], -1)
  out = x32 * cos[:, :, None] + rotated * sin[:, :, None]
  return out.astype(x.dtype)
