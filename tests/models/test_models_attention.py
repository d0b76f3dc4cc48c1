"""Attention, masks and RoPE against slow numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import models
from curvopt.models import _rope


def _np_attention(q, k, v, allowed):
  """Loop reference: q [B,T,N,H], k/v [B,S,K,H], allowed [B,T,S] bool."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b_size, t_size, n_heads, h = q.shape
  group = n_heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(b_size):
    for n in range(n_heads):
      for t in range(t_size):
        scores = k[b, :, n // group] @ q[b, t, n] / np.sqrt(h)
        scores = np.where(allowed[b, t], scores, -np.inf)
        weights = np.exp(scores - scores.max())
        out[b, t, n] = (weights / weights.sum()) @ v[b, :, n // group]
  return out


def _np_causal_padding_mask(valid, offset, num_queries):
  b_size, s_size = valid.shape
  allowed = np.zeros((b_size, num_queries, s_size), bool)
  for b in range(b_size):
    for t in range(num_queries):
      for s in range(s_size):
        slot = offset + t
        allowed[b, t, s] = s <= slot and (bool(valid[b, s]) or s == slot)
  return allowed


# name -> (num query heads, num kv heads, query offset, num keys)
ATTENTION_CASES = {
  'mha_causal': (4, 4, 0, 5),
  'gqa_causal': (4, 2, 0, 5),
  'mqa_decode_offset': (4, 1, 3, 8),
}


@pytest.mark.parametrize('name', sorted(ATTENTION_CASES))
@pytest.mark.parametrize('padded', [False, True])
def test_attention_matches_numpy(name, padded):
  n_heads, n_kv, offset, num_keys = ATTENTION_CASES[name]
  num_queries = 5 if offset == 0 else 2
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, num_queries, n_heads, 8)).astype(np.float32)
  k = rng.normal(size=(2, num_keys, n_kv, 8)).astype(np.float32)
  v = rng.normal(size=(2, num_keys, n_kv, 8)).astype(np.float32)
  valid = np.ones((2, num_keys), bool)
  if padded:
    valid[0, :2] = False  # left padding in row 0
  mask = models.causal_padding_mask(jnp.asarray(valid), offset, num_queries)
  allowed = _np_causal_padding_mask(valid, offset, num_queries)
  np.testing.assert_array_equal(mask, allowed)
  out = models.dot_product_attention(q, k, v, mask_BxTxS=mask)
  np.testing.assert_allclose(out, _np_attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)
  if offset == 0 and not padded:
    causal = models.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(causal, out, rtol=1e-6, atol=1e-6)


def test_padding_query_attends_only_to_itself():
  mask = models.causal_padding_mask(jnp.array([[0, 0, 1, 1]]), 0, 4)
  np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


def test_rope_matches_pairwise_rotation():
  rng = np.random.default_rng(1)
  head_dim, theta = 8, 100.0
  x = rng.normal(size=(2, 3, 2, head_dim)).astype(np.float32)
  positions = np.array([[0, 1, 7], [5, 0, 2]])
  cos, sin = _rope.rope_angles(jnp.asarray(positions), head_dim, theta)
  out = np.asarray(_rope.apply_rope(jnp.asarray(x), cos, sin))
  half = head_dim // 2
  expected = np.empty_like(x, dtype=np.float64)
  for b in range(2):
    for t in range(3):
      for i in range(half):
        angle = positions[b, t] * theta ** (-2 * i / head_dim)
        c, s = np.cos(angle), np.sin(angle)
        a, bb = x[b, t, :, i], x[b, t, :, i + half]
        expected[b, t, :, i] = a * c - bb * s
        expected[b, t, :, i + half] = bb * c + a * s
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # A rotation: norms are kept, and relative positions are all that matter.
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_positions_from_mask():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
  np.testing.assert_array_equal(
    models.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 2]]
  )
  assert models.positions_from_mask(mask).dtype == jnp.int32


def test_sharded_attention_matches_numpy(mesh8):
  """Batch-sharded queries/keys give the unsharded result."""
  rng = np.random.default_rng(2)
  q = rng.normal(size=(8, 4, 4, 8)).astype(np.float32)
  k = rng.normal(size=(8, 4, 2, 8)).astype(np.float32)
  v = rng.normal(size=(8, 4, 2, 8)).astype(np.float32)
  sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec(('data', 'fsdp')))
  sharded = [jax.device_put(a, sharding) for a in (q, k, v)]
  fn = jax.jit(lambda q, k, v: models.dot_product_attention(q, k, v, is_causal=True))
  expected = _np_attention(q, k, v, np.tril(np.ones((8, 4, 4), bool)))
  out = fn(*sharded)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
