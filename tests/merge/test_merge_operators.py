"""Every merge operator against a slow float64 numpy loop on small trees."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import merge

NUM_EXPERTS = 3
# name -> (shape, dtype): an fp32 matrix and a bf16 vector.
LEAVES = {'w': ((4, 6), jnp.float32), 'b': ((6,), jnp.bfloat16)}


def _tree(rng, make):
  return {
    'layer': {name: jnp.asarray(make(rng, shape), dtype) for name, (shape, dtype) in LEAVES.items()}
  }


def _problem(seed=0, num=NUM_EXPERTS):
  rng = np.random.default_rng(seed)
  base = _tree(rng, lambda r, s: r.normal(size=s))
  experts = [
    jax.tree.map(
      lambda b: (b.astype(jnp.float32) + jnp.asarray(rng.normal(size=b.shape), jnp.float32)).astype(
        b.dtype
      ),
      base,
    )
    for _ in range(num)
  ]
  # Moments spread over decades, with exact zeros, like a real Adam nu.
  moments = [
    _tree(
      rng, lambda r, s: np.where(r.uniform(size=s) < 0.2, 0.0, 10.0 ** r.uniform(-6, 0, size=s))
    )
    for _ in range(num)
  ]
  moments = [jax.tree.map(lambda v: v.astype(jnp.float32), m) for m in moments]
  masks = [_tree(rng, lambda r, s: r.uniform(size=s) < 0.5) for _ in range(num)]
  return base, experts, moments, masks


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64), tree)


def _assert_close(out, expected, reference_dtypes):
  for (path, got), want, ref in zip(
    jax.tree_util.tree_flatten_with_path(out)[0],
    jax.tree.leaves(expected),
    jax.tree.leaves(reference_dtypes),
  ):
    assert got.dtype == ref.dtype, (path, got.dtype, ref.dtype)
    tol = 2e-2 if ref.dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(
      np.asarray(got, np.float64), want, rtol=tol, atol=tol, err_msg=str(path)
    )


def _per_entry(fn, *trees):
  """Applies fn(list of per-tree scalars) at every index of every leaf."""
  out = {}
  leaves = [jax.tree.leaves(t) for t in trees]
  for i, leaf in enumerate(leaves[0]):
    result = np.zeros(leaf.shape)
    for idx in np.ndindex(leaf.shape):
      result[idx] = fn([ls[i][idx] for ls in leaves])
    out[i] = result
  return jax.tree.unflatten(jax.tree.structure(trees[0]), [out[i] for i in range(len(leaves[0]))])


# ---------------------------------------------------------------- references


def ref_linear(experts, weights):
  num = len(experts)
  return _per_entry(
    lambda xs: sum(weights[t] * xs[t] for t in range(num)) / sum(weights), *_np(experts)
  )


def ref_task_arithmetic(base, experts, weights, scale):
  num = len(experts)
  return _per_entry(
    lambda xs: xs[0] + scale * sum(weights[t] * (xs[1 + t] - xs[0]) for t in range(num)),
    _np(base),
    *_np(experts),
  )


def ref_top_density(score, density):
  """The k largest, k = round(d n) (>= 1 if d > 0), ties by flat index."""
  flat = list(np.ravel(score))
  n = len(flat)
  k = 0 if density == 0 else min(n, max(1, round(density * n)))
  order = sorted(range(n), key=lambda i: (-flat[i], i))
  keep = np.zeros(n, bool)
  keep[order[:k]] = True
  return keep.reshape(np.shape(score))


def ref_top_truncated(score, density):
  """mergekit's TIES trim: the int(d n) largest (all for d >= 1), ties by flat index."""
  flat = list(np.ravel(score))
  n = len(flat)
  k = n if density >= 1 else int(density * n)
  order = sorted(range(n), key=lambda i: (-flat[i], i))
  keep = np.zeros(n, bool)
  keep[order[:k]] = True
  return keep.reshape(np.shape(score))


def ref_consensus(taus, weights):
  """mergekit's election: '+' where the weighted sum is exactly 0; a zero divisor counts as 1."""
  total = sum(w * x for w, x in zip(weights, taus))
  elected = 1.0 if total >= 0 else -1.0
  num = den = 0.0
  for w, x in zip(weights, taus):
    if np.sign(w * x) == elected:
      num += w * x
      den += w
  return num / (den if den != 0 else 1.0)


