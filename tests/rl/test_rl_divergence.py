"""rl.categorical_entropy / categorical_kl against numpy loops."""

import math

import jax
import numpy as np
import pytest

from curvopt import rl


def _probs(z):
  e = [math.exp(v - max(z)) for v in z]
  return [v / sum(e) for v in e]


@pytest.mark.parametrize('scale', [0.1, 3.0, 30.0])
def test_entropy_and_kl_match_numpy(scale):
  rng = np.random.default_rng(int(scale * 10))
  p_logits, q_logits = rng.normal(size=(2, 3, 4, 9)) * scale
  entropy = np.asarray(jax.jit(rl.categorical_entropy)(p_logits))
  kl = np.asarray(jax.jit(rl.categorical_kl)(p_logits, q_logits))
  assert entropy.shape == kl.shape == (3, 4)
  for i in range(3):
    for j in range(4):
      p, q = _probs(p_logits[i, j]), _probs(q_logits[i, j])
      want_h = -sum(a * math.log(a) for a in p if a > 0)
      want_kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)
      np.testing.assert_allclose(entropy[i, j], want_h, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(kl[i, j], want_kl, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(rl.categorical_kl(p_logits, p_logits), 0.0, atol=1e-6)
  # Log-probs in, the same numbers out; a -inf logit of p contributes nothing.
  np.testing.assert_allclose(
    rl.categorical_kl(jax.nn.log_softmax(p_logits), q_logits), kl, rtol=1e-4, atol=1e-6
  )
  masked = p_logits.copy()
  masked[..., 0] = -np.inf
  assert np.isfinite(np.asarray(rl.categorical_kl(masked, q_logits))).all()
  with pytest.raises(ValueError, match='must share a shape'):
    rl.categorical_kl(p_logits, q_logits[..., :3])
