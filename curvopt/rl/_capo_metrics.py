"""Logging summaries of the CAPO mask: masked fraction and stat quantiles."""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from curvopt.rl import _sharding


def capo_metrics(
  m_H: jax.Array,  # pylint: disable=invalid-name
  m_F: jax.Array,  # pylint: disable=invalid-name
  keep: jax.Array,
  mask: jax.Array,
  *,
  quantiles: Sequence[float] = (0.5, 0.9, 0.99),
) -> dict[str, jax.Array]:
  """Masked fraction and quantiles of m_H, |m_H| and m_F over valid tokens.

  Args:
    m_H: [B, T] from capo_token_stats.
    m_F: [B, T] from capo_token_stats.
    keep: [B, T] bool from capo_mask.
    mask: [B, T] completion mask (nonzero = a real token).
    quantiles: the quantile levels in [0, 1].

  Returns:
    float32 scalars: 'capo/masked_frac' (masked share of the valid tokens),
    'capo/m_H_q{level}', 'capo/abs_m_H_q{level}', 'capo/m_F_q{level}' (NaN
    when no token is valid).
  """
  quantiles = tuple(float(q) for q in quantiles)
  if any(not 0.0 <= q <= 1.0 for q in quantiles):
    raise ValueError(f'quantiles must lie in [0, 1], got {quantiles}')
  shapes = {jnp.shape(x) for x in (m_H, m_F, keep, mask)}
  if len(shapes) != 1:
    raise ValueError(f'm_H, m_F, keep and mask must share a shape, got {shapes}')
  names = ['capo/masked_frac'] + [
    f'capo/{name}_q{level:g}' for name in ('m_H', 'abs_m_H', 'm_F') for level in quantiles
  ]
  # Quantiles sort the flattened tokens: under explicit mesh axes XLA places the sort itself.
  return _sharding.call_with_auto_axes(
    functools.partial(_metrics, quantiles=quantiles),
    (m_H, m_F, keep, mask),
    lambda: {name: PartitionSpec() for name in names},
  )


def _metrics(m_H, m_F, keep, mask, *, quantiles):  # pylint: disable=invalid-name
  valid = jnp.asarray(mask) != 0
  num_valid = jnp.sum(valid.astype(jnp.float32))
  masked = valid & ~jnp.asarray(keep, bool)
  out = {'capo/masked_frac': jnp.sum(masked.astype(jnp.float32)) / jnp.maximum(num_valid, 1.0)}
  levels = jnp.asarray(quantiles, jnp.float32)
  for name, stat in (('m_H', m_H), ('abs_m_H', jnp.abs(m_H)), ('m_F', m_F)):
    values = jnp.where(valid, jnp.asarray(stat, jnp.float32), jnp.nan)
    qs = jnp.nanquantile(values.reshape(-1), levels)
    for level, q in zip(quantiles, qs):
      out[f'capo/{name}_q{level:g}'] = q
  return out