def ref_ties(base, experts, densities, weights, scale):
  base, experts = _np(base), _np(experts)
  trimmed = [
    jax.tree.map(
      lambda b, e, d=d: np.where(ref_top_truncated(np.abs(e - b), d), e - b, 0.0), base, expert
    )
    for expert, d in zip(experts, densities)
  ]
  return _per_entry(lambda xs: xs[0] + scale * ref_consensus(xs[1:], weights), base, *trimmed)


def ref_dare(base, experts, drops, key, combine, weights, scale):
  """DARE with the keep masks its documented keys produce."""
  base, experts_np = _np(base), _np(experts)
  names = [
    jax.tree_util.keystr(p, simple=True, separator='/')
    for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]
  ]
  keeps = [
    np.asarray(
      merge.dare_keep_masks(merge.leaf_key(key, name), np.asarray(drops, np.float32), shape=b.shape)
    )
    for name, b in zip(names, jax.tree.leaves(base))
  ]
  dropped = []
  for t, (expert, p) in enumerate(zip(experts_np, drops)):
    leaves = [
      np.where(keep[t], (e - b) / (1.0 - p), 0.0)
      for keep, b, e in zip(keeps, jax.tree.leaves(base), jax.tree.leaves(expert))
    ]
    dropped.append(jax.tree.unflatten(jax.tree.structure(base), leaves))
  if combine == 'ties':

    def fn(xs):
      return xs[0] + scale * ref_consensus(xs[1:], weights)
  else:

    def fn(xs):
      return xs[0] + scale * sum(w * x for w, x in zip(weights, xs[1:]))

  return _per_entry(fn, base, *dropped)


def ref_fisher(experts, fishers, weights, eps):
  num = len(experts)

  def entry(xs):
    thetas, fs = xs[:num], xs[num:]
    den = sum(weights[t] * (fs[t] + eps) for t in range(num))
    return sum(weights[t] * (fs[t] + eps) * thetas[t] for t in range(num)) / den

  return _per_entry(entry, *_np(experts), *_np(fishers))


def ref_rank1(v):
  v = np.asarray(v, np.float64)
  m, n = v.shape
  total = sum(v[i, j] for i in range(m) for j in range(n))
  out = np.zeros((m, n))
  if total == 0:
    return out
  for i in range(m):
    for j in range(n):
      out[i, j] = sum(v[i, :]) * sum(v[:, j]) / total
  return out


def ref_ota(
  base,
  experts,
  moments,
  *,
  power=0.5,
  eps=1e-8,
  masks=None,
  normalise='none',
  fallback_to_base=True,
  corrections=None,
  scales=None,
):
  num = len(experts)
  corrections = corrections or [1.0] * num
  scales = scales or [1.0] * num
  weights = []
  for t in range(num):

    def weight(v, mask, t=t):
      p = (v * corrections[t]) ** power * scales[t]
      if normalise == 'mean':
        p = p / (p.mean() + eps)
      return (p + eps) * (1.0 if mask is None else mask)

    mask_t = (
      jax.tree.map(lambda m: np.asarray(m, np.float64), masks[t])
      if masks is not None
      else jax.tree.map(lambda _: None, moments[t])
    )
    weights.append(jax.tree.map(weight, _np(moments[t]), mask_t, is_leaf=lambda x: x is None))
  has_base = base is not None
  base_np = _np(base) if has_base else _np(experts[0])

  def entry(xs):
    b, thetas, ws = xs[0], xs[1 : 1 + num], xs[1 + num :]
    den = sum(ws)
    if masks is not None and den <= num * eps * 1.1:
      return b if (fallback_to_base and has_base) else np.mean(thetas)
    if has_base:
      return b + sum(w * (x - b) for w, x in zip(ws, thetas)) / den
    return sum(w * x for w, x in zip(ws, thetas)) / den

  return _per_entry(entry, base_np, *_np(experts), *weights)


def ref_top_mass(score, mass):
  """The fewest largest entries whose sum reaches mass * total."""
  flat = list(np.ravel(score))
  order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
  target = mass * sum(flat)
  keep = np.zeros(len(flat), bool)
  total = 0.0
  for i in order:
    if target <= 0 or total >= target:
      break
    keep[i] = True
    total += flat[i]
  return keep.reshape(np.shape(score))


