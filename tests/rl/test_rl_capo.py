"""CAPO token stats, mask and shadow update against numpy token loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import rl

B, T, H, V, K = 3, 5, 8, 40, 6
B1, B2, EPS = 0.9, 0.999, 1e-8


def _top_k_set(h, head, a, k):
  logits = head @ h
  ids = list(np.argsort(-logits, kind='stable')[:k])
  if a not in ids:
    ids[-1] = a
  ids = np.asarray(ids)
  z = logits[ids] - logits[ids].max()
  pi = np.exp(z) / np.exp(z).sum()
  v = (ids == a).astype(np.float64) - pi
  return ids, pi, v


def reference_stats(hidden, head, actions, adv, mu, nu, count, lr, k):
  """m_H, m_F of the spec, one token at a time, in float64."""
  hidden, head, mu, nu = (np.asarray(x, np.float64) for x in (hidden, head, mu, nu))
  m_h = np.zeros(actions.shape)
  m_f = np.zeros(actions.shape)
  for b in range(actions.shape[0]):
    for t in range(actions.shape[1]):
      h, a, A = hidden[b, t], int(actions[b, t]), float(adv[b])
      if A == 0:
        continue
      ids, pi, v = _top_k_set(h, head, a, k)
      g = A * np.outer(v, h)
      if count == 0:
        d = g
      else:
        m_hat = (B1 * mu[ids] + (1 - B1) * g) / (1 - B1 ** (count + 1))
        v_hat = (B2 * nu[ids] + (1 - B2) * g**2) / (1 - B2 ** (count + 1))
        d = m_hat / (np.sqrt(v_hat) + EPS)
      u = d @ h
      vu = v @ u
      quad = u @ (np.diag(pi) - np.outer(pi, pi)) @ u
      m_h[b, t] = lr * A * vu + 0.5 * lr**2 * A * (vu**2 - quad)
      m_f[b, t] = 0.5 * lr**2 * vu**2
  return m_h, m_f


def reference_update(mu, nu, hidden, head, actions, adv, mask, k):
  """Mean kept g per vocabulary row, then the Adam moment update."""
  hidden, head = np.asarray(hidden, np.float64), np.asarray(head, np.float64)
  total = np.zeros((V, H))
  count = np.zeros(V)
  for b in range(actions.shape[0]):
    for t in range(actions.shape[1]):
      if not mask[b, t]:
        continue
      ids, _, v = _top_k_set(hidden[b, t], head, int(actions[b, t]), k)
      g = float(adv[b]) * np.outer(v, hidden[b, t])
      for j, row in enumerate(ids):
        total[row] += g[j]
        count[row] += 1
  mu, nu = np.array(mu, np.float64), np.array(nu, np.float64)
  for row in np.flatnonzero(count):
    g_bar = total[row] / count[row]
    mu[row] = B1 * mu[row] + (1 - B1) * g_bar
    nu[row] = B2 * nu[row] + (1 - B2) * g_bar**2
  return mu, nu


def make_inputs(seed=0, batch=B, length=T):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(batch, length, H)).astype(np.float32)
  head = rng.normal(size=(V, H)).astype(np.float32)
  actions = rng.integers(0, V, size=(batch, length))
  # Half the actions are the argmax (inside S); the rest are random ids, most
  # of them outside the top-K.
  argmax = np.argmax(hidden @ head.T, axis=-1)
  actions[:, ::2] = argmax[:, ::2]
  adv = rng.normal(size=batch).astype(np.float32)
  adv[1] = 0.0
  mu = rng.normal(scale=0.1, size=(V, H)).astype(np.float32)
  nu = rng.uniform(0.01, 0.1, size=(V, H)).astype(np.float32)
  mask = rng.uniform(size=(batch, length)) < 0.7
  return hidden, head, actions, adv, mu, nu, mask


@pytest.fixture(scope='module')
def stats_fn():
  return jax.jit(rl.capo_token_stats, static_argnames=('top_k', 'b1', 'b2', 'eps', 'chunk_size'))


@pytest.fixture(scope='module')
def update_fn():
  return jax.jit(
    rl.capo_shadow_update, static_argnames=('top_k', 'b1', 'b2', 'chunk_size', 'axis_name')
  )


# chunk_size 4 -> one position per chunk; 7 -> two (T padded from 5 to 6).
@pytest.mark.parametrize('chunk_size', [4, 7])
@pytest.mark.parametrize('count', [0, 3])
def test_token_stats_match_reference(stats_fn, chunk_size, count):
  hidden, head, actions, adv, mu, nu, _ = make_inputs()
  shadow = rl.CapoShadow(jnp.asarray(mu), jnp.asarray(nu), jnp.asarray(count, jnp.int32))
  # bf16 hidden states: the result must be the fp32 computation on them.
  hidden_bf16 = jnp.asarray(hidden, jnp.bfloat16)
  lr = 0.05
  m_h, m_f = stats_fn(
    hidden_bf16,
    jnp.asarray(head),
    jnp.asarray(actions),
    jnp.asarray(adv),
    shadow,
    lr,
    top_k=K,
    chunk_size=chunk_size,
  )
  assert m_h.dtype == m_f.dtype == jnp.float32 and m_h.shape == (B, T)
  want_h, want_f = reference_stats(
    np.asarray(hidden_bf16, np.float32), head, actions, adv, mu, nu, count, lr, K
  )
  np.testing.assert_allclose(m_h, want_h, rtol=2e-4, atol=1e-9)
  np.testing.assert_allclose(m_f, want_f, rtol=2e-4, atol=1e-9)
  # The fixture covers what it claims: zero advantage -> zero stats, nonzero
  # stats elsewhere, and actions outside the top-K set.
  m_h, m_f = np.asarray(m_h), np.asarray(m_f)
  np.testing.assert_array_equal(m_h[1], 0.0)
  assert np.all(m_f[[0, 2]] > 0)
  outside = [
    a not in np.argsort(-(hidden[b, t] @ head.T))[:K]
    for b in range(B)
    for t in range(T)
    for a in [actions[b, t]]
  ]
  assert 3 <= sum(outside) < B * T


def test_fresh_shadow_step_model_is_the_gradient(stats_fn):
  """At s = 0 the step is d = g: m_H is the 2nd-order change of A * ratio.

  Taking the step W[S] += lr * g on the head changes the token's ratio
  pi'(a) / pi(a) (softmax over S); A * (ratio - 1) must match m_H to O(lr^3).
  """
  hidden, head, actions, adv, _, _, _ = make_inputs(seed=1)
  shadow = rl.capo_shadow_init(V, H)
  lr = 1e-3
  m_h, _ = stats_fn(
    jnp.asarray(hidden),
    jnp.asarray(head),
    jnp.asarray(actions),
    jnp.asarray(adv),
    shadow,
    lr,
    top_k=K,
    chunk_size=4,
  )
  h64, w64 = hidden.astype(np.float64), head.astype(np.float64)
  for b in (0, 2):
    for t in range(T):
      a = int(actions[b, t])
      ids, pi, v = _top_k_set(h64[b, t], w64, a, K)
      w_new = w64.copy()
      w_new[ids] += lr * adv[b] * np.outer(v, h64[b, t])
      z = w_new[ids] @ h64[b, t]
      pi_new = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
      pos = int(np.flatnonzero(ids == a)[0])
      actual = adv[b] * (pi_new[pos] / pi[pos] - 1)
      np.testing.assert_allclose(m_h[b, t], actual, rtol=2e-3)


@pytest.mark.parametrize('chunk_size', [4, 7])
def test_shadow_update_matches_reference(update_fn, chunk_size):
  hidden, head, actions, adv, mu, nu, mask = make_inputs(seed=2)
  shadow = rl.CapoShadow(jnp.asarray(mu), jnp.asarray(nu), jnp.asarray(3, jnp.int32))
  new = update_fn(
    shadow,
    jnp.asarray(hidden),
    jnp.asarray(head),
    jnp.asarray(actions),
    jnp.asarray(adv),
    jnp.asarray(mask),
    top_k=K,
    chunk_size=chunk_size,
  )
  want_mu, want_nu = reference_update(mu, nu, hidden, head, actions, adv, mask, K)
  assert int(new.count) == 4
  assert new.mu.dtype == new.nu.dtype == jnp.float32
  np.testing.assert_allclose(new.mu, want_mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new.nu, want_nu, rtol=1e-5, atol=1e-8)
  # Some rows occurred (changed) and some did not (unchanged).
  changed = np.any(want_mu != mu, axis=1)
  assert 0 < changed.sum() < V
  np.testing.assert_array_equal(np.asarray(new.mu)[~changed], mu[~changed])


def test_shadow_init_then_update_then_stats_uses_adam(update_fn, stats_fn):
  hidden, head, actions, adv, _, _, mask = make_inputs(seed=3)
  shadow = rl.capo_shadow_init(V, H)
  assert shadow.mu.shape == (V, H) and int(shadow.count) == 0
  args = (jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(actions), jnp.asarray(adv))
  shadow = update_fn(shadow, *args, jnp.asarray(mask), top_k=K, chunk_size=4)
  zeros = np.zeros((V, H), np.float32)
  want_mu, want_nu = reference_update(zeros, zeros, hidden, head, actions, adv, mask, K)
  np.testing.assert_allclose(shadow.mu, want_mu, rtol=1e-5, atol=1e-8)
  m_h, m_f = stats_fn(*args, shadow, 0.01, top_k=K, chunk_size=4)
  ref_h, ref_f = reference_stats(hidden, head, actions, adv, want_mu, want_nu, 1, 0.01, K)
  np.testing.assert_allclose(m_h, ref_h, rtol=2e-4, atol=1e-9)
  np.testing.assert_allclose(m_f, ref_f, rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize('chunk_size', [4, 7])
def test_token_set_matches_reference(chunk_size):
  hidden, head, actions, *_ = make_inputs(seed=5)
  got = jax.jit(rl.capo_token_set, static_argnames=('top_k', 'chunk_size'))(
    jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(actions), top_k=K, chunk_size=chunk_size
  )
  assert got.dtype == jnp.int32 and got.shape == (B, T, K)
  want = [
    [_top_k_set(hidden[b, t], head, int(actions[b, t]), K)[0] for t in range(T)] for b in range(B)
  ]
  np.testing.assert_array_equal(got, want)


def test_shared_token_set_gives_the_same_stats_and_update(stats_fn, update_fn):
  hidden, head, actions, adv, mu, nu, mask = make_inputs(seed=6)
  shadow = rl.CapoShadow(jnp.asarray(mu), jnp.asarray(nu), jnp.asarray(2, jnp.int32))
  args = tuple(map(jnp.asarray, (hidden, head, actions, adv)))
  token_set = rl.capo_token_set(*args[:3], top_k=K, chunk_size=4)
  for given in (None, token_set):
    stats = stats_fn(*args, shadow, 0.05, top_k=K, chunk_size=4, token_set=given)
    new = update_fn(shadow, *args, jnp.asarray(mask), top_k=K, chunk_size=4, token_set=given)
    if given is None:
      want_stats, want_new = stats, new
  for g, w in zip(jax.tree.leaves((stats, new)), jax.tree.leaves((want_stats, want_new))):
    np.testing.assert_array_equal(g, w)
  assert np.any(np.asarray(want_stats[0]) != 0)


def test_mask_thresholds():
  m_h = jnp.asarray([0.0, 0.005, -0.005, 0.02, -0.02, 0.005, np.nan, -0.0])
  m_f = jnp.asarray([0.0, 5e-5, 5e-5, 0.0, 0.0, 2e-4, 0.0, 0.0])
  sym = rl.capo_mask(m_h, m_f, tau_H=0.01, tau_F=1e-4)
  np.testing.assert_array_equal(sym, [1, 1, 1, 0, 0, 0, 0, 1])
  one_sided = rl.capo_mask(m_h, m_f, tau_H=0.01, tau_F=1e-4, symmetric=False)
  np.testing.assert_array_equal(one_sided, [1, 1, 0, 0, 0, 0, 0, 1])
  with pytest.raises(ValueError, match='tau_H and tau_F must be > 0'):
    rl.capo_mask(m_h, m_f, tau_H=0.0)
  with pytest.raises(ValueError, match='same shape'):
    rl.capo_mask(m_h, m_f[:3])


def test_metrics():
  m_h = jnp.asarray([[0.1, -0.2, 0.3], [0.0, 5.0, 9.0]])
  m_f = jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, 9.0]])
  keep = jnp.asarray([[1, 0, 1], [1, 1, 0]], bool)
  mask = jnp.asarray([[1, 1, 1], [1, 1, 0]])
  out = rl.capo_metrics(m_h, m_f, keep, mask, quantiles=(0.0, 0.5, 1.0))
  np.testing.assert_allclose(out['capo/masked_frac'], 0.2)
  np.testing.assert_allclose(out['capo/m_H_q0'], -0.2)
  np.testing.assert_allclose(out['capo/m_H_q1'], 5.0)
  np.testing.assert_allclose(out['capo/abs_m_H_q0.5'], 0.2)
  np.testing.assert_allclose(out['capo/m_F_q1'], 3.0)


def _reference_signed_metrics(m_h, m_f, keep, mask, adv, levels):
  """The sign-split summaries with numpy, token by token."""
  out = {}
  valid = mask != 0
  tokens = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if valid[b, t]]
  masked = [bt for bt in tokens if not keep[bt]]
  out['capo/masked_frac'] = len(masked) / len(tokens)
  groups = {'nz': lambda a: a != 0, 'pos': lambda a: a > 0, 'neg': lambda a: a < 0}
  for name, member in groups.items():
    group = [bt for bt in tokens if member(adv[bt[0]])]
    out[f'capo/{name}/tokens'] = len(group)
    out[f'capo/{name}/masked_frac'] = (
      sum(not keep[bt] for bt in group) / len(group) if group else np.nan
    )
    for stat_name, stat in (('abs_m_H', np.abs(m_h)), ('m_F', m_f)):
      values = np.sort([stat[bt] for bt in group])
      for level in levels:
        out[f'capo/{name}/{stat_name}_q{level:g}'] = (
          np.interp(level * (len(values) - 1), np.arange(len(values)), values) if group else np.nan
        )
  masked_nz = [bt for bt in masked if adv[bt[0]] != 0]
  out['capo/masked_pos_share'] = (
    sum(adv[bt[0]] > 0 for bt in masked_nz) / len(masked_nz) if masked_nz else np.nan
  )
  return out


@pytest.mark.parametrize('seed, zero_neg', [(0, False), (1, False), (2, True)])
def test_sign_split_metrics_match_reference(seed, zero_neg):
  rng = np.random.default_rng(seed)
  m_h = rng.normal(size=(6, 7)).astype(np.float32)
  m_f = rng.exponential(size=(6, 7)).astype(np.float32)
  keep = rng.uniform(size=(6, 7)) < 0.7
  mask = rng.uniform(size=(6, 7)) < 0.8
  adv = rng.normal(size=6).astype(np.float32)
  adv[0], adv[1], adv[2] = 0.0, -abs(adv[1]), abs(adv[2])
  mask[1:3, 0] = True  # both signs have a valid token
  if zero_neg:  # an empty group: its shares and quantiles are NaN
    adv = np.abs(adv)
  levels = (0.0, 0.5, 0.9, 1.0)
  got = jax.jit(lambda *a: rl.capo_metrics(*a[:4], advantages=a[4], quantiles=levels))(
    m_h, m_f, keep, mask, adv
  )
  want = _reference_signed_metrics(m_h, m_f, keep, mask, adv, levels)
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(float(got[name]), value, rtol=1e-5, err_msg=name)
  assert np.isnan(float(got['capo/neg/masked_frac'])) == zero_neg
  shares = rl.masked_shares(keep, mask, adv)
  assert set(shares) == {n for n in want if '_q' not in n}
  for name, value in shares.items():
    np.testing.assert_allclose(float(value), want[name], rtol=1e-6, err_msg=name)


def test_sign_split_metrics_on_8_devices(mesh8):
  rng = np.random.default_rng(3)
  args = (
    rng.normal(size=(8, 5)).astype(np.float32),
    rng.exponential(size=(8, 5)).astype(np.float32),
    rng.uniform(size=(8, 5)) < 0.7,
    rng.uniform(size=(8, 5)) < 0.8,
    rng.normal(size=8).astype(np.float32),
  )
  fn = jax.jit(lambda *a: rl.capo_metrics(*a[:4], advantages=a[4]))
  want = fn(*args)
  data = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec('data'))
  got = fn(*(jax.device_put(x, data) for x in args))
  for name in want:
    np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-6, err_msg=name)


def test_calibrated_thresholds_are_percentiles_over_nonzero_advantages():
  rng = np.random.default_rng(0)
  m_h = rng.normal(size=(50, 40))
  m_f = rng.exponential(size=(50, 40))
  adv = np.repeat(rng.normal(size=(50, 1)), 40, axis=1)
  adv[:10] = 0.0
  mask = rng.uniform(size=(50, 40)) < 0.9
  # Huge stats on A = 0 or invalid tokens must not move the thresholds.
  m_h[:10] = 1e9
  m_f[~mask] = 1e9
  out = rl.capo_thresholds(m_h, m_f, adv, mask=mask, percentile_H=97.5, percentile_F=99.0)
  members = mask & (adv != 0)
  abs_h, f = np.sort(np.abs(m_h[members])), np.sort(m_f[members])
  n = members.sum()
  assert out.tokens == n
  assert np.mean(abs_h < out.tau_H) == pytest.approx(0.975, abs=1.5 / n)
  assert np.mean(f < out.tau_F) == pytest.approx(0.99, abs=1.5 / n)
  assert out.masked_share == pytest.approx(
    np.mean(~((np.abs(m_h[members]) < out.tau_H) & (m_f[members] < out.tau_F)))
  )
  assert 0.025 <= out.masked_share <= 0.035 + 1.5 / n  # the union of the two tails
  keep = rl.capo_mask(m_h, m_f, tau_H=out.tau_H, tau_F=out.tau_F)
  assert np.mean(~np.asarray(keep)[members]) == pytest.approx(out.masked_share)
  with pytest.raises(ValueError, match='no valid token with a nonzero advantage'):
    rl.capo_thresholds(m_h, m_f, np.zeros_like(adv), percentile_H=90, percentile_F=90)
  with pytest.raises(ValueError, match=r'percentile_F must be in \(0, 100\], got 0'):
    rl.capo_thresholds(m_h, m_f, adv, percentile_H=90, percentile_F=0)


@pytest.mark.parametrize(
  'call, error',
  [
    (lambda x: x.update(hidden=np.zeros((B, T))), r'hidden must be \[B, T, H\]'),
    (lambda x: x.update(head=np.zeros((H, V))), r'head must be \[V, H\]'),
    (lambda x: x.update(actions=np.zeros((B, T))), 'actions must be integer'),
    (lambda x: x.update(advantages=np.zeros(B + 1)), r'advantages must be \[B\]'),
    (lambda x: x.update(top_k=V + 1), rf'top_k must be in \[1, vocab={V}\]'),
    (lambda x: x.update(chunk_size=0), 'chunk_size must be >= 1, got 0'),
    (lambda x: x.update(shadow=rl.capo_shadow_init(V + 1, H)), r'shadow.mu has shape \(41, 8\)'),
    (
      lambda x: x.update(token_set=np.zeros((B, T, K + 1), np.int32)),
      r'token_set must be \[B, T, top_k\] = \(3, 5, 6\)',
    ),
    (lambda x: x.update(token_set=np.zeros((B, T, K))), 'token_set must be integer ids'),
  ],
)
def test_bad_inputs(call, error):
  hidden, head, actions, adv, _, _, _ = make_inputs()
  kwargs = dict(
    hidden=hidden,
    head=head,
    actions=actions,
    advantages=adv,
    shadow=rl.capo_shadow_init(V, H),
    lr=0.1,
    top_k=K,
  )
  call(kwargs)
  with pytest.raises((ValueError, TypeError), match=error):
    rl.capo_token_stats(**kwargs)


def test_peak_memory_never_holds_the_full_token_tensor():
  """Compiled temp memory stays far below one [B, T, K, H] float32 tensor."""
  batch, length, width, vocab, k = 4, 512, 128, 256, 50
  full_bytes = batch * length * k * width * 4  # 52 MB
  shapes = (
    jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
    jax.ShapeDtypeStruct((vocab, width), jnp.float32),
    jax.ShapeDtypeStruct((batch, length), jnp.int32),
    jax.ShapeDtypeStruct((batch,), jnp.float32),
  )
  shadow = jax.eval_shape(lambda: rl.capo_shadow_init(vocab, width))
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)

  def stats(h, w, a, adv, s):
    return rl.capo_token_stats(h, w, a, adv, s, 1e-3, top_k=k, chunk_size=64)

  def update(h, w, a, adv, s, m):
    return rl.capo_shadow_update(s, h, w, a, adv, m, top_k=k, chunk_size=64)

  for fn, args in ((stats, shapes + (shadow,)), (update, shapes + (shadow, mask))):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    assert analysis.temp_size_in_bytes < full_bytes / 8, (
      fn.__name__,
      analysis.temp_size_in_bytes,
      full_bytes,
    )


@pytest.mark.parametrize('shared_set', [False, True])
def test_sharded_stats_mask_and_update_match_unsharded(mesh8, shared_set):
  """Batch over 'data', head and shadow rows over 'fsdp': same numbers."""
  hidden, head, actions, adv, mu, nu, mask = make_inputs(seed=4, batch=4)
  shadow = rl.CapoShadow(jnp.asarray(mu), jnp.asarray(nu), jnp.asarray(2, jnp.int32))
  args = tuple(map(jnp.asarray, (hidden, head, actions, adv)))

  def stats_mask_update(h, w, a, adv, s, m):
    token_set = rl.capo_token_set(h, w, a, top_k=K, chunk_size=8) if shared_set else None
    m_h, m_f = rl.capo_token_stats(
      h, w, a, adv, s, 0.05, top_k=K, chunk_size=8, token_set=token_set
    )
    keep = rl.capo_mask(m_h, m_f, tau_H=0.05, tau_F=1e-3) & m
    return (
      m_h,
      m_f,
      keep,
      rl.capo_shadow_update(s, h, w, a, adv, keep, top_k=K, chunk_size=8, token_set=token_set),
    )

  fn = jax.jit(stats_mask_update)
  want = fn(*args, shadow, jnp.asarray(mask))
  keep = np.asarray(want[2])
  assert 0 < keep.sum() < mask.sum()  # the thresholds mask some tokens

  spec = jax.sharding.PartitionSpec

  def named(*s):
    return jax.sharding.NamedSharding(mesh8, spec(*s))

  put = jax.device_put
  sharded_args = (
    put(hidden, named('data')),
    put(head, named('fsdp')),
    put(actions, named('data')),
    put(adv, named('data')),
  )
  sharded_shadow = rl.CapoShadow(
    put(mu, named('fsdp')), put(nu, named('fsdp')), put(shadow.count, named())
  )
  got = fn(*sharded_args, sharded_shadow, put(mask, named('data')))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9)

  # Inside shard_map each device sees its batch shard; axis_name sums the
  # shadow statistics over the data axis.
  def local_update(s, h, w, a, adv, m):
    return rl.capo_shadow_update(s, h, w, a, adv, m, top_k=K, chunk_size=8, axis_name='data')

  mapped = jax.jit(
    jax.shard_map(
      local_update,
      mesh=mesh8,
      in_specs=(spec(), spec('data'), spec(), spec('data'), spec('data'), spec('data')),
      out_specs=spec(),
    )
  )
  got = mapped(shadow, sharded_args[0], args[1], *sharded_args[2:], put(keep, named('data')))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want[3])):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9)
