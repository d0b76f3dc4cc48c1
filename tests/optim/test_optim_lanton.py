"""LANTON against a numpy loop of the paper's algorithm; options and stats."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt import optim

B1, B2, WD, EPS = 0.9, 0.5, 0.05, 1e-12
_SVD = optim.NewtonSchulz(polar='svd')  # exact polar factors and nuclear norms
_GROUP = {
  'embed/embedding': 'embed_head',
  'layers_0/up/kernel': 'hidden',
  'layers_0/down/kernel': 'hidden',
  'layers_0/q/kernel': 'hidden',
  'norm/scale': 'vector',
}
_SHAPES = {
  'embed/embedding': (6, 4),
  'layers_0/up/kernel': (4, 8),
  'layers_0/down/kernel': (8, 4),
  'layers_0/q/kernel': (4, 2, 2),
  'norm/scale': (4,),
}


def _tree(flat):
  out = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _flat(tree):
  return {
    jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _per_leaf(state, field):
  """A state's per-leaf vector as {leaf path: value}, in its momentum's leaf order."""
  values = np.asarray(getattr(state, field))
  chex.assert_shape(values, (len(_flat(state.momentum)),))
  return {p: values[i].item() for i, p in enumerate(_flat(state.momentum))}


def _random(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return _tree(
    {p: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for p, s in _SHAPES.items()}
  )


def _as_matrix(x):
  return x.reshape(x.shape[0], -1)  # q [4, 2, 2] -> [4, 4] (default view)


def _polar(m):
  u, _, vh = np.linalg.svd(m, full_matrices=False)
  return u @ vh


def _direction(group, b):
  if group == 'hidden':
    m = _as_matrix(b)
    return (-np.sqrt(m.shape[1] / m.shape[0]) * _polar(m)).reshape(b.shape)
  if group == 'embed_head':
    return -np.sign(b)
  return -b / np.sqrt(np.mean(b**2))


def _dual(group, d):
  if group == 'hidden':
    m = _as_matrix(d)
    return np.sqrt(m.shape[1] / m.shape[0]) * np.linalg.svd(m, compute_uv=False).sum()
  if group == 'embed_head':
    return np.abs(d).sum()
  return np.sqrt(d.size) * np.linalg.norm(d)


def _reference(params, grads_seq, tilde_seq=None):
  """The algorithm of arXiv 2510.14009, one leaf at a time (float64)."""
  x = {p: v.astype(np.float64) for p, v in _flat(params).items()}
  b = {p: 0.0 for p in x}
  h = {p: 0.0 for p in x}
  n = {p: 0 for p in x}
  prev = None
  history = []
  for t, grads in enumerate(grads_seq):
    g = {p: v.astype(np.float64) for p, v in _flat(grads).items()}
    tilde = (
      prev
      if tilde_seq is None
      else {p: v.astype(np.float64) for p, v in _flat(tilde_seq[t]).items()}
    )
    for p in x:
      b[p] = B1 * b[p] + (1 - B1) * g[p]
      if tilde is not None:
        h[p] = B2 * h[p] + (1 - B2) * _dual(_GROUP[p], g[p] - tilde[p]) ** 2
        n[p] += 1
    prev = g
    scale = {}
    for group in set(_GROUP.values()):
      members = [p for p in x if _GROUP[p] == group]
      if all(n[p] > 0 for p in members):
        h_hat = {p: h[p] / (1 - B2 ** n[p]) for p in members}
        low = min(h_hat.values())
        scale.update({p: np.sqrt((low + EPS) / (h_hat[p] + EPS)) for p in members})
      else:
        scale.update({p: 1.0 for p in members})
    updates = {p: scale[p] * (-_direction(_GROUP[p], b[p]) + WD * x[p]) for p in x}
    history.append((updates, dict(h), dict(n), scale))
  return history


def _core(**kw):
  return optim.scale_by_lanton(
    b1=B1, b2=B2, weight_decay=WD, newton_schulz=_SVD, mapping=optim.min_ratio(eps=EPS), **kw
  )


def _check_step(ours, state, expected):
  updates, h, n, scale = expected
  got = _flat(ours)
  for p in _SHAPES:
    np.testing.assert_allclose(got[p], updates[p], rtol=2e-4, atol=1e-6, err_msg=p)
  np.testing.assert_allclose(
    [_per_leaf(state, 'noise')[p] for p in _SHAPES], [h[p] for p in _SHAPES], rtol=1e-4
  )
  assert [int(_per_leaf(state, 'noise_count')[p]) for p in _SHAPES] == [n[p] for p in _SHAPES]
  np.testing.assert_allclose(
    [_per_leaf(state, 'lr_scale')[p] for p in _SHAPES], [scale[p] for p in _SHAPES], rtol=1e-4
  )


@pytest.mark.parametrize('noise_ns_steps', [None, 3])
def test_matches_numpy_reference_previous_gradient(noise_ns_steps):
  # noise_ns_steps=3 takes the separate noise path; with exact SVD polars the
  # nuclear norms are exact either way, so both must match the reference.
  params = _random(0)
  grads_seq = [_random(10 + t, scale=1.0 + t) for t in range(4)]
  tx = _core(noise_ns_steps=noise_ns_steps)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads, expected in zip(grads_seq, _reference(params, grads_seq)):
    ours, state = update(grads, state, params)
    _check_step(ours, state, expected)
  assert int(state.count) == 4
  # Groups are reduced separately: the lone embed_head leaf always gets 1
  # and the least noisy hidden leaf gets 1.
  scales = _per_leaf(state, 'lr_scale')
  assert scales['embed/embedding'] == pytest.approx(1.0)
  hidden = [scales[p] for p in _SHAPES if _GROUP[p] == 'hidden']
  assert max(hidden) == pytest.approx(1.0) and min(hidden) < 0.99


def test_matches_numpy_reference_independent_noise():
  params = _random(1)
  grads_seq = [_random(20 + t) for t in range(2)]
  tilde_seq = [_random(30 + t) for t in range(2)]
  tx = _core(noise='independent')
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected = _reference(params, grads_seq, tilde_seq)
  for grads, tilde, exp in zip(grads_seq, tilde_seq, expected):
    ours, state = update(grads, state, params, noise_grads=tilde)
    _check_step(ours, state, exp)
  assert state.prev_grad == ()  # no previous-gradient buffer
  with pytest.raises(ValueError, match='noise_grads'):
    tx.update(grads_seq[0], state, params)
  with pytest.raises(ValueError, match="noise='previous'"):
    _core().update(grads_seq[0], _core().init(params), params, noise_grads=tilde_seq[0])


def test_mappings_against_formulas():
  h = jnp.array([4.0, 1.0, 16.0, 0.0004])
  np.testing.assert_allclose(
    np.asarray(optim.min_ratio(eps=0.0)(h)), np.sqrt(0.0004 / np.asarray(h)), rtol=1e-5
  )
  s = np.asarray(optim.min_ratio()(h))
  assert s[3] == pytest.approx(1.0) and np.all(s <= 1.0)  # least noisy: 1
  mean = float(np.mean(np.asarray(h)))
  np.testing.assert_allclose(
    np.asarray(optim.mean_ratio(eps=0.0, s_min=0.3, s_max=2.0)(h)),
    np.clip(np.sqrt(mean / np.asarray(h)), 0.3, 2.0),
    rtol=1e-5,
  )
  with pytest.raises(ValueError, match='s_min'):
    optim.mean_ratio(s_min=2.0, s_max=1.0)
  with pytest.raises(ValueError, match="'max_ratio'"):
    optim.scale_by_lanton(mapping='max_ratio')


def test_user_mapping_is_called_per_group_and_checked():
  params = _random(2)
  seen = []

  def half(h):
    seen.append(h.shape)
    return jnp.full_like(h, 0.5)

  tx = optim.scale_by_lanton(mapping=half, newton_schulz=_SVD)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(2):
    _, state = update(_random(40 + t), state, params)
  assert sorted(set(seen)) == [(1,), (3,)]  # embed_head+vector, hidden
  assert set(_per_leaf(state, 'lr_scale').values()) == {0.5}
  bad = optim.scale_by_lanton(mapping=lambda h: h[:1])
  with pytest.raises(ValueError, match='one scale per leaf'):
    jax.jit(bad.update)(_random(3), bad.init(params), params)


def _with_entry(tree, path, value):
  flat = {p: np.array(x) for p, x in _flat(tree).items()}
  flat[path].reshape(-1)[1] = value
  return _tree({p: jnp.asarray(x) for p, x in flat.items()})


# One bad entry at a time, so that each kind of value is caught on its own;
# with noise='independent' the bad entry is in noise_grads.
@pytest.mark.parametrize(
  'noise, path, value',
  [
    ('previous', 'layers_0/up/kernel', np.inf),
    ('previous', 'norm/scale', np.nan),
    ('previous', 'embed/embedding', -np.inf),
    ('independent', 'layers_0/q/kernel', np.nan),
    ('independent', 'norm/scale', np.inf),
  ],
)
def test_non_finite_gradients_leave_state_untouched(noise, path, value):
  params = _random(4)
  tx = _core(noise=noise)
  update = jax.jit(tx.update)
  extra = lambda seed: (  # noqa: E731
    {'noise_grads': _random(seed + 100)} if noise == 'independent' else {}
  )
  state = tx.init(params)
  for t in range(2):
    _, state = update(_random(50 + t), state, params, **extra(50 + t))
  if noise == 'independent':
    grads, kwargs = _random(52), {'noise_grads': _with_entry(_random(152), path, value)}
  else:
    grads, kwargs = _with_entry(_random(52), path, value), {}
  updates, after = update(grads, state, params, **kwargs)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
  chex.assert_trees_all_equal(after, state)
  updates, after = update(_random(53), after, params, **extra(53))
  chex.assert_tree_all_finite(after)
  assert int(after.count) == 3


def test_noise_every_round_robin_buckets():
  # Six same-shape hidden matrices, two buckets: each step samples three.
  # SVD polars make the nuclear norms exact, so H can be checked in numpy.
  params = {f'layers_{i}': {'kernel': jnp.ones((4, 6))} for i in range(6)}
  tx = optim.scale_by_lanton(noise_every=2, newton_schulz=_SVD)
  state = tx.init(params)
  update = jax.jit(tx.update)
  counts, grads_seq = [], []
  for t in range(4):
    grads = jax.tree.map(
      lambda x, t=t: jnp.asarray(np.random.default_rng(t).standard_normal(x.shape), jnp.float32),
      params,
    )
    grads_seq.append(_flat(grads))
    _, state = update(grads, state, params)
    counts.append(sorted(int(v) for v in _per_leaf(state, 'noise_count').values()))
    if t < 2:  # not every leaf has a sample yet: scales stay 1
      assert set(_per_leaf(state, 'lr_scale').values()) == {1.0}
    if t == 1:  # the leaves sampled now took their first sample, G_1 - G_0
      sampled = [p for p, c in _per_leaf(state, 'noise_count').items() if c == 1]
      assert len(sampled) == 3
      h = _per_leaf(state, 'noise')
      for p in sampled:
        d = np.asarray(grads_seq[1][p], np.float64) - np.asarray(grads_seq[0][p])
        assert h[p] == pytest.approx((1 - 0.95) * _dual('hidden', d) ** 2, rel=1e-4)
  assert counts == [[0] * 6, [0, 0, 0, 1, 1, 1], [1] * 6, [1, 1, 1, 2, 2, 2]]
  assert min(_per_leaf(state, 'lr_scale').values()) < 1.0


def test_lanton_stats_through_wrappers():
  params = _random(5)
  opt = optax.MultiSteps(
    optax.inject_hyperparams(optim.lanton)(learning_rate=optax.linear_schedule(0.1, 0.0, 10)),
    every_k_schedule=1,
  )
  state = opt.init(params)
  update = jax.jit(opt.update)
  for t in range(3):
    _, state = update(_random(60 + t), state, params)
  stats = jax.jit(optim.lanton_stats)(state)
  # AdamW takes the vector leaf; LANTON adapts the rest.
  assert set(stats['h']) == set(stats['lr_scale']) == {p for p in _SHAPES if _GROUP[p] != 'vector'}
  assert all(float(v) > 0 for v in stats['h'].values())
  assert all(0.1 <= float(v) <= 3.0 for v in stats['lr_scale'].values())  # mean_ratio's clip
  with pytest.raises(ValueError, match='no ScaleByLantonState'):
    optim.lanton_stats(optax.adam(0.1).init(params))


@pytest.mark.parametrize(
  'bad, match',
  [
    (dict(noise='other'), "'other'"),
    (dict(noise_every=0), 'noise_every'),
    (dict(group_lmos={'hiden': 'sign'}), 'hiden'),
    (dict(group_lr_scales={'hiden': 1.0}), 'hiden'),
    (dict(group_lmos={'hidden': 'nope'}), "'nope'"),
  ],
)
def test_bad_options_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    optim.scale_by_lanton(**bad)


@pytest.mark.parametrize(
  'bad, match',
  [
    (dict(vector='rms'), "unknown vector option 'rms'"),
    # On AdamW the vector leaves never reach LANTON: their scale would be ignored silently.
    (dict(group_lr_scales={'vector': 0.2}), r"group_lr_scales\['vector'\].*bias_rms"),
  ],
)
def test_bad_lanton_options_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    optim.lanton(0.1, **bad)


def test_group_lr_scales_and_lmo_choice():
  params = _random(6)
  grads = _random(7)
  base = optim.scale_by_lanton(newton_schulz=_SVD)
  scaled = optim.scale_by_lanton(
    newton_schulz=_SVD, group_lr_scales={'embed_head': 0.1}, group_lmos={'vector': 'sign'}
  )
  u0, _ = jax.jit(base.update)(grads, base.init(params), params)
  u1, _ = jax.jit(scaled.update)(grads, scaled.init(params), params)
  np.testing.assert_allclose(
    np.asarray(u1['embed']['embedding']), 0.1 * np.asarray(u0['embed']['embedding'])
  )
  # sign LMO on the vector: the update is sign(momentum) (first step: of G).
  np.testing.assert_allclose(
    np.asarray(u1['norm']['scale']), np.sign(np.asarray(grads['norm']['scale']))
  )


def test_independent_noise_through_lanton_partition_and_chain():
  params = _random(8)
  opt = optax.chain(
    optax.clip_by_global_norm(1e3), optim.lanton(0.1, noise='independent', newton_schulz=_SVD)
  )
  state = opt.init(params)
  update = jax.jit(opt.update)
  for t in range(2):
    grads, tilde = _random(70 + t), _random(80 + t)
    _, state = update(grads, state, params, noise_grads=tilde)
  stats = optim.lanton_stats(state)
  # Sampled on both steps: H = (1 - b2) (b2 x1 + x2) > 0 for every leaf.
  assert all(float(v) > 0 for v in stats['h'].values())
  core = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optim.ScaleByLantonState))
    if isinstance(s, optim.ScaleByLantonState)
  ][0]
  assert set(int(v) for v in _per_leaf(core, 'noise_count').values()) == {2}
