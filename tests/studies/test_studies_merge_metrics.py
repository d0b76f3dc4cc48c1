"""The fine-tuning merge study's numbers against loops and simulations: gain kept and its error,
task-vector size and cosine, the knee density, the rate rule and the decision rules."""

import itertools
import math

import numpy as np
import pytest

from curvopt import studies
from curvopt.studies import _merge_metrics


def _loop_gain_kept(merged, base, expert):
  """The delta-method ratio written out one prompt at a time."""
  n = len(base)
  a = [m - b for m, b in zip(merged, base)]
  d = [e - b for e, b in zip(expert, base)]
  d_mean = sum(d) / n
  r = (sum(a) / n) / d_mean
  resid = [x - r * y for x, y in zip(a, d)]
  mean = sum(resid) / n
  var = sum((x - mean) ** 2 for x in resid) / (n - 1)
  return r, math.sqrt(var / n) / d_mean


def _draws(rng, kind, n, size=()):
  """(base, expert, merged) per-prompt outcomes: nested (one difficulty per prompt decides all
  three), independent Bernoulli, or sampled shares of 4 completions."""
  if kind == 'nested':
    u = rng.random(size + (n,))
    return (u < 0.3) * 1.0, (u < 0.6) * 1.0, (u < 0.45) * 1.0
  if kind == 'independent':
    return tuple((rng.random(size + (n,)) < p) * 1.0 for p in (0.3, 0.6, 0.45))
  return tuple(rng.binomial(4, p, size + (n,)) / 4 for p in (0.3, 0.6, 0.45))


@pytest.mark.parametrize(
  'kind, seed', itertools.product(['nested', 'independent', 'shares'], [0, 1])
)
def test_gain_kept_matches_the_loop(kind, seed):
  base, expert, merged = _draws(np.random.default_rng(seed), kind, 200)
  value, se = studies.gain_kept(merged, base, expert)
  want_value, want_se = _loop_gain_kept(list(merged), list(base), list(expert))
  assert value == pytest.approx(want_value, rel=1e-12)
  assert se == pytest.approx(want_se, rel=1e-9)


@pytest.mark.parametrize('kind', ['nested', 'independent', 'shares'])
def test_gain_kept_error_matches_the_spread_of_repeated_test_sets(kind):
  # The delta-method error of one test set of 500 prompts against the sd of the ratio over
  # 4000 independent test sets drawn from the same population.
  base, expert, merged = _draws(np.random.default_rng(7), kind, 500, (4000,))
  d = np.mean(expert - base, axis=1)
  ratios = np.mean(merged - base, axis=1) / d
  ses = [studies.gain_kept(merged[i], base[i], expert[i]).se for i in range(200)]
  assert np.mean(ses) == pytest.approx(np.std(ratios, ddof=1), rel=0.1)
  assert np.mean(ratios) == pytest.approx(0.5, abs=0.01)


def test_gain_kept_edges():
  base = np.array([0.0, 1.0, 0.0, 0.0])
  expert = np.array([1.0, 1.0, 1.0, 0.0])
  assert studies.gain_kept(expert, base, expert) == (1.0, 0.0)
  assert studies.gain_kept(base, base, expert) == (0.0, 0.0)
  # An expert that gained nothing leaves no gain to keep.
  assert all(math.isnan(x) for x in studies.gain_kept(expert, base, base))
  with pytest.raises(ValueError, match='same prompts'):
    studies.gain_kept(expert[:3], base, expert)
  with pytest.raises(ValueError, match='merged'):
    studies.gain_kept([1.0], [0.0], [1.0])


def test_accuracy_and_gain_errors():
  rng = np.random.default_rng(3)
  x = (rng.random(400) < 0.3) * 1.0
  p = x.mean()
  acc = studies.accuracy_estimate(x)
  assert acc.value == p
  # The binomial error, up to the n / (n - 1) of the sample variance.
  assert acc.se == pytest.approx(math.sqrt(p * (1 - p) / 400 * 400 / 399), rel=1e-12)
  y = np.where(rng.random(400) < 0.2, 1.0, x)
  gain = studies.gain_estimate(y, x)
  diff = [b - a for a, b in zip(x, y)]
  mean = sum(diff) / 400
  assert gain.value == pytest.approx(mean)
  assert gain.se == pytest.approx(
    math.sqrt(sum((v - mean) ** 2 for v in diff) / 399 / 400), rel=1e-12
  )


