"""Rotary position embeddings (LLaMA's rotate-half layout)."""

import math
from typing import Optional

import jax
import jax.numpy as jnp

from curvopt.models import _config


def _llama3_scaled(inv_freq_F: jax.Array, scaling: _config.RopeScaling) -> jax.Array:
  """Llama 3's frequency scaling, in float32 as transformers computes it."""
  low_freq_wavelen = scaling.original_max_len / scaling.low_freq_factor
  high_freq_wavelen = scaling.original_max_len / scaling.high_freq_factor
  wavelen_F = 2 * math.pi / inv_freq_F
  scaled_F = jnp.where(wavelen_F > low_freq_wavelen, inv_freq_F / scaling.factor, inv_freq_F)
  smooth_F = (scaling.original_max_len / wavelen_F - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed_F = (1 - smooth_F) * scaled_F / scaling.factor + smooth_F * scaled_F
  is_medium_F = (wavelen_F >= high_freq_wavelen) & (wavelen_F <= low_freq_wavelen)
  return jnp.where(is_medium_F, smoothed_F, scaled_F)


def rope_angles(
  positions_BxT: jax.Array,
  head_dim: int,
  theta: float,
  scaling: Optional[_config.RopeScaling] = None,
) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) of the rotation angles, each float32 [B, T, head_dim // 2].

  Frequency i is ``theta ** (-2 i / head_dim)``, rescaled by ``scaling`` when
  given; computed from the positions themselves (no table), so any position
  works, padded or offset.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta**exponents)
  if scaling is not None:
    inv_freq = _llama3_scaled(inv_freq, scaling)
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_BxTxF), jnp.sin(angles_BxTxF)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxF: jax.Array, sin_BxTxF: jax.Array) -> jax.Array:
  """Rotates pairs (x[i], x[i + H/2]) by the angles (float32 math).

  Returns the rotated array in the input dtype.
  """
  x = x_BxTxNxH.astype(jnp.float32)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos = cos_BxTxF[:, :, None, :]
  sin = sin_BxTxF[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxNxH.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """int32 [B, T] positions counting real tokens only (0 at the first one).

  For left-padded prompts: padding gets position 0, the prompt 0, 1, ...;
  pass the same positions to the full forward and the cached decode.
  """
  mask = jnp.asarray(attention_mask).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
