"""group_advantages against a numpy reference, and its edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import rl


def _reference(rewards, group_size, mode, eps):
  out = []
  for start in range(0, len(rewards), group_size):
    group = [float(r) for r in rewards[start : start + group_size]]
    mean = sum(group) / len(group)
    for i, r in enumerate(group):
      if mode == 'grpo':
        std = (sum((x - mean) ** 2 for x in group) / (len(group) - 1)) ** 0.5
        out.append((r - mean) / (std + eps))
      elif mode == 'dr_grpo':
        out.append(r - mean)
      elif mode == 'rloo':
        others = group[:i] + group[i + 1 :]
        out.append(r - sum(others) / len(others))
      else:
        out.append(r)
  return np.asarray(out)


REWARDS = np.asarray([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 0.0, 2.0])


@pytest.mark.parametrize('mode', rl.ADVANTAGE_MODES)
@pytest.mark.parametrize('group_size', [2, 4])
def test_matches_reference(mode, group_size):
  got = rl.group_advantages(jnp.asarray(REWARDS), group_size, mode=mode)
  want = _reference(REWARDS, group_size, mode, 1e-4)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_grpo_hand_values():
  # Group (1, 0): mean 0.5, unbiased std sqrt(0.5).
  got = rl.group_advantages(jnp.asarray([1.0, 0.0]), 2, mode='grpo', eps=0.0)
  np.testing.assert_allclose(got, [0.5 / 0.5**0.5, -0.5 / 0.5**0.5], rtol=1e-6)
  # RLOO of (1, 0, 0): 1 - 0, 0 - 0.5, 0 - 0.5.
  got = rl.group_advantages(jnp.asarray([1.0, 0.0, 0.0]), 3, mode='rloo')
  np.testing.assert_allclose(got, [1.0, -0.5, -0.5], rtol=1e-6)


@pytest.mark.parametrize('mode', ['grpo', 'dr_grpo', 'rloo'])
@pytest.mark.parametrize('eps', [1e-4, 0.0])
def test_all_equal_group_gives_zero_not_nan(mode, eps):
  got = rl.group_advantages(jnp.asarray([2.0, 2.0, 2.0, 2.0, 0.0, 1.0]), 2, mode=mode, eps=eps)
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got[:4], 0.0)
  assert got[4] < 0 < got[5]


@pytest.mark.parametrize('mode', ['grpo', 'dr_grpo', 'rloo'])
def test_group_of_one_with_baseline_raises(mode):
  with pytest.raises(ValueError, match='group_size must be >= 2, got 1'):
    rl.group_advantages(jnp.ones(4), 1, mode=mode)


def test_group_of_one_without_baseline_is_raw():
  np.testing.assert_array_equal(
    rl.group_advantages(jnp.asarray([3.0, -1.0]), 1, mode='none'), [3.0, -1.0]
  )


@pytest.mark.parametrize('mode', rl.ADVANTAGE_MODES)
def test_indivisible_raises(mode):
  with pytest.raises(ValueError, match='7 is not divisible by group_size 2'):
    rl.group_advantages(jnp.ones(7), 2, mode=mode)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_reward_raises(bad):
  rewards = np.asarray([1.0, 0.0, bad, 1.0])
  with pytest.raises(ValueError, match=r'finite.*indices \[2\]'):
    rl.group_advantages(rewards, 2)


def test_non_finite_under_jit_zeroes_the_group():
  fn = jax.jit(lambda r: rl.group_advantages(r, 2, mode='grpo'))
  got = fn(jnp.asarray([1.0, 0.0, np.nan, 1.0]))
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got[2:], 0.0)
  np.testing.assert_allclose(got[:2], _reference([1.0, 0.0], 2, 'grpo', 1e-4), rtol=1e-5)


@pytest.mark.parametrize(
  'kwargs, error',
  [
    (dict(group_size=2, mode='ppo'), "unknown advantage mode 'ppo'"),
    (dict(group_size=2.0), 'group_size must be a Python int, got 2.0'),
    (dict(group_size=0, mode='none'), 'group_size must be >= 1, got 0'),
  ],
)
def test_bad_options(kwargs, error):
  with pytest.raises((ValueError, TypeError), match=error):
    rl.group_advantages(jnp.ones(4), **kwargs)


def test_bad_rank():
  with pytest.raises(ValueError, match=r'1-D \[N\], got shape \(2, 2\)'):
    rl.group_advantages(jnp.ones((2, 2)), 2)


def test_sharded_rewards_match_unsharded(mesh8):
  rewards = np.random.default_rng(0).normal(size=16).astype(np.float32)
  sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec(('data', 'fsdp')))
  fn = jax.jit(lambda r: rl.group_advantages(r, 4, mode='grpo'))
  got = fn(jax.device_put(rewards, sharding))
  np.testing.assert_allclose(got, _reference(rewards, 4, 'grpo', 1e-4), rtol=1e-5, atol=1e-6)
