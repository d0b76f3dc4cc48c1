"""Paired seed statistics: the t quantile, the paired difference and its decision word."""

import math

import numpy as np
import pytest

from curvopt import studies

# Two-sided 95% (the 0.975 quantile) from standard t tables, to the 4 decimals they print.
_T975 = {
  1: 12.7062,
  2: 4.3027,
  3: 3.1824,
  4: 2.7764,
  5: 2.5706,
  6: 2.4469,
  7: 2.3646,
  8: 2.3060,
  9: 2.2622,
  10: 2.2281,
  15: 2.1314,
  20: 2.0860,
  29: 2.0452,
  30: 2.0423,
  60: 2.0003,
  120: 1.9799,
}


@pytest.mark.parametrize('dof, expected', sorted(_T975.items()))
def test_t_quantile_matches_the_table(dof, expected):
  assert studies.t_quantile(0.975, dof) == pytest.approx(expected, abs=6e-5)


@pytest.mark.parametrize(
  'probability, dof, expected',
  [(0.95, 1, 6.3138), (0.95, 3, 2.3534), (0.95, 10, 1.8125), (0.995, 3, 5.8409), (0.9, 4, 1.5332)],
)
def test_t_quantile_other_levels(probability, dof, expected):
  assert studies.t_quantile(probability, dof) == pytest.approx(expected, abs=6e-5)
  assert studies.t_quantile(1 - probability, dof) == pytest.approx(-expected, abs=6e-5)


@pytest.mark.parametrize('p', [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_closed_forms_for_one_and_two_dof(p):
  # dof 1 is the Cauchy distribution; dof 2 has the inverse (2p - 1) / sqrt(2 p (1 - p)).
  assert studies.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
  assert studies.t_quantile(p, 2) == pytest.approx(
    (2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10
  )


def test_t_quantile_tends_to_the_normal_and_is_monotone():
  assert studies.t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-4)
  assert studies.t_quantile(0.5, 7) == 0.0
  values = [studies.t_quantile(0.975, d) for d in range(1, 40)]
  assert all(a > b for a, b in zip(values, values[1:]))


def test_t_quantile_against_scipy_where_installed():
  stats = pytest.importorskip('scipy.stats')
  for dof in (1, 2, 3, 4, 7, 11, 25, 64):
    for p in (0.55, 0.8, 0.95, 0.975, 0.995):
      assert studies.t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-9)


@pytest.mark.parametrize('dof', [0, -1, 2.5, True])
def test_t_quantile_rejects_bad_dof(dof):
  with pytest.raises(ValueError, match='dof'):
    studies.t_quantile(0.975, dof)


@pytest.mark.parametrize('probability', [0.0, 1.0, 1.5])
def test_t_quantile_rejects_bad_probability(probability):
  with pytest.raises(ValueError, match='probability'):
    studies.t_quantile(probability, 3)


def test_paired_difference_by_hand():
  # Differences -0.03, -0.02, -0.04, -0.01: mean -0.025, std sqrt(0.0005 / 3) = 0.012910,
  # half-width 3.1824 * 0.012910 / 2 = 0.020543.
  a = {0: 1.80, 1: 2.00, 2: 1.95, 3: 1.90}
  b = {0: 1.83, 1: 2.02, 2: 1.99, 3: 1.91, 4: 1.5}  # seed 4 has no partner: left out
  d = studies.paired_difference(a, b)
  assert d.seeds == (0, 1, 2, 3)
  assert d.differences == pytest.approx((-0.03, -0.02, -0.04, -0.01))
  assert d.n == 4
  assert d.mean == pytest.approx(-0.025)
  assert d.std == pytest.approx(0.0129099, abs=1e-7)
  assert (d.low, d.high) == (pytest.approx(-0.045543, abs=1e-6), pytest.approx(-0.004457, abs=1e-6))
  assert d.decision == 'lower'


def test_paired_difference_against_numpy():
  rng = np.random.default_rng(0)
  for n in (2, 3, 5, 12):
    a = dict(enumerate(rng.normal(2.0, 0.1, n)))
    b = dict(enumerate(rng.normal(2.0, 0.1, n)))
    diff = np.array([a[s] - b[s] for s in range(n)])
    half = studies.t_quantile(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)
    d = studies.paired_difference(a, b)
    assert d.mean == pytest.approx(diff.mean())
    assert d.std == pytest.approx(diff.std(ddof=1))
    assert d.low == pytest.approx(diff.mean() - half)
    assert d.high == pytest.approx(diff.mean() + half)
    # A 90% interval is narrower.
    d90 = studies.paired_difference(a, b, confidence=0.9)
    assert d.low < d90.low < d90.high < d.high


@pytest.mark.parametrize(
  'differences, decision',
  [
    ((0.03, 0.02, 0.04, 0.01), 'higher'),
    ((-0.03, -0.02, -0.04, -0.01), 'lower'),
    ((-0.03, 0.02, -0.04, 0.01), 'no effect measured'),  # the interval straddles 0
    ((-0.05, -0.04, -0.06, 0.05), 'no effect measured'),  # mean < 0, one seed the other way
    ((-0.03,), 'no effect measured'),  # one seed: no interval
    ((), 'no effect measured'),
  ],
)
def test_decision_only_when_the_whole_interval_is_on_one_side(differences, decision):
  b = {s: 2.0 for s in range(len(differences))}
  a = {s: 2.0 + x for s, x in enumerate(differences)}
  assert studies.paired_difference(a, b).decision == decision


def test_paired_difference_of_too_few_seeds_has_no_interval():
  d = studies.paired_difference({0: 1.0}, {0: 1.5})
  assert d.mean == pytest.approx(-0.5)
  assert math.isnan(d.std) and math.isnan(d.low) and math.isnan(d.high)
  empty = studies.paired_difference({0: 1.0}, {1: 1.5})
  assert empty.n == 0 and math.isnan(empty.mean)
  with pytest.raises(ValueError, match='confidence'):
    studies.paired_difference({0: 1.0}, {0: 1.0}, confidence=95)