def ref_ffg_mask(base, expert, moment, *, scope, score, density=None, mass=None):
  base, expert = _np(base), _np(expert)
  if score == 'fisher':
    s = jax.tree.map(lambda b, e, v: v * (e - b) ** 2, base, expert, _np(moment))
  else:
    s = jax.tree.map(lambda b, e: np.abs(e - b), base, expert)
  if scope == 'per_tensor':
    if mass is not None:
      return jax.tree.map(lambda x: ref_top_mass(x, mass), s)
    return jax.tree.map(lambda x: ref_top_density(x, density), s)
  flat = sorted(itertools.chain(*(np.ravel(x) for x in jax.tree.leaves(s))), reverse=True)
  if mass is not None:
    target = mass * sum(flat)
    # The largest cutoff t whose entries s >= t reach the target mass.
    passing = [t for t in flat if target > 0 and sum(x for x in flat if x >= t) >= target]
    if not passing:
      return jax.tree.map(lambda x: np.zeros(x.shape, bool), s)
    return jax.tree.map(lambda x: x >= max(passing), s)
  k = 0 if density == 0 else max(1, round(density * len(flat)))
  if k == 0:
    return jax.tree.map(lambda x: np.zeros(x.shape, bool), s)
  return jax.tree.map(lambda x: x >= flat[k - 1], s)


# --------------------------------------------------------------------- tests

WEIGHTS = [0.5, 1.0, 2.0]

# name -> (operator call, reference call), both on the problem
BASELINES = {
  'linear': (lambda b, e, v: merge.linear(e), lambda b, e, v: ref_linear(e, [1.0] * 3)),
  'linear_weighted': (
    lambda b, e, v: merge.linear(e, weights=WEIGHTS),
    lambda b, e, v: ref_linear(e, WEIGHTS),
  ),
  'task_arithmetic': (
    lambda b, e, v: merge.task_arithmetic(b, e, scale=0.3),
    lambda b, e, v: ref_task_arithmetic(b, e, [1.0] * 3, 0.3),
  ),
  'task_arithmetic_weighted': (
    lambda b, e, v: merge.task_arithmetic(b, e, scale=0.5, weights=WEIGHTS),
    lambda b, e, v: ref_task_arithmetic(b, e, WEIGHTS, 0.5),
  ),
  'ties': (
    lambda b, e, v: merge.ties(b, e, density=0.4),
    lambda b, e, v: ref_ties(b, e, [0.4] * 3, [1.0] * 3, 1.0),
  ),
  'ties_per_expert': (
    lambda b, e, v: merge.ties(b, e, density=[0.2, 0.6, 1.0], weights=WEIGHTS, scale=0.8),
    lambda b, e, v: ref_ties(b, e, [0.2, 0.6, 1.0], WEIGHTS, 0.8),
  ),
  'dare_ties': (
    lambda b, e, v: merge.dare(b, e, drop=0.3, key=jax.random.key(1)),
    lambda b, e, v: ref_dare(b, e, [0.3] * 3, jax.random.key(1), 'ties', [1.0] * 3, 1.0),
  ),
  'dare_linear': (
    lambda b, e, v: merge.dare(
      b,
      e,
      drop=[0.1, 0.5, 0.9],
      key=jax.random.key(2),
      combine='linear',
      weights=WEIGHTS,
      scale=0.5,
    ),
    lambda b, e, v: ref_dare(b, e, [0.1, 0.5, 0.9], jax.random.key(2), 'linear', WEIGHTS, 0.5),
  ),
  'fisher': (
    lambda b, e, v: merge.fisher(e, v, eps=1e-6),
    lambda b, e, v: ref_fisher(e, v, [1.0] * 3, 1e-6),
  ),
  'fisher_weighted': (
    lambda b, e, v: merge.fisher(e, v, eps=1e-6, weights=WEIGHTS),
    lambda b, e, v: ref_fisher(e, v, WEIGHTS, 1e-6),
  ),
}


@pytest.mark.parametrize('name', sorted(BASELINES))
def test_baseline_matches_numpy(name):
  base, experts, moments, _ = _problem()
  operator, reference = BASELINES[name]
  _assert_close(operator(base, experts, moments), reference(base, experts, moments), base)


def _rank1_dense(moments):
  """Moments with each 2-D leaf replaced by its rank-1 reconstruction."""
  return [jax.tree.map(lambda v: ref_rank1(v) if v.ndim == 2 else v, _np(m)) for m in moments]


