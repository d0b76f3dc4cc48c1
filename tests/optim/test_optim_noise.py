"""Noise mappings against numpy, `noise_adaptive` against a numpy loop and against its inner
transformation, the scale-free variant, clip telemetry, and clipping of noise_grads."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt import optim

B1, B2, EPS, LR = 0.9, 0.5, 1e-12, 0.1
_SVD = optim.NewtonSchulz(polar='svd')  # exact nuclear norms
_GROUP = {
  'embed/embedding': 'embed_head',
  'head/kernel': 'embed_head',
  'layers_0/up/kernel': 'hidden',
  'layers_0/down/kernel': 'hidden',
  'layers_0/q/kernel': 'hidden',
  'norm/scale': 'vector',
}
_SHAPES = {
  'embed/embedding': (6, 4),
  'head/kernel': (4, 6),
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


def _random(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return _tree(
    {p: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for p, s in _SHAPES.items()}
  )


def _dual(group, d):
  if group == 'hidden':
    m = d.reshape(d.shape[0], -1)
    return np.sqrt(m.shape[1] / m.shape[0]) * np.linalg.svd(m, compute_uv=False).sum()
  return np.abs(d).sum()  # embed_head: entrywise l1


# ---- mappings ------------------------------------------------------------------------------

_H = np.array([4.0, 1.0, 16.0, 0.0004, 2.5])


def _np_min(h, p):
  return ((h.min() + EPS) / (h + EPS)) ** p


def _np_mean(h, p, normaliser, lo, hi):
  if normaliser == 'arithmetic':
    n = h.mean() + EPS
  else:
    n = np.exp(np.mean(np.log(h + EPS)))
  return np.clip((n / (h + EPS)) ** p, lo, hi)


# name -> (mapping, numpy reference, (s_min, s_max) or None)
_MAPPINGS = {
  'min_ratio': (optim.min_ratio(eps=EPS), lambda h: _np_min(h, 0.5), None),
  'min_ratio_p4': (optim.min_ratio(exponent=0.25, eps=EPS), lambda h: _np_min(h, 0.25), None),
  'mean_arith': (
    optim.mean_ratio(eps=EPS, s_min=0.3, s_max=2.0),
    lambda h: _np_mean(h, 0.5, 'arithmetic', 0.3, 2.0),
    (0.3, 2.0),
  ),
  'mean_arith_p4': (
    optim.mean_ratio(exponent=0.25, eps=EPS, s_min=0.5, s_max=1.5),
    lambda h: _np_mean(h, 0.25, 'arithmetic', 0.5, 1.5),
    (0.5, 1.5),
  ),
  'mean_geo': (
    optim.mean_ratio(normaliser='geometric', eps=EPS, s_min=0.3, s_max=2.0),
    lambda h: _np_mean(h, 0.5, 'geometric', 0.3, 2.0),
    (0.3, 2.0),
  ),
  'mean_geo_p4': (
    optim.mean_ratio(exponent=0.25, normaliser='geometric', eps=EPS, s_min=0.1, s_max=3.0),
    lambda h: _np_mean(h, 0.25, 'geometric', 0.1, 3.0),
    (0.1, 3.0),
  ),
  'ones': (optim.ones(), np.ones_like, None),
}


@pytest.mark.parametrize('name', sorted(_MAPPINGS))
def test_mapping_matches_numpy(name):
  mapping, reference, bounds = _MAPPINGS[name]
  got = np.asarray(jax.jit(mapping)(jnp.asarray(_H, jnp.float32)))
  np.testing.assert_allclose(got, reference(_H), rtol=2e-5)
  assert getattr(mapping, 'bounds', None) == bounds


def test_default_mappings_are_the_historical_formulas_bit_for_bit():
  h = jnp.asarray(_H, jnp.float32)
  eps = 1e-12
  chex.assert_trees_all_equal(optim.min_ratio()(h), jnp.sqrt((jnp.min(h) + eps) / (h + eps)))
  chex.assert_trees_all_equal(
    optim.mean_ratio()(h), jnp.clip(jnp.sqrt((jnp.mean(h) + eps) / (h + eps)), 0.1, 3.0)
  )
  assert 'ones' in optim.MAPPING_NAMES


@pytest.mark.parametrize(
  'make, match',
  [
    (lambda: optim.min_ratio(exponent=0.0), 'exponent.*0.0'),
    (lambda: optim.mean_ratio(exponent=-1), 'exponent.*-1'),
    (lambda: optim.mean_ratio(exponent=True), 'exponent.*True'),
    (lambda: optim.mean_ratio(normaliser='harmonic'), "'harmonic'.*arithmetic.*geometric"),
    (lambda: optim.mean_ratio(s_min=2.0, s_max=1.0), 's_min'),
    (lambda: optim.scale_by_lanton(mapping='max_ratio'), "'max_ratio'.*ones"),
    (lambda: optim.noise_adaptive(optax.sgd(1.0), mapping='nope'), "'nope'.*min_ratio"),
    (lambda: optim.noise_adaptive(optax.sgd(1.0), mapping='ones', noise='x'), "'x'"),
    (
      lambda: optim.noise_adaptive(optax.sgd(1.0), mapping='ones', dual_norm={'hiden': 'sign'}),
      'hiden',
    ),
    (lambda: optim.noise_adaptive(optax.sgd(1.0), mapping='ones', noise_every=0), 'noise_every'),
    (lambda: optim.clip_by_global_norm(0.0), 'max_norm.*0.0'),
  ],
)
def test_bad_options_raise_naming_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_types_raise():
  with pytest.raises(TypeError, match='inner'):
    optim.noise_adaptive('sgd', mapping='ones')
  with pytest.raises(TypeError, match='dual_norm'):
    optim.noise_adaptive(optax.sgd(1.0), mapping='ones', dual_norm=3)


# ---- noise_adaptive against numpy -----------------------------------------------------------


def _reference(grads_seq, inner_seq, *, mapping, relative=False):
  """noise_adaptive's factors times the inner updates, one leaf at a time (float64)."""
  adapted = [p for p in _SHAPES if _GROUP[p] != 'vector']
  h = {p: 0.0 for p in adapted}
  n = {p: 0 for p in adapted}
  m = {p: 0.0 for p in adapted}
  prev, out = None, []
  for grads, inner in zip(grads_seq, inner_seq):
    g = {p: v.astype(np.float64) for p, v in _flat(grads).items()}
    for p in adapted:
      m[p] = B1 * m[p] + (1 - B1) * g[p]
      if prev is not None:
        h[p] = B2 * h[p] + (1 - B2) * _dual(_GROUP[p], g[p] - prev[p]) ** 2
        n[p] += 1
    prev = g
    scale = {p: 1.0 for p in _SHAPES}
    for group in ('hidden', 'embed_head'):
      members = [p for p in adapted if _GROUP[p] == group]
      if all(n[p] > 0 for p in members):
        x = np.array([h[p] / (1 - B2 ** n[p]) for p in members])
        if relative:
          x = x / (np.array([_dual(group, m[p]) ** 2 for p in members]) + 1e-12)
        scale.update(zip(members, mapping(x)))
    out.append(({p: scale[p] * u for p, u in _flat(inner).items()}, dict(h), scale))
  return out


