"""LMOs: directions attain their dual norms; the [d_in, d_out] convention."""

import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import optim

_SVD = optim.NewtonSchulz(polar='svd')


def _normal(seed, shape):
  # numpy, not jax.random: each new jax.random shape costs a compilation.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# Slow references on a single [d_in, d_out] matrix (or a flat vector).
def _spectral_norm(w):
  d_in, d_out = w.shape
  return np.sqrt(d_in / d_out) * np.linalg.norm(w, 2)


def _spectral_dual(d):
  d_in, d_out = d.shape
  return np.sqrt(d_out / d_in) * np.linalg.svd(d, compute_uv=False).sum()


def _colnorm_norm(w):
  return max(np.linalg.norm(w[i, :]) / np.sqrt(w.shape[1]) for i in range(w.shape[0]))


def _colnorm_dual(d):
  return sum(np.sqrt(d.shape[1]) * np.linalg.norm(d[i, :]) for i in range(d.shape[0]))


def _rownorm_norm(w):
  return max(np.sqrt(w.shape[0]) * np.linalg.norm(w[:, j]) for j in range(w.shape[1]))


def _rownorm_dual(d):
  return sum(np.linalg.norm(d[:, j]) / np.sqrt(d.shape[0]) for j in range(d.shape[1]))


_TABLE = {
  # name: (options, primal norm, dual norm)
  'spectral': (dict(newton_schulz=_SVD), _spectral_norm, _spectral_dual),
  'sign': ({}, lambda w: np.abs(w).max(), lambda d: np.abs(d).sum()),
  'colnorm': ({}, _colnorm_norm, _colnorm_dual),
  'rownorm': ({}, _rownorm_norm, _rownorm_dual),
  'bias_rms': ({}, lambda w: np.sqrt(np.mean(w**2)), lambda d: np.sqrt(d.size) * np.linalg.norm(d)),
}


def test_table_covers_every_lmo():
  assert set(_TABLE) == set(optim.LMO_NAMES)


@pytest.mark.parametrize('name', sorted(_TABLE))
@pytest.mark.parametrize('shape', [(4, 16), (12, 6)])
def test_direction_attains_dual_norm(name, shape):
  options, norm, dual = _TABLE[name]
  oracle = optim.lmo(name, **options)
  g = np.asarray(_normal(0, shape), np.float64)
  direction = np.asarray(oracle.direction(jnp.asarray(g, jnp.float32)), np.float64)
  expected = dual(g)
  np.testing.assert_allclose(float(oracle.dual_norm(jnp.asarray(g))), expected, rtol=1e-4)
  # The direction is on the unit sphere of the norm and attains the dual.
  np.testing.assert_allclose(norm(direction), 1.0, rtol=1e-4)
  np.testing.assert_allclose(np.sum(g * -direction), expected, rtol=1e-4)
  # No other unit-ball point does better (Hoelder): random competitors.
  rng = np.random.default_rng(1)
  for _ in range(20):
    v = rng.standard_normal(shape)
    v /= norm(v)
    assert np.sum(g * -v) <= expected * (1 + 1e-6)


def test_newton_schulz_spectral_is_close_to_exact():
  g = _normal(2, (16, 32))
  approx = optim.lmo('spectral')
  exact = optim.lmo('spectral', newton_schulz=_SVD)
  value = float(jnp.sum(g * -approx.direction(g)))
  np.testing.assert_allclose(value, float(exact.dual_norm(g)), rtol=0.2)
  np.testing.assert_allclose(float(approx.dual_norm(g)), float(exact.dual_norm(g)), rtol=0.2)


def test_flax_kernel_convention_rms_gain_is_one():
  # A Flax kernel W [d_in, d_out] acts as y = x @ W. The spectral direction
  # must be a unit RMS->RMS map in that orientation: max ||x W||_rms /
  # ||x||_rms = 1. Swapping d_in and d_out would give d_in / d_out = 1/4.
  d_in, d_out = 4, 16
  w = optim.lmo('spectral', newton_schulz=_SVD).direction(_normal(3, (d_in, d_out)))
  w = np.asarray(w, np.float64)
  rms = lambda v: np.sqrt(np.mean(v**2, axis=-1))  # noqa: E731
  x = np.linalg.svd(w)[0].T  # rows: input directions, the top one first
  gains = rms(x @ w) / rms(x)
  np.testing.assert_allclose(gains.max(), 1.0, rtol=1e-5)
  random_x = np.random.default_rng(0).standard_normal((100, d_in))
  assert np.all(rms(random_x @ w) / rms(random_x) <= 1 + 1e-5)


def test_stacks_are_independent_matrices():
  oracle = optim.lmo('spectral', newton_schulz=_SVD)
  g = _normal(4, (3, 6, 10))
  np.testing.assert_allclose(
    float(oracle.dual_norm(g)), sum(float(oracle.dual_norm(g[i])) for i in range(3)), rtol=1e-5
  )


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"'nope'.*spectral.*bias_rms"):
    optim.lmo('nope')


@pytest.mark.parametrize('name', ['spectral', 'colnorm', 'rownorm'])
def test_matrix_lmos_reject_vectors(name):
  with pytest.raises(ValueError, match=r'\(5,\)'):
    optim.lmo(name).direction(jnp.ones(5))