# name -> (ota kwargs, reference kwargs); 'base' False drops the base model,
# 'rank1' passes rank1_compress'ed moments.
OTA_CASES = {
  'default': ({}, {}),
  'power_quarter': ({'power': 0.25}, {'power': 0.25}),
  'normalise_mean': ({'normalise': 'mean', 'eps': 1e-6}, {'normalise': 'mean', 'eps': 1e-6}),
  'no_base': ({'base': False}, {'base': False}),
  'masks_fallback_base': ({'masks': True}, {'masks': True}),
  'masks_fallback_mean': (
    {'masks': True, 'fallback_to_base': False},
    {'masks': True, 'fallback_to_base': False},
  ),
  'no_base_masks': ({'base': False, 'masks': True}, {'base': False, 'masks': True}),
  'rank1': ({'rank1': True}, {'rank1': True}),
  'bias_correction_scales': (
    {'bias_correction': [(0.999, 10), (0.99, 100), (0.9, 1)], 'scales': [1.0, 2.0, 0.5]},
    {
      'corrections': [1 / (1 - 0.999**10), 1 / (1 - 0.99**100), 1 / (1 - 0.9)],
      'scales': [1.0, 2.0, 0.5],
    },
  ),
}


@pytest.mark.parametrize('name', sorted(OTA_CASES))
def test_ota_matches_numpy(name):
  base, experts, moments, masks = _problem(seed=1)
  kwargs, ref_kwargs = (dict(d) for d in OTA_CASES[name])
  use_base = kwargs.pop('base', True)
  ref_kwargs.pop('base', None)
  if kwargs.pop('masks', False):
    kwargs['masks'] = masks
    ref_kwargs['masks'] = masks
  ref_moments = moments
  if kwargs.pop('rank1', False):
    ref_kwargs.pop('rank1')
    ref_moments = _rank1_dense(moments)
    moments = [merge.rank1_compress(m) for m in moments]
  out = merge.ota(base if use_base else None, experts, moments, **kwargs)
  expected = ref_ota(base if use_base else None, experts, ref_moments, **ref_kwargs)
  _assert_close(out, expected, base)


def test_ota_masked_entries_fall_back():
  """Entries no expert keeps are the base's (or the experts' mean) exactly."""
  base, experts, moments, masks = _problem(seed=2)
  none_kept = jax.tree.map(lambda *ms: ~np.any(np.stack(ms), axis=0), *masks)
  assert sum(int(x.sum()) for x in jax.tree.leaves(none_kept)) > 0
  out = merge.ota(base, experts, moments, masks=masks)
  for got, b, keep in zip(jax.tree.leaves(out), jax.tree.leaves(base), jax.tree.leaves(none_kept)):
    np.testing.assert_array_equal(np.asarray(got)[keep], np.asarray(b)[keep])


def ref_masked_combine(base, experts, masks, combine):
  """The OTA reference's `masked_task_vector_merge_method` on masked task
  vectors ('ties': our consensus, the mean over agreeing experts)."""
  num = len(experts)

  def entry(xs):
    b, es, ms = xs[0], xs[1 : 1 + num], xs[1 + num :]
    if not any(ms):
      return b
    taus = [(e - b) if m else 0.0 for e, m in zip(es, ms)]
    if combine == 'linear':
      return b + sum(taus) / num
    return b + ref_consensus(taus, [1.0] * num)

  return _per_entry(entry, _np(base), *_np(experts), *_np(masks))


@pytest.mark.parametrize('combine', ['linear', 'ties'])
def test_ota_combines_masked_task_vectors(combine):
  base, experts, moments, masks = _problem(seed=4)
  out = merge.ota(base, experts, moments, masks=masks, combine=combine)
  _assert_close(out, ref_masked_combine(base, experts, masks, combine), base)
  fused = merge.ota_ffg(base, experts, moments, density=0.4, combine=combine)
  ffg = [merge.ffg_mask(base, e, v, density=0.4) for e, v in zip(experts, moments)]
  for g, w in zip(
    jax.tree.leaves(fused),
    jax.tree.leaves(merge.ota(base, experts, moments, masks=ffg, combine=combine)),
  ):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  with pytest.raises(ValueError, match='needs the base'):
    merge.ota(None, experts, moments, combine=combine)


