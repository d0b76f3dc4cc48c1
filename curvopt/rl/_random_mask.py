"""A random token mask: the control that tells CAPO's choice of tokens from its masked share.

CAPO removes a few percent of the tokens that carry a gradient. Dropping the same share of
those tokens at random removes as much signal with no curvature model behind the choice; CAPO
helps only if it beats this control at the same rate.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from curvopt.rl import _sharding


def random_mask(key: jax.Array, mask: jax.Array, advantages: jax.Array, *, rate) -> jax.Array:
  """Drops exactly round(rate * n) of the n valid tokens with a nonzero advantage.

  The dropped tokens are a uniformly random subset of those n (every subset of that size
  equally likely); tokens with advantage 0 are never dropped (they carry no gradient) and
  invalid tokens stay invalid. Rounding is Python's (half to even). Jit-able, with `rate`
  static or traced; under a sharded batch the choice is the same as unsharded.

  Args:
    key: a PRNG key (typed or raw).
    mask: [B, T] the valid tokens (nonzero = valid).
    advantages: [B] per-sequence advantages, or [B, T] per-token ones.
    rate: the share to drop, in [0, 1].

  Returns:
    bool [B, T]: True = the token stays in the loss (like capo_mask, combined with `mask`).
  """
  mask = jnp.asarray(mask)
  advantages = jnp.asarray(advantages)
  if mask.ndim != 2:
    raise ValueError(f'mask must be [B, T], got shape {mask.shape}')
  if advantages.shape not in (mask.shape[:1], mask.shape):
    raise ValueError(
      f'advantages must be [B] = {mask.shape[:1]} or [B, T] = {mask.shape}, '
      f'got shape {advantages.shape}'
    )
  if isinstance(rate, (int, float, np.integer, np.floating)) and not 0.0 <= rate <= 1.0:
    raise ValueError(f'rate must be in [0, 1], got {rate}')
  if advantages.ndim == 1:
    advantages = jnp.broadcast_to(advantages[:, None], mask.shape)
  # Sorting all tokens of a batch: under explicit mesh axes XLA places the sort itself.
  return _sharding.call_with_auto_axes(
    functools.partial(_random_mask, shape=mask.shape),
    (key, mask, advantages, jnp.asarray(rate, jnp.float32)),
    lambda: PartitionSpec(*_sharding.spec_of(mask)),
  )


def _random_mask(key, mask, advantages, rate, *, shape):
  valid = mask != 0
  eligible = valid & (advantages != 0)
  drops = jnp.round(rate * jnp.sum(eligible, dtype=jnp.float32)).astype(jnp.int32)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  # A uniform random order of the eligible tokens (the others after them): the first
  # `drops` of it are dropped. Ties of the draws are broken by position, so the count is exact.
  order = jnp.where(eligible, jax.random.uniform(key, shape), 2.0).reshape(-1)
  rank = jnp.argsort(jnp.argsort(order, stable=True), stable=True).reshape(shape)
  return valid & ~(eligible & (rank < drops))