_INNER = {'sgd': lambda: optax.sgd(LR), 'adam': lambda: optax.adam(LR)}


@pytest.mark.parametrize(
  'inner, mapping, relative',
  [
    ('sgd', 'min_ratio', False),
    ('adam', 'mean_geo_p4', False),
    ('sgd', 'mean_arith', True),
  ],
)
def test_noise_adaptive_matches_numpy_reference(inner, mapping, relative):
  params = _random(0)
  grads_seq = [_random(10 + t, scale=1.0 + t) for t in range(3)]
  plain = _INNER[inner]()
  state = plain.init(params)
  inner_seq = []
  for grads in grads_seq:
    u, state = plain.update(grads, state, params)
    inner_seq.append(u)
  map_fn, np_map, _ = _MAPPINGS[mapping]
  tx = optim.noise_adaptive(
    _INNER[inner](), mapping=map_fn, b1=B1, b2=B2, relative=relative, newton_schulz=_SVD
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected = _reference(grads_seq, inner_seq, mapping=np_map, relative=relative)
  for t, (grads, (exp_updates, exp_h, exp_scale)) in enumerate(zip(grads_seq, expected)):
    ours, state = update(grads, state, params)
    got = _flat(ours)
    for p in _SHAPES:
      np.testing.assert_allclose(got[p], exp_updates[p], rtol=2e-4, atol=1e-7, err_msg=f'{t} {p}')
    stats = optim.noise_adaptive_stats(state)
    assert set(stats['h']) == {p for p in _SHAPES if _GROUP[p] != 'vector'}
    for p in stats['h']:
      np.testing.assert_allclose(float(stats['h'][p]), exp_h[p], rtol=1e-4, err_msg=p)
      np.testing.assert_allclose(float(stats['lr_scale'][p]), exp_scale[p], rtol=1e-4, err_msg=p)
  assert int(state.count) == 3


def _dmuon():
  return optim.dmuon(LR, newton_schulz=optim.NewtonSchulz(dtype='float32'))


def test_noise_adaptive_defaults_to_the_geometric_fourth_root():
  h = jnp.asarray(_H, jnp.float32)
  chex.assert_trees_all_equal(
    optim.default_noise_mapping()(h),
    optim.mean_ratio(exponent=0.25, normaliser='geometric')(h),
  )
  np.testing.assert_allclose(
    optim.default_noise_mapping()(h), _np_mean(_H, 0.25, 'geometric', 0.1, 3.0), rtol=2e-5
  )
  params = _random(0)
  explicit = optim.noise_adaptive(
    optax.sgd(LR), mapping=optim.default_noise_mapping(), newton_schulz=_SVD
  )
  default = optim.noise_adaptive(optax.sgd(LR), newton_schulz=_SVD)
  s_explicit, s_default = explicit.init(params), default.init(params)
  update_explicit, update_default = jax.jit(explicit.update), jax.jit(default.update)
  for t in range(2):  # the factors are 1 until the second step's noise sample
    grads = _random(20 + t, scale=1.0 + t)
    u_explicit, s_explicit = update_explicit(grads, s_explicit, params)
    u_default, s_default = update_default(grads, s_default, params)
  chex.assert_trees_all_equal(u_default, u_explicit)
  scales = np.asarray(list(optim.noise_adaptive_stats(s_default)['lr_scale'].values()))
  assert not np.allclose(scales, 1.0)  # the factors were in play


def test_ones_gives_exactly_dmuons_updates():
  params = _random(1)
  plain, wrapped = _dmuon(), optim.noise_adaptive(_dmuon(), mapping=optim.ones())
  s_plain, s_wrapped = plain.init(params), wrapped.init(params)
  up_plain, up_wrapped = jax.jit(plain.update), jax.jit(wrapped.update)
  for t in range(3):
    grads = _random(20 + t)
    u0, s_plain = up_plain(grads, s_plain, params)
    u1, s_wrapped = up_wrapped(grads, s_wrapped, params)
    chex.assert_trees_all_equal(u1, u0)
    params = optax.apply_updates(params, u0)
  chex.assert_trees_all_equal(s_wrapped.inner, s_plain)
  stats = optim.noise_adaptive_stats(s_wrapped)
  assert set(float(v) for v in stats['lr_scale'].values()) == {1.0}
  assert all(float(v) > 0 for v in stats['h'].values())


def test_lanton_with_ones_has_unit_scales():
  params = _random(2)
  tx = optim.lanton(LR, mapping='ones', newton_schulz=_SVD)
  state = tx.init(params)
  for t in range(2):
    _, state = jax.jit(tx.update)(_random(30 + t), state, params)
  stats = optim.lanton_stats(state)
  assert set(float(v) for v in stats['lr_scale'].values()) == {1.0}
  assert set(stats['clip_low']) == {'hidden', 'embed_head'}


def _scaled_layer(tree, path, c):
  flat = {p: jnp.asarray(x) for p, x in _flat(tree).items()}
  flat[path] = c * flat[path]
  return _tree(flat)


_RELATIVE = {
  'lanton': lambda relative: optim.scale_by_lanton(
    mapping='min_ratio', relative=relative, newton_schulz=_SVD
  ),
  'noise_adaptive': lambda relative: optim.noise_adaptive(
    optax.sgd(LR), mapping='min_ratio', relative=relative, newton_schulz=_SVD
  ),
}


@pytest.mark.parametrize('name', sorted(_RELATIVE))
def test_relative_noise_is_scale_free(name):
  # One layer's gradients 100x larger: its noise H grows 10^4x (the factor moves with it),
  # but relative to its momentum's dual norm nothing changes.
  params = _random(3)
  grads_seq = [_random(40 + t) for t in range(2)]
  big = [_scaled_layer(g, 'layers_0/up/kernel', 100.0) for g in grads_seq]
  stats_fn = optim.lanton_stats if name == 'lanton' else optim.noise_adaptive_stats

  def scales(tx, update, seq):
    state = tx.init(params)
    for grads in seq:
      _, state = update(grads, state, params)
    return {p: float(v) for p, v in stats_fn(state)['lr_scale'].items()}

  for relative in (True, False):
    tx = _RELATIVE[name](relative)
    update = jax.jit(tx.update)  # compiled once for both gradient sequences
    base, scaled = scales(tx, update, grads_seq), scales(tx, update, big)
    if relative:
      for p in base:
        assert scaled[p] == pytest.approx(base[p], rel=1e-3), p
    else:
      assert scaled['layers_0/up/kernel'] < 0.1 * base['layers_0/up/kernel']


def test_clip_telemetry_counts_leaves_at_the_bounds():
  params = _random(4)
  mapping = optim.mean_ratio(s_min=0.9, s_max=1.1)
  tx = optim.noise_adaptive(optax.sgd(LR), mapping=mapping, newton_schulz=_SVD)
  lanton = optim.scale_by_lanton(mapping=mapping, newton_schulz=_SVD)
  for opt, stats_fn in ((tx, optim.noise_adaptive_stats), (lanton, optim.lanton_stats)):
    state = opt.init(params)
    stats = stats_fn(state)
    initial = list(stats['clip_low'].values()) + list(stats['clip_high'].values())
    assert {float(v) for v in initial} == {0.0}
    for t in range(3):
      _, state = jax.jit(opt.update)(_random(50 + t, scale=1.0 + 3 * t), state, params)
    stats = stats_fn(state)
    for group in ('hidden', 'embed_head'):
      s = np.array([float(v) for p, v in stats['lr_scale'].items() if _GROUP[p] == group])
      assert float(stats['clip_low'][group]) == pytest.approx(np.mean(s <= np.float32(0.9)))
      assert float(stats['clip_high'][group]) == pytest.approx(np.mean(s >= np.float32(1.1)))
    assert float(stats['clip_low']['hidden']) + float(stats['clip_high']['hidden']) > 0


def test_dual_norm_and_groups_options():
  params = _random(5)
  # The vector leaf adapted too (bias-RMS dual), the embedding not; custom dual norm callable.
  tx = optim.noise_adaptive(
    optax.sgd(LR),
    mapping='min_ratio',
    dual_norm={'vector': 'bias_rms', 'embed_head': None, 'hidden': lambda d: jnp.sum(d**2)},
  )
  state = tx.init(params)
  for t in range(2):
    _, state = jax.jit(tx.update)(_random(60 + t), state, params)
  stats = optim.noise_adaptive_stats(state)
  assert set(stats['h']) == {p for p in _SHAPES if _GROUP[p] in ('hidden', 'vector')}
  up = 'layers_0/up/kernel'
  d = _flat(_random(61))[up].astype(np.float64) - _flat(_random(60))[up]
  assert float(stats['h'][up]) == pytest.approx((1 - 0.95) * np.sum(d**2) ** 2)

  # Custom labels with a callable group -> dual norm.
  def labels(tree):
    return jax.tree_util.tree_map_with_path(
      lambda p, _: 'attn' if 'q' in jax.tree_util.keystr(p) else 'rest', tree
    )

  tx = optim.noise_adaptive(
    optax.sgd(LR),
    mapping='min_ratio',
    groups=labels,
    dual_norm=lambda g: 'spectral' if g == 'attn' else None,
    newton_schulz=_SVD,
  )
  state = tx.init(params)
  _, state = jax.jit(tx.update)(_random(62), state, params)
  assert set(optim.noise_adaptive_stats(state)['h']) == {'layers_0/q/kernel'}
  with pytest.raises(ValueError, match='no NoiseAdaptiveState'):
    optim.noise_adaptive_stats(optax.sgd(LR).init(params))


# ---- clipping of the independent noise gradient --------------------------------------------


def _h_after_clipped_steps(make_clipped, core, stats_fn):
  """H after a step with a tiny clip and G~ = G (so D = 0 whenever both are clipped alike)."""
  params = _random(6)
  opt = make_clipped(core)
  state = opt.init(params)
  grads = _random(70)
  _, state = jax.jit(opt.update)(grads, state, params, noise_grads=grads)
  return {p: float(v) for p, v in stats_fn(state)['h'].items()}


_CORES = {
  'lanton': (
    lambda: optim.lanton(LR, noise='independent', newton_schulz=_SVD),
    optim.lanton_stats,
  ),
  'noise_adaptive': (
    lambda: optim.noise_adaptive(
      optax.sgd(LR), mapping='min_ratio', noise='independent', newton_schulz=_SVD
    ),
    optim.noise_adaptive_stats,
  ),
}


@pytest.mark.parametrize('core', sorted(_CORES))
def test_noise_grads_are_clipped_like_the_gradient(core):
  make, stats_fn = _CORES[core]
  fixed = _h_after_clipped_steps(lambda tx: optim.clip_by_global_norm(1e-3, tx), make(), stats_fn)
  # D = clip(G) - clip(G~) = 0 up to rounding (the two clips may fuse differently).
  assert fixed and max(fixed.values()) < 1e-15
  # The bug it fixes: optax's clip in a chain clips G only, so D = clip(G) - G ~ G.
  chained = _h_after_clipped_steps(
    lambda tx: optax.chain(optax.clip_by_global_norm(1e-3), tx), make(), stats_fn
  )
  assert min(chained.values()) > 1e-3


def test_clip_state_is_optax_chains_and_refuses_noise_grads_without_inner():
  params = _random(7)
  inner = optax.adamw(LR)
  ours = optim.clip_by_global_norm(1.0, inner).init(params)
  theirs = optax.chain(optax.clip_by_global_norm(1.0), inner).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  grads = _random(8, scale=10.0)
  u0, _ = optim.clip_by_global_norm(1.0, inner).update(grads, ours, params)
  u1, _ = optax.chain(optax.clip_by_global_norm(1.0), inner).update(grads, theirs, params)
  chex.assert_trees_all_equal(u0, u1)
  alone = optim.clip_by_global_norm(1.0)
  clipped, _ = alone.update(grads, alone.init(params))
  assert float(optax.global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
  with pytest.raises(ValueError, match='noise_grads'):
    alone.update(grads, alone.init(params), noise_grads=grads)


def test_noise_adaptive_independent_noise_and_non_finite_steps():
  params = _random(9)
  tx = optim.noise_adaptive(
    optax.sgd(LR), mapping=optim.min_ratio(eps=EPS), b2=B2, noise='independent', newton_schulz=_SVD
  )
  update = jax.jit(tx.update)
  grads, tilde = _random(90), _random(91)
  state = tx.init(params)
  assert state.prev_grad == ()
  _, state = update(grads, state, params, noise_grads=tilde)
  stats = optim.noise_adaptive_stats(state)
  g, t = _flat(grads), _flat(tilde)
  h = {p: (1 - B2) * _dual(_GROUP[p], g[p].astype(np.float64) - t[p]) ** 2 for p in stats['h']}
  for p in stats['h']:  # sampled on the first step; the factors use H^ = H / (1 - b2)
    np.testing.assert_allclose(float(stats['h'][p]), h[p], rtol=1e-4, err_msg=p)
  for group in ('hidden', 'embed_head'):
    members = [p for p in stats['h'] if _GROUP[p] == group]
    expected = _np_min(np.array([h[p] for p in members]), 0.5)
    got = [float(stats['lr_scale'][p]) for p in members]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
  with pytest.raises(ValueError, match='noise_grads'):
    tx.update(grads, state, params)
  # A non-finite noise gradient: the noise state stays, the last factors are applied.
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), tilde)
  updates, after = update(grads, state, params, noise_grads=bad)
  chex.assert_trees_all_equal(
    (after.count, after.noise, after.noise_count, after.lr_scale, after.clip),
    (state.count, state.noise, state.noise_count, state.lr_scale, state.clip),
  )
  s = {p: float(v) for p, v in stats['lr_scale'].items()}
  for p, u in _flat(updates).items():
    np.testing.assert_allclose(u, -LR * s.get(p, 1.0) * g[p], rtol=1e-5, err_msg=p)