# (scope, score, selector, value): every scope and score with densities at
# and between the ends, and the saliency-mass option.
FFG_CASES = [
  (scope, score, selector, value)
  for scope in merge.SCOPES
  for score in merge.SCORES
  for selector, value in (
    ('density', 0.0),
    ('density', 0.05),
    ('density', 0.3),
    ('density', 1.0),
    ('mass', 0.0),
    ('mass', 0.5),
    ('mass', 0.9),
    ('mass', 1.0),
  )
]


@pytest.mark.parametrize('scope,score,selector,value', FFG_CASES)
def test_ffg_mask_matches_numpy(scope, score, selector, value):
  base, experts, moments, _ = _problem(seed=3)
  got = merge.ffg_mask(base, experts[0], moments[0], scope=scope, score=score, **{selector: value})
  want = ref_ffg_mask(base, experts[0], moments[0], scope=scope, score=score, **{selector: value})
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(g), w)


def test_ffg_global_threshold_is_one_cutoff():
  """The global scope is the per-leaf test s >= ffg_threshold(all s)."""
  base, experts, moments, _ = _problem(seed=4)
  mask = merge.ffg_mask(base, experts[1], moments[1], density=0.2)
  saliencies = {
    name: merge.ffg_saliency(
      base['layer'][name], experts[1]['layer'][name], moments[1]['layer'][name], name=name
    )
    for name in LEAVES
  }
  cutoff = merge.ffg_threshold(saliencies, density=0.2)
  kept = sum(int(np.sum(np.asarray(s) >= cutoff)) for s in saliencies.values())
  total = sum(s.size for s in saliencies.values())
  assert kept == round(0.2 * total)
  by_threshold = merge.ffg_mask(base, experts[1], moments[1], threshold=float(cutoff))
  for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(by_threshold)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The per-leaf core on one tensor with the same cutoff agrees too.
  np.testing.assert_array_equal(
    np.asarray(
      merge.ffg_mask_leaf(
        base['layer']['w'],
        experts[1]['layer']['w'],
        moments[1]['layer']['w'],
        threshold=float(cutoff),
      )
    ),
    np.asarray(mask['layer']['w']),
  )


def test_ffg_graft_matches_numpy():
  base, experts, moments, masks = _problem(seed=5)
  out = merge.ffg_graft(base, experts[0], masks[0])
  want = jax.tree.map(lambda b, e, m: b + (e - b) * m, _np(base), _np(experts[0]), _np(masks[0]))
  _assert_close(out, want, base)


def test_ota_ffg_matches_numpy():
  """OTA over FFG-pruned experts: masks from ffg_mask, rank-1 moments."""
  base, experts, moments, _ = _problem(seed=6)
  factors = [merge.rank1_compress(m) for m in moments]
  masks = [merge.ffg_mask(base, e, f, density=0.3) for e, f in zip(experts, factors)]
  dense = _rank1_dense(moments)
  ref_masks = [
    ref_ffg_mask(base, e, v, density=0.3, scope='global', score='fisher')
    for e, v in zip(experts, dense)
  ]
  for m, r in zip(jax.tree.leaves(masks), jax.tree.leaves(ref_masks)):
    np.testing.assert_array_equal(np.asarray(m), r)
  out = merge.ota(base, experts, factors, masks=masks)
  _assert_close(out, ref_ota(base, experts, dense, masks=ref_masks), base)


