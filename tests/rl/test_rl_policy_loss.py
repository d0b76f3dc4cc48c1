"""policy_loss against hand-computed values for every aggregation and KL."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import rl

# Two sequences, T = 3. Sequence 0 (A = 1) has ratios e^0.25 (above 1 + 0.2:
# clipped high) and e^-0.5; its third token is padding with a garbage -inf.
# Sequence 1 (A = -2) has ratios e^0.2, e^-0.3 (below 1 - 0.2: clipped low), 1.
LOGP = [[-1.0, -2.0, -np.inf], [-0.3, -1.3, -9.0]]
OLD = [[-1.25, -1.5, 0.0], [-0.5, -1.0, -9.0]]
REF = [[-0.9, -2.5, 0.0], [-0.1, -1.0, -8.0]]
ENT = [[1.0, 2.0, 100.0], [0.5, 0.5, 0.5]]
ADV = [1.0, -2.0]
MASK = [[1, 1, 0], [1, 1, 1]]


def _kl(lp, ref, kind):
  d = lp - ref
  return {'k1': d, 'k2': 0.5 * d * d, 'k3': math.exp(-d) + d - 1}[kind]


def _reference(agg, kl, beta, dual_clip, max_len, eps=0.2):
  """Token-by-token Python loops over the fixture above."""
  token, token_pg, valid = [], [], []
  for b in range(2):
    a = ADV[b]
    for t in range(3):
      if not MASK[b][t]:
        token.append(None), token_pg.append(None), valid.append(False)
        continue
      ratio = math.exp(LOGP[b][t] - OLD[b][t])
      clipped = min(max(ratio, 1 - eps), 1 + eps)
      pg = max(-a * ratio, -a * clipped)
      if dual_clip is not None and a < 0:
        pg = min(pg, -a * dual_clip)
      token_pg.append(pg)
      token.append(pg + beta * _kl(LOGP[b][t], REF[b][t], kl))
      valid.append(True)

  def reduce(values):
    rows = [values[3 * b : 3 * b + 3] for b in range(2)]
    sums = [sum(v for v in row if v is not None) for row in rows]
    counts = [sum(v is not None for v in row) for row in rows]
    if agg == 'token-mean':
      return sum(sums) / sum(counts)
    if agg == 'seq-mean-token-mean':
      return sum(s / c for s, c in zip(sums, counts)) / 2
    if agg == 'seq-mean-token-sum':
      return sum(sums) / 2
    return sum(s / (max_len or 3) for s in sums) / 2

  return reduce(token), reduce(token_pg)


CASES = [
  # (agg, kl, beta, dual_clip, max_len)
  ('token-mean', 'k3', 0.0, None, None),
  ('seq-mean-token-mean', 'k3', 0.0, None, None),
  ('seq-mean-token-sum', 'k3', 0.0, None, None),
  ('seq-mean-token-sum-norm', 'k3', 0.0, None, None),
  ('seq-mean-token-sum-norm', 'k3', 0.0, None, 8),
  ('token-mean', 'k1', 0.1, None, None),
  ('seq-mean-token-mean', 'k2', 0.1, None, None),
  ('seq-mean-token-sum', 'k3', 0.1, None, None),
  ('seq-mean-token-mean', 'k3', 0.05, 1.1, None),
]


@pytest.fixture(scope='module')
def loss_fn():
  statics = ('agg', 'kl', 'beta', 'dual_clip', 'max_len')
  return jax.jit(rl.policy_loss, static_argnames=statics)


@pytest.mark.parametrize('agg, kl, beta, dual_clip, max_len', CASES)
def test_matches_hand_computation(loss_fn, agg, kl, beta, dual_clip, max_len):
  loss, metrics = loss_fn(
    jnp.asarray(LOGP),
    jnp.asarray(OLD),
    jnp.asarray(ADV),
    jnp.asarray(MASK),
    agg=agg,
    kl=kl,
    beta=beta,
    dual_clip=dual_clip,
    max_len=max_len,
    ref_logp=jnp.asarray(REF),
    entropy=jnp.asarray(ENT),
  )
  want, want_pg = _reference(agg, kl, beta, dual_clip, max_len)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['pg_loss'], want_pg, rtol=1e-5)
  # 5 valid tokens: one clipped low, one clipped high, KL and entropy means.
  assert metrics['num_tokens'] == 5
  np.testing.assert_allclose(metrics['clip_frac_low'], 0.2)
  np.testing.assert_allclose(metrics['clip_frac_high'], 0.2)
  np.testing.assert_allclose(metrics['entropy'], 4.5 / 5, rtol=1e-6)
  kls = [_kl(LOGP[b][t], REF[b][t], kl) for b in range(2) for t in range(3) if MASK[b][t]]
  np.testing.assert_allclose(metrics['kl'], sum(kls) / 5, rtol=1e-5)
  ratios = [math.exp(LOGP[b][t] - OLD[b][t]) for b in range(2) for t in range(3) if MASK[b][t]]
  np.testing.assert_allclose(metrics['ratio_mean'], sum(ratios) / 5, rtol=1e-6)
  if dual_clip is not None:
    # Only the e^0.2 token of the A = -2 sequence exceeds the cap 1.1.
    np.testing.assert_allclose(metrics['dual_clip_frac'], 0.2)


def test_literal_values_at_ratio_one():
  # logp == old_logp: token loss -A. Tokens: seq 0 (A=1) two, seq 1 (A=-1) one.
  logp = jnp.asarray([[-1.0, -2.0, -3.0], [-0.5, -0.1, -0.2]])
  adv = jnp.asarray([1.0, -1.0])
  mask = jnp.asarray([[1, 1, 0], [1, 0, 0]])
  want = {
    'token-mean': -1 / 3,
    'seq-mean-token-mean': 0.0,
    'seq-mean-token-sum': -0.5,
    'seq-mean-token-sum-norm': -1 / 6,
  }
  for agg, value in want.items():
    loss, metrics = rl.policy_loss(logp, logp, adv, mask, agg=agg)
    np.testing.assert_allclose(loss, value, rtol=1e-6, err_msg=agg)
    assert metrics['clip_frac_low'] == metrics['clip_frac_high'] == 0
    np.testing.assert_allclose(metrics['ratio_mean'], 1.0)
  # k3 with logp - ref = 1: e^-1 + 1 - 1 = e^-1 per token, beta 0.5.
  loss, _ = rl.policy_loss(
    logp, logp, adv, mask, agg='token-mean', beta=0.5, ref_logp=logp - 1.0, kl='k3'
  )
  np.testing.assert_allclose(loss, -1 / 3 + 0.5 * math.exp(-1), rtol=1e-6)


@pytest.mark.parametrize('agg', rl.AGG_MODES)
def test_all_masked_gives_zero_loss_and_finite_grads(agg):
  logp = jnp.full((2, 3), -jnp.inf)
  old = jnp.zeros((2, 3))

  def loss(lp):
    return rl.policy_loss(
      lp, old, jnp.asarray([1.0, -1.0]), jnp.zeros((2, 3), bool), agg=agg, beta=0.1, ref_logp=old
    )[0]

  value, grad = jax.value_and_grad(loss)(logp)
  assert value == 0.0
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad, 0.0)


def test_gradient_flows_only_through_unclipped_valid_tokens():
  # Token (0, 0) is clipped high with A > 0: zero gradient. Token (0, 1) is
  # unclipped: d(-A ratio)/d logp = -A ratio. Padding -inf: zero, not NaN.
  def loss(lp):
    return rl.policy_loss(
      lp, jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK), agg='seq-mean-token-sum'
    )[0]

  grad = np.asarray(jax.grad(loss)(jnp.asarray(LOGP)))
  assert np.all(np.isfinite(grad))
  assert grad[0, 0] == 0.0 and grad[0, 2] == 0.0
  np.testing.assert_allclose(grad[0, 1], -1.0 * math.exp(-0.5) / 2, rtol=1e-6)
  assert grad[1, 1] == 0.0  # clipped low with A < 0


def test_sharded_matches_unsharded(mesh8):
  rng = np.random.default_rng(0)
  logp = -rng.uniform(0.1, 3.0, size=(4, 6)).astype(np.float32)
  old = logp + rng.normal(scale=0.2, size=(4, 6)).astype(np.float32)
  adv = rng.normal(size=4).astype(np.float32)
  mask = (rng.uniform(size=(4, 6)) < 0.7).astype(np.float32)

  def value_and_grad(lp, o, a, m):
    def fn(x):
      return rl.policy_loss(x, o, a, m, agg='seq-mean-token-mean', beta=0.1, ref_logp=o, kl='k3')

    return jax.value_and_grad(fn, has_aux=True)(lp)

  fn = jax.jit(value_and_grad)
  (loss, metrics), grad = fn(logp, old, adv, mask)
  rows = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec('data'))

  def put(x):
    return jax.device_put(x, rows)

  (loss8, metrics8), grad8 = fn(put(logp), put(old), put(adv), put(mask))
  np.testing.assert_allclose(loss8, loss, rtol=1e-6)
  np.testing.assert_allclose(grad8, grad, rtol=1e-6, atol=1e-7)
  for key in metrics:
    np.testing.assert_allclose(metrics8[key], metrics[key], rtol=1e-6)


@pytest.mark.parametrize(
  'kwargs, error',
  [
    (dict(agg='sum'), "unknown aggregation 'sum'"),
    (dict(kl='k4'), "unknown kl estimator 'k4'"),
    (dict(beta=0.1), 'beta=0.1 needs ref_logp'),
    (dict(dual_clip=0.5), 'dual_clip must be > 1'),
    (dict(eps_low=-0.1), 'eps_low and eps_high must be >= 0'),
    (dict(max_len=0), 'max_len must be > 0, got 0'),
  ],
)
def test_bad_options(kwargs, error):
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=error):
    rl.policy_loss(x, x, jnp.zeros(2), x, **kwargs)


def test_bad_shapes():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r'old_logp has shape \(2, 4\)'):
    rl.policy_loss(x, jnp.zeros((2, 4)), jnp.zeros(2), x)
  with pytest.raises(ValueError, match=r'advantages must be \[B\] = \(2,\)'):
    rl.policy_loss(x, x, jnp.zeros(3), x)
  with pytest.raises(ValueError, match=r'logp must be \[B, T\]'):
    rl.policy_loss(jnp.zeros(3), x, jnp.zeros(2), x)