def test_mean_over_tasks_and_seed_spread():
  got = studies.mean_over_tasks(
    [studies.Estimate(0.5, 0.1), studies.Estimate(math.nan, math.nan), studies.Estimate(0.2, 0.2)]
  )
  assert got.value == pytest.approx(0.35) and got.se == pytest.approx(math.sqrt(0.05) / 2)
  assert all(math.isnan(x) for x in studies.mean_over_tasks([studies.Estimate(math.nan, 0.1)]))
  assert studies.seed_spread([1.0, 2.0, 3.0, math.nan]) == (2.0, 1.0)
  mean, sd = studies.seed_spread([0.4])
  assert mean == 0.4 and math.isnan(sd)


def _trees(seed):
  rng = np.random.default_rng(seed)
  shapes = {'embed': (12, 8), 'layers_0': {'q': (8, 8), 'norm': (8,)}}

  def tree():
    return {
      'embed': rng.normal(size=shapes['embed']).astype(np.float32),
      'layers_0': {k: rng.normal(size=s).astype(np.float32) for k, s in shapes['layers_0'].items()},
    }

  return tree(), tree(), tree()


def _flat(tree):
  return np.concatenate(
    [tree['embed'].ravel(), tree['layers_0']['norm'].ravel(), tree['layers_0']['q'].ravel()]
  ).astype(np.float64)


@pytest.mark.parametrize('seed', range(3))
def test_task_vector_size_and_cosine_match_numpy(seed):
  base, a, b = _trees(seed)
  fb, fa, fbb = _flat(base), _flat(a), _flat(b)
  assert studies.relative_size(base, a) == pytest.approx(
    np.linalg.norm(fa - fb) / np.linalg.norm(fb), rel=1e-12
  )
  ta, tb = fa - fb, fbb - fb
  cos = float(np.dot(ta, tb) / (np.linalg.norm(ta) * np.linalg.norm(tb)))
  assert studies.task_vector_cosine(base, a, b) == pytest.approx(cos, rel=1e-10)
  assert studies.task_vector_cosine(base, a, a) == pytest.approx(1.0)
  assert math.isnan(studies.task_vector_cosine(base, base, a))
  del b['embed']
  with pytest.raises(ValueError, match='different trees'):
    studies.relative_size(base, b)


@pytest.mark.parametrize('seed, tail', itertools.product(range(3), [0.5, 1.0, 3.0]))
def test_knee_is_the_farthest_point_above_the_diagonal(seed, tail):
  rng = np.random.default_rng(seed)
  saliency = {
    'a': rng.pareto(tail, size=(30, 20)).astype(np.float32),
    'b': rng.pareto(tail, size=(50,)).astype(np.float32),
  }
  flat = np.concatenate([saliency['a'].ravel(), saliency['b'].ravel()]).astype(np.float64)
  ordered = sorted(flat, reverse=True)
  total, n = sum(ordered), len(ordered)
  best_k, best, running = 0, -1.0, 0.0
  for k, s in enumerate(ordered, start=1):
    running += s
    if running / total - k / n > best:
      best_k, best = k, running / total - k / n
  threshold = studies.knee_threshold(saliency)
  assert int(np.sum(flat >= threshold)) == best_k
  mask = {k: v >= threshold for k, v in saliency.items()}
  assert studies.mask_density(mask) == pytest.approx(best_k / n)


def test_knee_rejects_bad_saliencies():
  with pytest.raises(ValueError, match='non-negative'):
    studies.knee_threshold({'a': np.array([1.0, -1.0])})
  with pytest.raises(ValueError, match='at least one'):
    studies.knee_threshold({})


@pytest.mark.parametrize(
  'rule, parsed',
  [('knee', ('knee', None)), ('mass0.9', ('mass', 0.9)), ('mass1', ('mass', 1.0))],
)
def test_parse_auto_rule(rule, parsed):
  assert _merge_metrics.parse_auto_rule(rule) == parsed


@pytest.mark.parametrize('rule', ['mass', 'mass0', 'mass1.5', 'elbow', 'knee0.5'])
def test_parse_auto_rule_rejects(rule):
  with pytest.raises(ValueError, match='knee'):
    _merge_metrics.parse_auto_rule(rule)