@pytest.mark.parametrize('rank1', [False, True])
def test_fused_ota_ffg_equals_ota_over_ffg_masks(rank1):
  base, experts, moments, _ = _problem(seed=7)
  if rank1:
    moments = [merge.rank1_compress(m) for m in moments]
  densities = [0.2, 0.5, 1.0]
  masks = [merge.ffg_mask(base, e, v, density=d) for e, v, d in zip(experts, moments, densities)]
  want = merge.ota(base, experts, moments, masks=masks)
  got = merge.ota_ffg(base, experts, moments, density=densities)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  # Density 0 everywhere keeps nothing: every entry falls back to the base.
  none = merge.ota_ffg(base, experts, moments, density=0.0)
  for g, b in zip(jax.tree.leaves(none), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(b, np.float32))
  threshold = merge.ota_ffg(base, experts, moments, threshold=1e-3, power=0.7)
  masks = [merge.ffg_mask(base, e, v, threshold=1e-3) for e, v in zip(experts, moments)]
  for g, w in zip(
    jax.tree.leaves(threshold),
    jax.tree.leaves(merge.ota(base, experts, moments, masks=masks, power=0.7)),
  ):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_sampled_quantile_keeps_about_the_density():
  """quantile='sampled' on a model big enough to be sampled: the cutoff keeps the density
  to within the sample's spread, and ota_ffg merges over exactly that cutoff's masks."""
  rng = np.random.default_rng(8)
  shapes = {'a': (300, 1024), 'b': (2000,)}
  base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  experts = [
    {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    for _ in range(2)
  ]
  moments = [
    {k: (rng.uniform(size=s) ** 4).astype(np.float32) for k, s in shapes.items()} for _ in range(2)
  ]
  total = sum(int(np.prod(s)) for s in shapes.values())
  densities = [0.3, 0.05]
  cutoffs = []
  for e, v, d in zip(experts, moments, densities):
    saliency = [merge.ffg_saliency(base[k], e[k], v[k]) for k in shapes]
    cutoff = merge.ffg_threshold(saliency, density=d, quantile='sampled')
    assert cutoff != merge.ffg_threshold(saliency, density=d)  # not the exact path
    kept = sum(int(np.sum(np.asarray(x) >= cutoff)) for x in saliency)
    assert abs(kept / total - d) <= 0.05 * d, (kept / total, d)  # rank std 0.6-1.7%
    cutoffs.append(cutoff)
  got = merge.ota_ffg(base, experts, moments, density=densities, quantile='sampled')
  masks = [merge.ffg_mask(base, e, v, threshold=c) for e, v, c in zip(experts, moments, cutoffs)]
  want = merge.ota(base, experts, moments, masks=masks)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize('rank', [1, 2, 4])
def test_lowrank_moment_matches_numpy(rank):
  rng = np.random.default_rng(rank)
  v = {'w': (rng.uniform(size=(5, 4)) ** 3).astype(np.float32), 'b': np.ones(4, np.float32)}
  got = merge.lowrank_moment(v, rank)
  u, s, vh = np.linalg.svd(v['w'].astype(np.float64), full_matrices=False)
  want = np.maximum((u[:, :rank] * s[:rank]) @ vh[:rank], 0.0)
  np.testing.assert_allclose(np.asarray(got['w']), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got['b']), v['b'])
  if rank == 4:  # full rank: v itself
    np.testing.assert_allclose(np.asarray(got['w']), v['w'], rtol=1e-6)


def test_rank1_matches_numpy():
  _, _, moments, _ = _problem(seed=7)
  factors = merge.rank1_compress(moments[0])
  assert isinstance(factors['layer']['w'], merge.Rank1)
  assert not isinstance(factors['layer']['b'], merge.Rank1)  # 1-D kept
  np.testing.assert_array_equal(
    np.asarray(factors['layer']['b']), np.asarray(moments[0]['layer']['b'])
  )
  w = np.asarray(moments[0]['layer']['w'], np.float64)
  np.testing.assert_allclose(factors['layer']['w'].row_sums, w.sum(1), rtol=1e-5)
  np.testing.assert_allclose(factors['layer']['w'].col_sums, w.sum(0), rtol=1e-5)
  expanded = merge.rank1_expand(factors)
  assert expanded['layer']['w'].dtype == jnp.float32
  np.testing.assert_allclose(expanded['layer']['w'], ref_rank1(w), rtol=1e-5, atol=1e-12)
  assert expanded['layer']['b'] is factors['layer']['b']
  zero = merge.rank1_expand_leaf(merge.rank1_compress_leaf(np.zeros((2, 3))))
  np.testing.assert_array_equal(np.asarray(zero), np.zeros((2, 3)))


# name -> (tree operator, per-leaf core) on (base, experts, moments)
LEAF_CORES = {
  'linear': (lambda b, es, vs: merge.linear(es), lambda b, es, vs: merge.linear_leaf(es)),
  'ties': (
    lambda b, es, vs: merge.ties(b, es, density=0.5),
    lambda b, es, vs: merge.ties_leaf(b, es, density=0.5),
  ),
  'ota': (
    lambda b, es, vs: merge.ota(b, es, vs, normalise='mean'),
    lambda b, es, vs: merge.ota_leaf(b, es, vs, normalise='mean'),
  ),
  'fisher': (lambda b, es, vs: merge.fisher(es, vs), lambda b, es, vs: merge.fisher_leaf(es, vs)),
  'ffg_mask_per_tensor': (
    lambda b, es, vs: merge.ffg_mask(b, es[0], vs[0], density=0.5, scope='per_tensor'),
    lambda b, es, vs: merge.ffg_mask_leaf(b, es[0], vs[0], density=0.5),
  ),
}


