"""estimate_fisher: mean squared per-example gradients against numpy loops."""

import jax.numpy as jnp
import numpy as np

from curvopt import merge


def linear_loss(params, example):
  """0.5 |x W + b - y|^2 for ONE example."""
  residual = example['x'] @ params['w'] + params['b'] - example['y']
  return 0.5 * jnp.sum(jnp.square(residual.astype(jnp.float32)))


def make_problem(batch_sizes=(6, 4), seed=0):
  rng = np.random.default_rng(seed)
  params = {
    'w': rng.normal(size=(4, 8)).astype(np.float32),
    'b': rng.normal(size=(8,)).astype(np.float32),
  }
  batches = [
    {
      'x': rng.normal(size=(n, 4)).astype(np.float32),
      'y': rng.normal(size=(n, 8)).astype(np.float32),
    }
    for n in batch_sizes
  ]
  return params, batches


def ref_fisher(params, batches):
  w, b = (np.asarray(params[k], np.float64) for k in ('w', 'b'))
  total_w, total_b, count = np.zeros_like(w), np.zeros_like(b), 0
  for batch in batches:
    for x, y in zip(np.asarray(batch['x'], np.float64), np.asarray(batch['y'], np.float64)):
      residual = x @ w + b - y
      grad_w = np.zeros_like(w)
      for i in range(w.shape[0]):
        for j in range(w.shape[1]):
          grad_w[i, j] = x[i] * residual[j]
      total_w += grad_w**2
      total_b += residual**2
      count += 1
  return {'w': total_w / count, 'b': total_b / count}


def test_estimate_fisher_matches_numpy():
  params, batches = make_problem()
  got = merge.estimate_fisher(linear_loss, params, iter(batches))
  want = ref_fisher(params, batches)
  for name in ('w', 'b'):
    assert got[name].dtype == jnp.float32
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5)


def test_estimate_fisher_is_fp32_for_bf16_params():
  params, batches = make_problem(batch_sizes=(6,))
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in params.items()}
  got = merge.estimate_fisher(linear_loss, bf16, batches)
  want = ref_fisher({k: np.asarray(v, np.float32) for k, v in bf16.items()}, batches)
  for name in ('w', 'b'):
    assert got[name].dtype == jnp.float32
    np.testing.assert_allclose(got[name], want[name], rtol=5e-2, atol=1e-2)


def test_estimated_fisher_feeds_ota_and_ffg():
  """A Fisher stands in for Adam's nu: ota and ffg_mask accept it."""
  params, batches = make_problem(batch_sizes=(6,))
  fisher_tree = merge.estimate_fisher(linear_loss, params, batches)
  expert = {k: v + 0.1 for k, v in params.items()}
  mask = merge.ffg_mask(params, expert, fisher_tree, density=0.5)
  merged = merge.ota(params, [expert, params], [fisher_tree, fisher_tree], masks=[mask, None])
  for name in ('w', 'b'):
    m = np.asarray(mask[name])
    # Equal curvature: kept entries average the two task vectors (0.1 and 0).
    np.testing.assert_allclose(
      np.asarray(merged[name])[m], params[name][m] + 0.05, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(merged[name])[~m], params[name][~m], rtol=1e-6)
