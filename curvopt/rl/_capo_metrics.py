"""Logging summaries of a token mask (CAPO's or a control's): masked shares and stat quantiles.

Tokens with advantage 0 carry no gradient and no mask removes them; counted in, they dilute
every share and quantile (most of a sparse-reward batch has A = 0). The summaries over tokens
with A != 0, split by the sign of A, say what the mask removed: the rare successes
(A > 0, few and large when a group has one success) or the failures (A < 0).
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from curvopt.rl import _sharding

# Token groups of the sign-split summaries: name -> which advantages belong.
_GROUPS = {
  'nz': lambda a: a != 0,
  'pos': lambda a: a > 0,
  'neg': lambda a: a < 0,
}


def _token_advantages(advantages, shape):
  advantages = jnp.asarray(advantages)
  if advantages.shape not in (shape[:1], shape):
    raise ValueError(
      f'advantages must be [B] = {shape[:1]} or [B, T] = {shape}, got shape {advantages.shape}'
    )
  if advantages.ndim == 1 and len(shape) == 2:
    advantages = jnp.broadcast_to(advantages[:, None], shape)
  return advantages


def _share_names() -> list[str]:
  return (
    ['capo/masked_frac', 'capo/masked_pos_share']
    + [f'capo/{g}/masked_frac' for g in _GROUPS]
    + [f'capo/{g}/tokens' for g in _GROUPS]
  )


def masked_shares(keep: jax.Array, mask: jax.Array, advantages: jax.Array) -> dict[str, jax.Array]:
  """The masked shares of a token mask, over all valid tokens and by the sign of A.

  Args:
    keep: [B, T] bool, True = the token stays in the loss (capo_mask, random_mask).
    mask: [B, T] the valid tokens (nonzero = valid).
    advantages: [B] per-sequence or [B, T] per-token advantages.

  Returns:
    float32 scalars: 'capo/masked_frac' (over every valid token, A = 0 included);
    'capo/{nz,pos,neg}/masked_frac' (over the valid tokens with A != 0, A > 0, A < 0; NaN
    when the group is empty); 'capo/{nz,pos,neg}/tokens' (the groups' sizes, to weight
    steps by); 'capo/masked_pos_share' (the share of the masked A != 0 tokens that have
    A > 0; NaN when none is masked).
  """
  shape = jnp.shape(mask)
  if jnp.shape(keep) != shape:
    raise ValueError(f'keep and mask must share a shape, got {jnp.shape(keep)} and {shape}')
  advantages = _token_advantages(advantages, shape)
  return _sharding.call_with_auto_axes(
    _shares,
    (keep, mask, advantages),
    lambda: {name: PartitionSpec() for name in _share_names()},
  )


def _shares(keep, mask, advantages):
  valid = jnp.asarray(mask) != 0
  masked = valid & ~jnp.asarray(keep, bool)

  def count(x):
    return jnp.sum(x.astype(jnp.float32))

  def share(part, whole, empty):
    return jnp.where(whole > 0, part / jnp.maximum(whole, 1.0), empty)

  out = {'capo/masked_frac': share(count(masked), count(valid), 0.0)}
  for name, member in _GROUPS.items():
    group = valid & member(advantages)
    out[f'capo/{name}/masked_frac'] = share(count(masked & group), count(group), jnp.nan)
    out[f'capo/{name}/tokens'] = count(group)
  masked_nz = count(masked & (advantages != 0))
  out['capo/masked_pos_share'] = share(count(masked & (advantages > 0)), masked_nz, jnp.nan)
  return out


def capo_metrics(
  m_H: jax.Array,  # pylint: disable=invalid-name
  m_F: jax.Array,  # pylint: disable=invalid-name
  keep: jax.Array,
  mask: jax.Array,
  *,
  advantages: Optional[jax.Array] = None,
  quantiles: Sequence[float] = (0.5, 0.9, 0.99),
) -> dict[str, jax.Array]:
  """Masked shares and quantiles of CAPO's stats.

  Without `advantages`: the masked share and the quantiles of m_H, |m_H| and m_F over every
  valid token ('capo/masked_frac', 'capo/m_H_q{level}', 'capo/abs_m_H_q{level}',
  'capo/m_F_q{level}'). With `advantages`: the shares of `masked_shares` and the quantiles of
  |m_H| and m_F over the valid tokens with A != 0, A > 0 and A < 0
  ('capo/{nz,pos,neg}/abs_m_H_q{level}', 'capo/{nz,pos,neg}/m_F_q{level}'). Quantiles are
  NaN over an empty group.

  Args:
    m_H: [B, T] from capo_token_stats.
    m_F: [B, T] from capo_token_stats.
    keep: [B, T] bool from capo_mask.
    mask: [B, T] completion mask (nonzero = a real token).
    advantages: None, or [B] / [B, T] advantages.
    quantiles: the quantile levels in [0, 1].

  Returns:
    float32 scalars by name.
  """
  quantiles = tuple(float(q) for q in quantiles)
  if any(not 0.0 <= q <= 1.0 for q in quantiles):
    raise ValueError(f'quantiles must lie in [0, 1], got {quantiles}')
  shapes = {jnp.shape(x) for x in (m_H, m_F, keep, mask)}
  if len(shapes) != 1:
    raise ValueError(f'm_H, m_F, keep and mask must share a shape, got {shapes}')
  if advantages is None:
    names = ['capo/masked_frac'] + [
      f'capo/{name}_q{level:g}' for name in ('m_H', 'abs_m_H', 'm_F') for level in quantiles
    ]
    # Quantiles sort the flattened tokens: under explicit mesh axes XLA places the sort itself.
    return _sharding.call_with_auto_axes(
      functools.partial(_metrics, quantiles=quantiles),
      (m_H, m_F, keep, mask),
      lambda: {name: PartitionSpec() for name in names},
    )
  advantages = _token_advantages(advantages, jnp.shape(mask))
  names = _share_names() + [
    f'capo/{group}/{name}_q{level:g}'
    for group in _GROUPS
    for name in ('abs_m_H', 'm_F')
    for level in quantiles
  ]
  return _sharding.call_with_auto_axes(
    functools.partial(_signed_metrics, quantiles=quantiles),
    (m_H, m_F, keep, mask, advantages),
    lambda: {name: PartitionSpec() for name in names},
  )


def _quantiles(stat, members, quantiles):
  values = jnp.where(members, jnp.asarray(stat, jnp.float32), jnp.nan)
  return jnp.nanquantile(values.reshape(-1), jnp.asarray(quantiles, jnp.float32))


def _metrics(m_H, m_F, keep, mask, *, quantiles):  # pylint: disable=invalid-name
  valid = jnp.asarray(mask) != 0
  num_valid = jnp.sum(valid.astype(jnp.float32))
  masked = valid & ~jnp.asarray(keep, bool)
  out = {'capo/masked_frac': jnp.sum(masked.astype(jnp.float32)) / jnp.maximum(num_valid, 1.0)}
  for name, stat in (('m_H', m_H), ('abs_m_H', jnp.abs(m_H)), ('m_F', m_F)):
    for level, q in zip(quantiles, _quantiles(stat, valid, quantiles)):
      out[f'capo/{name}_q{level:g}'] = q
  return out


def _signed_metrics(m_H, m_F, keep, mask, advantages, *, quantiles):  # pylint: disable=invalid-name
  out = _shares(keep, mask, advantages)
  valid = jnp.asarray(mask) != 0
  for group, member in _GROUPS.items():
    members = valid & member(advantages)
    for name, stat in (('abs_m_H', jnp.abs(m_H)), ('m_F', m_F)):
      for level, q in zip(quantiles, _quantiles(stat, members, quantiles)):
        out[f'capo/{group}/{name}_q{level:g}'] = q
  return out
