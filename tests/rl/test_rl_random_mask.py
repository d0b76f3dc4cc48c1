"""rl.random_mask: exact counts, what it never drops, uniformity, jit and sharding."""

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import rl

# One compilation per shape, the rate traced.
_MASK = jax.jit(
  lambda key, mask, advantages, rate: rl.random_mask(key, mask, advantages, rate=rate)
)


def _inputs(seed, batch, length, *, valid=0.7, zero_groups=1):
  rng = np.random.default_rng(seed)
  mask = rng.uniform(size=(batch, length)) < valid
  advantages = rng.normal(size=batch).astype(np.float32)
  advantages[:zero_groups] = 0.0
  return mask, advantages


# (batch, length, rate): shares whose rate * n lands on, below and above halves.
_CASES = [(4, 6, 0.0), (4, 6, 0.1), (4, 6, 0.5), (8, 16, 0.05), (8, 16, 0.33), (3, 5, 1.0)]


@pytest.mark.parametrize('batch, length, rate', _CASES)
def test_drops_exactly_the_rounded_share_of_nonzero_advantage_tokens(batch, length, rate):
  mask, advantages = _inputs(batch * length, batch, length)
  eligible = mask & (advantages[:, None] != 0)
  for seed in range(5):
    keep = np.asarray(_MASK(jax.random.key(seed), mask, advantages, rate))
    assert keep.dtype == bool
    assert not (keep & ~mask).any()  # invalid tokens stay invalid
    np.testing.assert_array_equal(keep[~eligible], mask[~eligible])  # A = 0 never dropped
    assert (eligible & ~keep).sum() == round(rate * eligible.sum())


def test_rounding_is_pythons_and_per_token_advantages_work():
  mask = np.ones((1, 5), bool)
  for n, rate, drops in ((5, 0.5, 2), (3, 0.5, 2), (5, 0.3, 2), (5, 0.0, 0)):  # 2.5 -> 2
    advantages = np.zeros((1, 5), np.float32)
    advantages[0, :n] = 1.0
    keep = np.asarray(_MASK(jax.random.key(0), mask, advantages, rate))
    assert (~keep).sum() == drops and keep[0, n:].all()


def test_every_subset_is_equally_likely():
  """Chi-square over the C(5, 2) = 10 subsets two drops of five eligible tokens can take."""
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  advantages = np.array([[1.0, -2.0, 0.0, 3.0], [0.5, 0.0, -1.0, 2.0]], np.float32)
  eligible = [(0, 0), (0, 1), (1, 0), (1, 2), (1, 3)]
  keys = jax.random.split(jax.random.key(1234), 5000)
  keep = np.asarray(
    jax.vmap(lambda k: rl.random_mask(k, mask, advantages, rate=0.4))(keys)  # 0.4 * 5 = 2
  )
  subsets = collections.Counter(tuple(cell for cell in eligible if not k[cell]) for k in keep)
  assert set(subsets) == set(itertools.combinations(eligible, 2))
  expected = len(keys) / 10
  chi2 = sum((c - expected) ** 2 / expected for c in subsets.values())
  assert chi2 < 27.9, (chi2, subsets)  # df 9: P(chi2 > 27.9) = 0.001


def test_jit_with_a_traced_rate_and_distinct_keys_differ():
  mask, advantages = _inputs(0, 8, 16)
  fn = _MASK
  got = fn(jax.random.key(3), mask, advantages, jnp.float32(0.25))
  want = rl.random_mask(jax.random.key(3), mask, advantages, rate=0.25)
  np.testing.assert_array_equal(got, want)
  other = fn(jax.random.key(4), mask, advantages, jnp.float32(0.25))
  assert (np.asarray(other) != np.asarray(got)).any()
  raw = rl.random_mask(jax.random.key_data(jax.random.key(3)), mask, advantages, rate=0.25)
  np.testing.assert_array_equal(raw, want)


def test_sharded_batch_gives_the_unsharded_mask(mesh8):
  mask, advantages = _inputs(7, 8, 12, zero_groups=2)
  want = rl.random_mask(jax.random.key(5), mask, advantages, rate=0.2)
  spec = jax.sharding.PartitionSpec
  named = jax.sharding.NamedSharding
  got = jax.jit(lambda k, m, a: rl.random_mask(k, m, a, rate=0.2))(
    jax.random.key(5),
    jax.device_put(mask, named(mesh8, spec('data'))),
    jax.device_put(advantages, named(mesh8, spec('data'))),
  )
  assert got.sharding.spec[0] == 'data'
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(rate=1.5), r'rate must be in \[0, 1\], got 1.5'),
    (dict(rate=-0.1), r'rate must be in \[0, 1\]'),
    (dict(advantages=np.ones(3)), r'advantages must be \[B\] = \(2,\) or \[B, T\]'),
    (dict(mask=np.ones(4)), r'mask must be \[B, T\]'),
  ],
)
def test_bad_inputs(kwargs, match):
  args = {**dict(mask=np.ones((2, 4)), advantages=np.ones(2), rate=0.5), **kwargs}
  with pytest.raises(ValueError, match=match):
    rl.random_mask(jax.random.key(0), args.pop('mask'), args.pop('advantages'), **args)