@pytest.mark.parametrize('name', sorted(LEAF_CORES))
def test_jitted_leaf_cores_equal_tree_operators(name):
  """The per-leaf cores a streaming merge calls, under jax.jit, give the tree
  operator's result leaf by leaf."""
  base, experts, moments, _ = _problem(seed=8)
  tree_op, leaf_op = LEAF_CORES[name]
  jitted = jax.jit(leaf_op)
  for got, b, es, vs in zip(
    jax.tree.leaves(tree_op(base, experts, moments)),
    jax.tree.leaves(base),
    zip(*map(jax.tree.leaves, experts)),
    zip(*map(jax.tree.leaves, moments)),
  ):
    out = jitted(b, list(es), list(vs))
    assert out.dtype == got.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(got, np.float32), rtol=1e-6)


def test_dare_drops_the_requested_fraction():
  base = {'w': jnp.zeros((100, 100))}
  expert = {'w': jnp.ones((100, 100))}
  out = merge.dare(base, [expert], drop=0.3, key=jax.random.key(0), combine='linear')
  kept = np.asarray(out['w']) != 0
  assert abs(kept.mean() - 0.7) < 0.02
  np.testing.assert_allclose(np.asarray(out['w'])[kept], 1 / 0.7, rtol=1e-6)


# ------------------------------------------------- the sampled global cutoff


def _ref_kth_largest(leaves, density):
  """The definition: numpy's sort of all entries (NaN, negative values and
  -0.0 as +0.0), its k-th largest; +inf for k = 0."""
  values = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in leaves])
  values = np.where(values > 0, values, np.float32(0))  # NaN > 0 is False
  k = 0 if density == 0 else max(1, round(density * values.size))
  if k == 0:
    return float('inf')
  return float(np.sort(values)[::-1][k - 1])


def _saliency_like(rng, n, kind):
  if kind == 'wide':
    return (10.0 ** rng.uniform(-12, 3, size=n)).astype(np.float32)
  if kind == 'ties':  # few distinct values, zeros and -0.0
    s = rng.choice(np.float32([0.0, -0.0, 1e-3, 2.5, 7.0]), size=n)
    return s.astype(np.float32)
  return (rng.random(n, np.float32) ** 4 * rng.standard_normal(n) ** 2).astype(
    np.float32
  )  # 'bench': like bench_merge's v * tau^2


# (shapes, kind, density): sampled (> 4 * sample size entries) and not.
SAMPLED_CASES = [
  (((300, 1024), (7,), (40, 3, 900)), 'bench', 0.3),
  (((300, 1024), (7,), (40, 3, 900)), 'wide', 1e-5),
  (((300, 1024), (7,), (40, 3, 900)), 'wide', 0.999),
  (((300, 1024), (7,), (40, 3, 900)), 'ties', 0.5),
  (((300, 1024), (7,), (40, 3, 900)), 'ties', 1.0),
  (((300, 1024),), 'bench', 0.0),
  (((5, 7), (11,)), 'wide', 0.4),
]


@pytest.mark.parametrize('shapes,kind,density', SAMPLED_CASES)
def test_ffg_threshold_equals_numpy_sort(shapes, kind, density):
  rng = np.random.default_rng(7)
  leaves = [_saliency_like(rng, int(np.prod(s)), kind).reshape(s) for s in shapes]
  got = merge.ffg_threshold([jnp.asarray(x) for x in leaves], density=density)
  assert got == _ref_kth_largest(leaves, density)


def test_ffg_mask_global_sampled_matches_numpy():
  """ffg_mask's fused global path on a model big enough to be sampled."""
  rng = np.random.default_rng(5)
  shapes = {'a': (260, 1024), 'b': (1000,)}
  base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  expert = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
  moment = {k: (rng.uniform(size=s) ** 4).astype(np.float32) for k, s in shapes.items()}
  got = merge.ffg_mask(base, expert, moment, density=0.3)
  s = {k: moment[k] * (expert[k] - base[k]) ** 2 for k in shapes}
  cutoff = _ref_kth_largest(list(s.values()), 0.3)
  for k in shapes:
    np.testing.assert_array_equal(np.asarray(got[k]), s[k] >= cutoff)