_E = studies.Estimate
_SWEEP = {
  1e-4: {'a': _E(0.02, 0.01), 'b': _E(0.10, 0.02)},
  3e-4: {'a': _E(0.06, 0.02), 'b': _E(0.20, 0.02)},
  1e-3: {'a': _E(0.30, 0.02), 'b': _E(0.40, 0.02)},
}


@pytest.mark.parametrize(
  'sweep, min_z, want',
  [
    (_SWEEP, 3.0, 3e-4),  # 1e-4 fails on 'a' (z 2)
    (_SWEEP, 1.5, 1e-4),
    (_SWEEP, 10.0, 1e-3),
    (_SWEEP, 20.0, None),
    (_SWEEP, None, 1e-4),  # no rule: the smallest rate
    ({1e-3: {'a': _E(0.1, 0.0)}}, 3.0, 1e-3),  # every prompt gained: infinitely clear
    ({1e-3: {'a': _E(0.0, 0.0)}}, 0.0, None),  # no gain is never clearly better
    ({1e-3: {'a': _E(-0.1, 0.01)}}, -20.0, None),
  ],
)
def test_choose_rate(sweep, min_z, want):
  assert studies.choose_rate(sweep, min_z=min_z) == want


_BASELINES = {'linear': ['linear'], 'task arithmetic': ['ta_s0.5', 'ta_s1']}


@pytest.mark.parametrize(
  'scores, beaten',
  [
    # Margin over the best task-arithmetic scale (0.6-0.7) well above its seed spread.
    (
      {'c': [0.9, 0.92, 0.88], 'linear': [0.5, 0.5, 0.5], 'ta_s0.5': [0.6, 0.7, 0.65]},
      {'linear': True, 'task arithmetic': True},
    ),
    # Ahead of task arithmetic on average (+0.02) but by less than the spread (sd 0.1).
    (
      {'c': [0.8, 0.7, 0.9], 'linear': [0.5, 0.5, 0.5], 'ta_s0.5': [0.68, 0.78, 0.88]},
      {'linear': True, 'task arithmetic': False},
    ),
    # One seed missing (nan) for the candidate: the two paired seeds decide.
    (
      {'c': [0.9, math.nan, 0.9], 'linear': [0.5, 0.9, 0.55], 'ta_s0.5': [0.1, 0.1, 0.1]},
      {'linear': True, 'task arithmetic': True},
    ),
  ],
)
def test_compare_to_baselines(scores, beaten):
  scores = {'ta_s1': [0.0, 0.0, 0.0], **scores}
  got = studies.compare_to_baselines(scores, 'c', _BASELINES)
  assert {c.family: c.beaten for c in got} == beaten
  ta = next(c for c in got if c.family == 'task arithmetic')
  assert ta.setting == 'ta_s0.5'  # the best scale by its mean over seeds
  diffs = [x - y for x, y in zip(scores['c'], scores['ta_s0.5']) if not math.isnan(x - y)]
  assert ta.margin == pytest.approx(np.mean(diffs))
  assert ta.spread == pytest.approx(np.std(diffs, ddof=1))


def test_single_seed_beats_nothing():
  (got,) = studies.compare_to_baselines({'c': [0.9], 'linear': [0.1]}, 'c', {'linear': ['linear']})
  assert got.margin == pytest.approx(0.8) and math.isnan(got.spread) and not got.beaten


@pytest.mark.parametrize(
  'rank1, within',
  [
    ([0.805, 0.795, 0.8], True),
    ([0.81, 0.81, 0.81], True),  # exactly one point
    ([0.78, 0.79, 0.78], False),
    ([0.9, 0.7, 0.8], True),  # the rule reads the mean only
  ],
)
def test_within_points(rank1, within):
  mean, sd, got = studies.within_points({'r': rank1, 'f': [0.8, 0.8, 0.8]}, 'r', 'f', points=1.0)
  assert got == within
  assert mean == pytest.approx(np.mean(rank1) - 0.8)
  assert sd == pytest.approx(np.std(rank1, ddof=1))


def test_best_setting_ignores_nan():
  scores = {'x': [math.nan, math.nan], 'y': [0.1, 0.2], 'z': [0.3, math.nan]}
  assert studies.best_setting(scores, ['x', 'y', 'z']) == 'z'
  assert studies.best_setting(scores, ['x']) == 'x'
