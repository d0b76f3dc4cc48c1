"""Newton-Schulz against SVD polar factors, batching, dtypes, sharding."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from curvopt import optim

_CONVERGENT = (1.5, -0.5, 0.0)  # classic cubic Newton-Schulz: exact polar


def _polar_np(x):
  u, _, vh = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vh


def _matrix(seed, shape):
  # numpy, not jax.random: each new jax.random shape costs a compilation.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize('shape', [(12, 20), (20, 12), (16, 16)])
def test_quintic_is_near_orthogonal_and_near_polar(shape):
  x = _matrix(0, shape)
  o = np.asarray(optim.newton_schulz(x), np.float64)
  sv = np.linalg.svd(o, compute_uv=False)
  # The default quintic trades exactness for speed: singular values land in
  # about [0.7, 1.2] (Jordan's Muon), not exactly at 1.
  assert sv.min() > 0.5 and sv.max() < 1.3, sv
  polar = _polar_np(x)
  rel = np.linalg.norm(o - polar) / np.linalg.norm(polar)
  assert rel < 0.3, rel
  # Same row and column spaces: projecting on the polar factor's loses little.
  assert np.sum(o * polar) / np.linalg.norm(o) / np.linalg.norm(polar) > 0.95


def test_convergent_coefficients_give_the_svd_polar_factor():
  x = _matrix(1, (10, 24))
  o = optim.newton_schulz(x, steps=40, coeffs=_CONVERGENT)
  np.testing.assert_allclose(np.asarray(o), _polar_np(x), atol=2e-5)


def test_batched_equals_per_matrix_loop():
  x = _matrix(2, (3, 2, 8, 12))
  ns = jax.jit(optim.newton_schulz)
  batched = np.asarray(ns(x))
  for i in range(3):
    for j in range(2):
      np.testing.assert_allclose(batched[i, j], np.asarray(ns(x[i, j])), rtol=1e-5, atol=1e-6)


def test_transposes_short_side_first():
  # NS(X^T) = NS(X)^T, and a tall input is computed on its short side.
  x = _matrix(3, (24, 8))
  np.testing.assert_allclose(
    np.asarray(optim.newton_schulz(x)), np.asarray(optim.newton_schulz(x.T)).T, rtol=1e-5, atol=1e-6
  )


def test_per_step_coefficients_and_bad_coefficients():
  x = _matrix(4, (6, 9))
  np.testing.assert_allclose(
    np.asarray(optim.newton_schulz(x, steps=3, coeffs=[_CONVERGENT] * 3)),
    np.asarray(optim.newton_schulz(x, steps=3, coeffs=_CONVERGENT)),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match='one triple per step'):
    optim.newton_schulz(x, steps=2, coeffs=[_CONVERGENT] * 3)


def test_bfloat16_iteration_is_close_to_float32():
  x = _matrix(5, (16, 32))
  o32 = optim.newton_schulz(x, dtype='float32')
  o16 = optim.newton_schulz(x, dtype='bfloat16')
  assert o16.dtype == jnp.float32  # returned in the input dtype
  rel = float(jnp.linalg.norm(o16 - o32) / jnp.linalg.norm(o32))
  assert 0 < rel < 0.1, rel
  # 'auto' is fp32 on CPU.
  np.testing.assert_array_equal(np.asarray(optim.newton_schulz(x, dtype='auto')), np.asarray(o32))


@pytest.mark.parametrize('bad', [dict(dtype='float8'), dict(dtype='int32')])
def test_bad_dtype_raises(bad):
  with pytest.raises(ValueError, match='Newton-Schulz dtype'):
    optim.newton_schulz(_matrix(0, (4, 4)), **bad)


def test_rank_one_input_raises():
  with pytest.raises(ValueError, match=r'\(7,\)'):
    optim.newton_schulz(jnp.ones(7))


def test_zero_matrix_stays_finite():
  assert np.all(np.asarray(optim.newton_schulz(jnp.zeros((4, 6)))) == 0)


@pytest.mark.parametrize('spec', [P('fsdp', None), P(None, 'fsdp'), P('data', 'fsdp')])
def test_sharded_equals_unsharded(mesh8, spec):
  x = _matrix(6, (16, 24))
  xs = jax.device_put(x, NamedSharding(mesh8, spec))
  out = jax.jit(optim.newton_schulz)(xs)
  assert out.sharding.spec == xs.sharding.spec  # laid out like the input
  np.testing.assert_allclose(
    np.asarray(out), np.asarray(optim.newton_schulz(x)), rtol=1e-5, atol=1e-6
  )


# Stacks of two oriented shapes ([8, 12] and [16, 16]), one of them tall.
_STACKS = [(2, 8, 12), (1, 12, 8), (3, 8, 12), (1, 16, 16)]
_NS = optim.NewtonSchulz(steps=5, coeffs=optim.DEFAULT_NS_COEFFS, dtype='float32', eps=1e-8)


def test_nuclear_norms_many_equal_the_svd_nuclear_norm():
  xs = [_matrix(20 + i, s) for i, s in enumerate(_STACKS)]
  got = optim.nuclear_norms_many(xs, newton_schulz=_NS._replace(polar='svd'))
  for x, norm in zip(xs, got):
    expected = sum(np.linalg.svd(np.asarray(m, np.float64), compute_uv=False).sum() for m in x)
    chex.assert_shape(norm, ())
    chex.assert_type(norm, jnp.float32)
    np.testing.assert_allclose(float(norm), expected, rtol=1e-5)


def test_nuclear_norms_many_equal_the_pairing_with_the_polar_factors():
  xs = [_matrix(30 + i, s) for i, s in enumerate(_STACKS)]
  polars = optim.orthogonalize_many(xs, newton_schulz=_NS)
  for x, o, norm in zip(xs, polars, optim.nuclear_norms_many(xs, newton_schulz=_NS)):
    np.testing.assert_allclose(float(norm), float(jnp.sum(x * o)), rtol=1e-5)


@pytest.mark.parametrize('ns_sharding', ['batch', 'replicated', 'none'])
def test_nuclear_norms_many_sharded_equal_unsharded(mesh8, ns_sharding):
  xs = [_matrix(40 + i, s) for i, s in enumerate(_STACKS)]
  # FSDP-like: the matrices' long axis over 'fsdp' where it divides by 4.
  sharded = [
    jax.device_put(x, NamedSharding(mesh8, P(None, 'fsdp') if x.shape[1] % 4 == 0 else P()))
    for x in xs
  ]
  run = jax.jit(
    lambda ms: optim.nuclear_norms_many(ms, newton_schulz=_NS._replace(sharding=ns_sharding))
  )
  for got, want in zip(run(sharded), optim.nuclear_norms_many(xs, newton_schulz=_NS)):
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
