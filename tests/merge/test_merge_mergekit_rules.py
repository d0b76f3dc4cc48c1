"""TIES, DARE, linear and task arithmetic follow mergekit's conventions.

The references below are numpy transcriptions of mergekit 0.1's rules
(`sparsify.magnitude`, `generalized_task_arithmetic.get_mask` and its
mixing, `linear`), computed in fp32 like mergekit on fp32 models.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import merge


def mk_magnitude(delta, density, rescale):
  """mergekit's `magnitude`: keep int(density * n) entries by |delta|."""
  if density >= 1:
    return delta
  k = int(density * delta.size)
  flat = delta.reshape(-1)
  order = np.argsort(-np.abs(flat), kind='stable')[:k]
  mask = np.zeros_like(flat)
  mask[order] = 1
  return mk_rescale(delta, (flat * mask).reshape(delta.shape), rescale)


def mk_rescale(delta, masked, rescale):
  if not rescale:
    return masked
  before, after = np.abs(delta).sum(), np.abs(masked).sum()
  if before < 1e-7 or after < 1e-7:
    return masked
  return masked * (before / after)


def mk_mix(base, deltas, weights, *, consensus, normalize, lambda_):
  """mergekit's GTA mixing: sign mask by the weighted sum (>= 0 elects '+')."""
  w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * base.ndim)
  weighted = np.stack(deltas) * w
  if consensus:
    majority = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0).astype(np.float32)
    mask = np.sign(weighted) == majority
    mixed = (weighted * mask).sum(axis=0)
    divisor = (w * mask).sum(axis=0)
    divisor[divisor == 0] = 1
  else:
    mixed = weighted.sum(axis=0)
    divisor = w.sum(axis=0) + np.zeros_like(mixed)
    divisor[np.abs(divisor) < 1e-8] = 1
  if normalize:
    mixed = mixed / divisor
  return base + lambda_ * mixed


def _problem(shape=(10, 10), num=3, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=shape).astype(np.float32)
  experts = [(base + rng.normal(size=shape)).astype(np.float32) for _ in range(num)]
  return base, experts


def _run(method, base, experts, **options):
  trees = [{'w': jnp.asarray(e)} for e in experts]
  if method == 'linear':
    return np.asarray(merge.linear(trees, **options)['w'])
  return np.asarray(getattr(merge, method)({'w': jnp.asarray(base)}, trees, **options)['w'])


# case -> (densities, weights, normalize, rescale, lambda)
TIES_CASES = {
  # 0.29 * 100 = 28.999...: mergekit keeps 28, round() would keep 29.
  'truncated_count': ([0.29, 0.5, 0.71], [1.0, 1.0, 1.0], True, False, 1.0),
  'weights_and_lambda': ([0.3, 0.6, 1.0], [0.5, 1.5, -0.25], True, False, 0.7),
  'sum_not_mean': ([0.4, 0.4, 0.4], [1.0, 2.0, 1.0], False, False, 1.0),
  'l1_rescale': ([0.2, 0.5, 0.35], [1.0, 1.0, 1.0], True, True, 1.0),
  # 0.005 * 100 = 0.5: int() keeps no entry of that expert.
  'density_below_one_entry': ([0.005, 0.5, 0.5], [1.0, 1.0, 1.0], True, False, 1.0),
}


@pytest.mark.parametrize('case', sorted(TIES_CASES))
def test_ties_matches_mergekit(case):
  densities, weights, normalize, rescale, lambda_ = TIES_CASES[case]
  base, experts = _problem()
  deltas = [mk_magnitude(e - base, d, rescale) for e, d in zip(experts, densities)]
  want = mk_mix(base, deltas, weights, consensus=True, normalize=normalize, lambda_=lambda_)
  got = _run(
    'ties',
    base,
    experts,
    density=densities,
    weights=weights,
    normalize=normalize,
    rescale='l1' if rescale else 'none',
    scale=lambda_,
  )
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_ties_keeps_the_truncated_count():
  base, experts = _problem()
  for density, kept in ((0.29, 28), (0.5, 50), (0.005, 0), (1.0, 100)):
    out = _run('ties', base, experts[:1], density=density)
    assert np.count_nonzero(out != base) == kept, density


def test_exact_zero_sum_elects_plus():
  base = np.zeros((4,), np.float32)
  # Entry 0 cancels exactly: '+' wins and the +1 expert's value is kept
  # (a zero sign would keep nothing); entry 1 is an ordinary '-' majority.
  experts = [np.asarray([1.0, -2.0, 0, 0], np.float32), np.asarray([-1.0, 1.0, 0, 0], np.float32)]
  got = _run('ties', base, experts, density=1.0)
  want = mk_mix(
    base, [e - base for e in experts], [1, 1], consensus=True, normalize=True, lambda_=1
  )
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, [1.0, -2.0, 0, 0])


def test_cancelling_weights_divide_by_one():
  """Weights 1 and -1 agree on the sign of w tau; their divisor is 0, taken as 1."""
  base = np.zeros((2,), np.float32)
  experts = [np.asarray([1.0, 2.0], np.float32), np.asarray([-1.0, -2.0], np.float32)]
  got = _run('ties', base, experts, density=1.0, weights=[1.0, -1.0])
  np.testing.assert_array_equal(got, [2.0, 4.0])


DARE_CASES = {
  # mergekit's dare_ties: rescale l1, agreeing entries summed.
  'dare_ties': dict(combine='ties', normalize=False, rescale='l1'),
  'dare_linear': dict(combine='linear', normalize=False, rescale='l1'),
  'dare_linear_normalized': dict(combine='linear', normalize=True, rescale='none'),
}


@pytest.mark.parametrize('case', sorted(DARE_CASES))
def test_dare_matches_mergekit_given_the_same_masks(case):
  options = DARE_CASES[case]
  base, experts = _problem()
  key = jax.random.key(3)
  drops = np.asarray([0.3, 0.5, 0.6], np.float32)
  keeps = np.asarray(merge.dare_keep_masks(merge.leaf_key(key, 'w'), drops, shape=base.shape))
  deltas = [
    mk_rescale(e - base, np.where(k, e - base, 0), options['rescale'] == 'l1')
    for e, k in zip(experts, keeps)
  ]
  weights = [1.0, 0.5, 2.0]
  want = mk_mix(
    base,
    deltas,
    weights,
    consensus=options['combine'] == 'ties',
    normalize=options['normalize'],
    lambda_=1.0,
  )
  got = _run('dare', base, experts, drop=drops, key=key, weights=weights, **options)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize('normalize', [True, False])
def test_linear_and_task_arithmetic_normalize(normalize):
  base, experts = _problem()
  weights = [0.2, 0.3, 0.9]
  w = np.asarray(weights, np.float32)[:, None, None]
  got = _run('linear', base, experts, weights=weights, normalize=normalize)
  want = (w * np.stack(experts)).sum(axis=0) / (w.sum() if normalize else 1)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  got = _run('task_arithmetic', base, experts, weights=weights, normalize=normalize, scale=0.5)
  deltas = [e - base for e in experts]
  want = mk_mix(base, deltas, weights, consensus=False, normalize=normalize, lambda_=0.5)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
