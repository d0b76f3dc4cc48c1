"""The streaming merge equals the in-memory operators, leaf for leaf."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from curvopt import merge

NUM = 3
# name -> (shape, dtype); a bf16 leaf checks dtype round trips.
LEAVES = {
  'embed': ((16, 8), jnp.float32),
  'layers_0/w': ((8, 8), jnp.float32),
  'layers_0/b': ((8,), jnp.bfloat16),
  'head': ((8, 4), jnp.float32),
}
# Small batches: every merge spans several batches (and prefetches).
BATCH_BYTES = 1500


def _tree(make):
  return merge.TreeReader(
    {name: jnp.asarray(make(shape), dtype) for name, (shape, dtype) in LEAVES.items()}
  ).read_tree()


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  base = _tree(lambda s: rng.normal(size=s))
  experts = [
    jax.tree.map(
      lambda b: (b.astype(jnp.float32) + jnp.asarray(rng.normal(size=b.shape))).astype(b.dtype),
      base,
    )
    for _ in range(NUM)
  ]
  moments = [
    _tree(lambda s: np.where(rng.uniform(size=s) < 0.2, 0.0, rng.uniform(size=s) ** 4))
    for _ in range(NUM)
  ]
  moments = [jax.tree.map(lambda v: v.astype(jnp.float32), m) for m in moments]
  return base, experts, moments


def _ffg_ota(b, es, vs, **selector):
  masks = [merge.ffg_mask(b, e, v, **selector) for e, v in zip(es, vs)]
  return merge.ota(b, es, vs, masks=masks)


KEY = jax.random.key(7)
# name -> (streaming kwargs, in-memory merge(base, experts, moments))
CASES = {
  'linear': (
    dict(method='linear', options={'weights': [1.0, 2.0, 3.0]}),
    lambda b, es, vs: merge.linear(es, weights=[1.0, 2.0, 3.0]),
  ),
  'task_arithmetic': (
    dict(method='task_arithmetic', options={'scale': 0.5}),
    lambda b, es, vs: merge.task_arithmetic(b, es, scale=0.5),
  ),
  'ties': (
    dict(method='ties', options={'density': [0.3, 0.5, 0.7]}),
    lambda b, es, vs: merge.ties(b, es, density=[0.3, 0.5, 0.7]),
  ),
  'dare': (
    dict(method='dare', options={'drop': 0.4, 'key': KEY}),
    lambda b, es, vs: merge.dare(b, es, drop=0.4, key=KEY),
  ),
  'fisher': (
    dict(method='fisher', options={'weights': [1.0, 1.0, 2.0]}),
    lambda b, es, vs: merge.fisher(es, vs, weights=[1.0, 1.0, 2.0]),
  ),
  'ota': (
    dict(method='ota', options={'normalise': 'mean'}),
    lambda b, es, vs: merge.ota(b, es, vs, normalise='mean'),
  ),
  'ota_no_base': (dict(method='ota', no_base=True), lambda b, es, vs: merge.ota(None, es, vs)),
  'ota_ffg_density': (
    dict(method='ota', ffg={'density': [0.2, 0.4, 0.6]}),
    lambda b, es, vs: merge.ota(
      b,
      es,
      vs,
      masks=[merge.ffg_mask(b, e, v, density=d) for e, v, d in zip(es, vs, [0.2, 0.4, 0.6])],
    ),
  ),
  'ota_ffg_mass': (
    dict(method='ota', ffg={'mass': 0.8}),
    lambda b, es, vs: _ffg_ota(b, es, vs, mass=0.8),
  ),
  'ota_ffg_per_tensor': (
    dict(method='ota', ffg={'density': 0.3, 'scope': 'per_tensor'}),
    lambda b, es, vs: _ffg_ota(b, es, vs, density=0.3, scope='per_tensor'),
  ),
  'ota_ffg_magnitude': (
    dict(method='ota', ffg={'density': 0.3, 'score': 'magnitude'}),
    lambda b, es, vs: merge.ota(
      b, es, vs, masks=[merge.ffg_mask(b, e, density=0.3, score='magnitude') for e in es]
    ),
  ),
  'ota_rank1': (
    dict(method='ota', rank1=True, ffg={'density': 0.3}),
    lambda b, es, vs: _ffg_ota(b, es, [merge.rank1_compress(v) for v in vs], density=0.3),
  ),
  'ota_moment_rank': (
    dict(method='ota', moment_rank=2, ffg={'density': 0.3}),
    lambda b, es, vs: _ffg_ota(b, es, [merge.lowrank_moment(v, 2) for v in vs], density=0.3),
  ),
  'ota_combine_ties': (
    dict(method='ota', options={'combine': 'ties'}, ffg={'density': 0.4}),
    lambda b, es, vs: merge.ota(
      b,
      es,
      vs,
      masks=[merge.ffg_mask(b, e, v, density=0.4) for e, v in zip(es, vs)],
      combine='ties',
    ),
  ),
  'ffg_graft': (
    dict(method='ffg_graft', ffg={'density': 0.25}, experts=[1]),
    lambda b, es, vs: merge.ffg_graft(b, es[1], merge.ffg_mask(b, es[1], vs[1], density=0.25)),
  ),
}


def _stream(
  base, experts, moments, *, method, no_base=False, experts_=None, sharding=None, **kwargs
):
  chosen = experts_ if experts_ is not None else range(len(experts))
  writer = merge.MemoryWriter()
  result = merge.merge_streaming(
    method,
    [merge.TreeReader(experts[t]) for t in chosen],
    writer,
    base=None if no_base else merge.TreeReader(base),
    moments=[merge.TreeReader(moments[t]) for t in chosen],
    batch_bytes=BATCH_BYTES,
    sharding=sharding,
    **kwargs,
  )
  return writer.tree(), result


def _assert_equal(got, want):
  flat_got = dict(merge.TreeReader(got).read(merge.TreeReader(got).names))
  flat_want = merge.TreeReader(want)
  assert sorted(flat_got) == sorted(flat_want.names)
  for name, value in flat_want.read(flat_want.names).items():
    assert flat_got[name].dtype == value.dtype, name
    np.testing.assert_array_equal(
      np.asarray(flat_got[name], np.float32), np.asarray(value, np.float32), err_msg=name
    )


@pytest.mark.parametrize('case', sorted(CASES))
def test_streamed_equals_in_memory(case):
  base, experts, moments = _problem()
  kwargs, in_memory = CASES[case]
  kwargs = dict(kwargs)
  experts_ = kwargs.pop('experts', None)
  got, result = _stream(base, experts, moments, experts_=experts_, **kwargs)
  _assert_equal(got, in_memory(base, experts, moments))
  global_ffg = 'ffg' in kwargs and kwargs['ffg'].get('scope') != 'per_tensor'
  assert result.passes == (3 if global_ffg else 1)


def _sharding(mesh):
  def place(name, shape):
    del name
    spec = P('data', 'fsdp') if len(shape) == 2 and shape[1] % 4 == 0 else P()
    return NamedSharding(mesh, spec)

  return place


@pytest.mark.parametrize('case', ['ota_ffg_density', 'ties', 'dare'])
def test_sharded_stream_equals_single_device(case, mesh8):
  base, experts, moments = _problem(1)
  kwargs = dict(CASES[case][0])
  single, _ = _stream(base, experts, moments, **kwargs)
  sharded, _ = _stream(base, experts, moments, sharding=_sharding(mesh8), **kwargs)
  leaf = sharded['embed']
  assert isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) == 8
  _assert_equal(sharded, single)


def _values(rng, n):
  """Saliency-like values: decades apart, with zeros, -0.0 and ties."""
  s = (10.0 ** rng.uniform(-12, 3, size=n)).astype(np.float32)
  s[rng.uniform(size=n) < 0.1] = 0.0
  s[rng.uniform(size=n) < 0.05] = -0.0
  s[rng.uniform(size=n) < 0.1] = s[0]
  return s


@pytest.mark.parametrize('density', [0.0, 1e-4, 0.01, 0.3, 0.5, 0.97, 1.0])
def test_streamed_cutoff_matches_ffg_threshold_exactly(density):
  rng = np.random.default_rng(int(density * 1000))
  leaves = [_values(rng, n) for n in (5000, 1, 777, 20000)]
  want = merge.ffg_threshold([jnp.asarray(x) for x in leaves], density=density)
  cutoff = merge.StreamedCutoff(total=sum(x.size for x in leaves), density=density)
  while not cutoff.done:
    for x in reversed(leaves):  # any order
      cutoff.add(x)
    cutoff.end_pass()
  assert cutoff.threshold == want
  assert cutoff.passes == (0 if density == 0 else 2)


@pytest.mark.parametrize('mass', [0.1, 0.5, 0.9, 0.999])
def test_streamed_cutoff_mass_keeps_the_target_mass(mass):
  rng = np.random.default_rng(3)
  leaves = [_values(rng, n) for n in (3000, 4000)]
  cutoff = merge.StreamedCutoff(total=7000, mass=mass)
  while not cutoff.done:
    for x in leaves:
      cutoff.add(x)
    cutoff.end_pass()
  s = np.concatenate(leaves).astype(np.float64)
  t = cutoff.threshold
  total = s.sum()
  # The cutoff keeps the target mass, and the next larger value does not.
  assert s[s >= t].sum() >= mass * total * (1 - 1e-6)
  assert s[s > t].sum() < mass * total
  want = merge.ffg_threshold([jnp.asarray(x) for x in leaves], mass=mass)
  assert t == want


def test_filters_and_rules_match_manual_in_memory_merge():
  base, experts, moments = _problem(2)
  weights = [[{'filter': r'^head', 'value': 0.0}, {'value': 1.0}], 2.0, 3.0]
  got, result = _stream(
    base,
    experts,
    moments,
    method='linear',
    options={'weights': weights},
    exclude=[r'layers_0/b'],
    expert_exclude=[None, [r'embed'], None],
  )
  assert 'layers_0/b' not in result.merged
  np.testing.assert_array_equal(np.asarray(got['layers_0']['b']), np.asarray(base['layers_0']['b']))
  np.testing.assert_array_equal(
    np.asarray(got['head']),
    np.asarray(merge.linear([e['head'] for e in experts], weights=[0.0, 2.0, 3.0])),
  )
  np.testing.assert_array_equal(
    np.asarray(got['embed']),
    np.asarray(merge.linear([experts[0]['embed'], experts[2]['embed']], weights=[1.0, 3.0])),
  )
  np.testing.assert_array_equal(
    np.asarray(got['layers_0']['w']),
    np.asarray(merge.linear([e['layers_0']['w'] for e in experts], weights=[1.0, 2.0, 3.0])),
  )


def test_missing_and_mismatched_tensors_are_named():
  base, experts, moments = _problem()
  broken = dict(merge.TreeReader(experts[1]).read(merge.TreeReader(experts[1]).names))
  del broken['head']
  with pytest.raises(ValueError, match=r"expert 1.*'head'"):
    merge.merge_streaming(
      'linear', [merge.TreeReader(experts[0]), merge.TreeReader(broken)], merge.MemoryWriter()
    )
  broken['head'] = jnp.zeros((4, 8))
  with pytest.raises(ValueError, match=r"'head' has shape \(4, 8\)"):
    merge.merge_streaming(
      'linear', [merge.TreeReader(experts[0]), merge.TreeReader(broken)], merge.MemoryWriter()
    )
  with pytest.raises(ValueError, match='needs one second-moment reader'):
    merge.merge_streaming(
      'ota',
      [merge.TreeReader(e) for e in experts],
      merge.MemoryWriter(),
      base=merge.TreeReader(base),
    )
  with pytest.raises(ValueError, match="unknown method 'slerp'"):
    merge.merge_streaming('slerp', [merge.TreeReader(base)], merge.MemoryWriter())


def test_sampled_quantile_streams_in_two_passes_and_equals_in_memory():
  """ffg quantile='sampled' on a model big enough to be sampled: one pass for the cutoffs,
  one to merge, and the same merge as the in-memory `ota_ffg(quantile='sampled')`."""
  rng = np.random.default_rng(11)
  shapes = {'a': (300, 1024), 'b': (2000,), 'c': (64, 512)}
  base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  experts = [
    {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    for _ in range(2)
  ]
  moments = [
    {k: (rng.uniform(size=s) ** 4).astype(np.float32) for k, s in shapes.items()} for _ in range(2)
  ]
  got, result = _stream(
    base, experts, moments, method='ota', ffg={'density': [0.3, 0.1], 'quantile': 'sampled'}
  )
  assert result.passes == 2
  _assert_equal(got, merge.ota_ffg(base, experts, moments, density=[0.3, 0.1], quantile='sampled'))
  with pytest.raises(ValueError, match='median'):
    _stream(base, experts, moments, method='ota', ffg={'density': 0.3, 'quantile': 'median'})
