"""Bad input raises a ValueError (or TypeError) naming the leaf or the value."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import merge


def _problem(num=2):
  rng = np.random.default_rng(0)

  def tree(make):
    return {
      'layer': {
        'w': jnp.asarray(make(size=(2, 3)), jnp.float32),
        'b': jnp.asarray(make(size=(3,)), jnp.float32),
      }
    }

  base = tree(rng.normal)
  experts = [tree(rng.normal) for _ in range(num)]
  moments = [tree(rng.uniform) for _ in range(num)]
  return base, experts, moments


# name -> (merge(base, experts, moments), whether it reads second moments).
# Single-expert operators (FFG) take the last expert, which the cases corrupt.
OPERATORS = {
  'linear': (lambda b, es, vs: merge.linear(es), False),
  'task_arithmetic': (lambda b, es, vs: merge.task_arithmetic(b, es), False),
  'ties': (lambda b, es, vs: merge.ties(b, es, density=0.5), False),
  'dare': (lambda b, es, vs: merge.dare(b, es, drop=0.5, key=jax.random.key(0)), False),
  'fisher': (lambda b, es, vs: merge.fisher(es, vs), True),
  'ota': (lambda b, es, vs: merge.ota(b, es, vs), True),
  'ota_no_base': (lambda b, es, vs: merge.ota(None, es, vs), True),
  'ota_rank1': (lambda b, es, vs: merge.ota(b, es, [merge.rank1_compress(v) for v in vs]), True),
  'ffg_mask': (lambda b, es, vs: merge.ffg_mask(b, es[-1], vs[-1], density=0.5), True),
  'ffg_mask_per_tensor': (
    lambda b, es, vs: merge.ffg_mask(b, es[-1], vs[-1], density=0.5, scope='per_tensor'),
    True,
  ),
  'ffg_graft': (
    lambda b, es, vs: merge.ffg_graft(b, es[-1], jax.tree.map(lambda x: x > 0, b)),
    False,
  ),
  'ota_ffg': (lambda b, es, vs: merge.ota_ffg(b, es, vs, density=0.5), True),
  # Moment checks screen the merged output for non-finite entries: powers
  # where v^p is finite for v < 0, normalisation, and all-masked entries.
  'ota_power1': (lambda b, es, vs: merge.ota(b, es, vs, power=1.0), True),
  'ota_power2_mean': (lambda b, es, vs: merge.ota(b, es, vs, power=2.0, normalise='mean'), True),
  'ota_all_masked': (
    lambda b, es, vs: merge.ota(b, es, vs, masks=[jax.tree.map(lambda x: x > np.inf, b)] * len(es)),
    True,
  ),
  'ota_ffg_keep_none': (lambda b, es, vs: merge.ota_ffg(b, es, vs, threshold=1e30), True),
}
MOMENT_OPERATORS = sorted(n for n, (_, uses) in OPERATORS.items() if uses)


def _set(tree, name, value):
  tree = copy.deepcopy(tree)
  tree['layer'][name] = value
  return tree


def _without(tree, name):
  tree = copy.deepcopy(tree)
  del tree['layer'][name]
  return tree


# case -> (corrupt(experts) -> experts, text the error must contain)
EXPERT_CASES = {
  'missing_leaf': (lambda es: es[:-1] + [_without(es[-1], 'b')], 'layer/b'),
  'extra_leaf': (lambda es: es[:-1] + [_set(es[-1], 'extra', jnp.ones(2))], 'layer/extra'),
  'shape': (lambda es: es[:-1] + [_set(es[-1], 'w', jnp.ones((3, 2)))], 'layer/w'),
  'dtype': (lambda es: es[:-1] + [_set(es[-1], 'w', jnp.ones((2, 3), jnp.bfloat16))], 'layer/w'),
}


@pytest.mark.parametrize('case', sorted(EXPERT_CASES))
@pytest.mark.parametrize('name', sorted(OPERATORS))
def test_mismatched_experts_name_the_leaf(name, case):
  base, experts, moments = _problem()
  corrupt, text = EXPERT_CASES[case]
  operator, _ = OPERATORS[name]
  with pytest.raises(ValueError, match=text):
    operator(base, corrupt(experts), moments)


@pytest.mark.parametrize('name', sorted(n for n in OPERATORS if not n.startswith('ffg')))
def test_fewer_than_one_expert(name):
  """(FFG takes exactly one expert, not a list.)"""
  base, _, _ = _problem()
  operator, _ = OPERATORS[name]
  with pytest.raises(ValueError, match='at least one expert'):
    operator(base, [], [])


def _moment_cases():
  bad = np.ones((2, 3), np.float32)
  negative, nan, inf = bad.copy(), bad.copy(), bad.copy()
  negative[1, 2], nan[0, 0], inf[0, 1] = -1.0, np.nan, np.inf
  return {
    'missing': (lambda vs: vs[:-1] + [_without(vs[-1], 'w')], 'layer/w'),
    'none_leaf': (lambda vs: vs[:-1] + [_set(vs[-1], 'w', None)], 'layer/w'),
    'shape': (lambda vs: vs[:-1] + [_set(vs[-1], 'w', jnp.ones((6,)))], 'layer/w'),
    'negative': (lambda vs: vs[:-1] + [_set(vs[-1], 'w', negative)], 'layer/w'),
    'nan': (lambda vs: vs[:-1] + [_set(vs[-1], 'w', nan)], 'layer/w'),
    'inf': (lambda vs: vs[:-1] + [_set(vs[-1], 'w', inf)], 'layer/w'),
  }


MOMENT_CASES = _moment_cases()


@pytest.mark.parametrize('case', sorted(MOMENT_CASES))
@pytest.mark.parametrize('name', MOMENT_OPERATORS)
def test_bad_second_moments_name_the_leaf(name, case):
  base, experts, moments = _problem()
  corrupt, text = MOMENT_CASES[case]
  operator, _ = OPERATORS[name]
  with pytest.raises(ValueError, match=text):
    operator(base, experts, corrupt(moments))


@pytest.mark.parametrize('name', ['ota', 'ota_ffg'])
def test_non_finite_experts_with_valid_moments_do_not_raise(name):
  """The moment check's screen also fires on a NaN expert; the exact check
  behind it then finds the moments valid: NaN out, as the inputs give."""
  base, experts, moments = _problem()
  expert = np.asarray(experts[-1]['layer']['w']).copy()
  expert[0, 1] = np.nan
  operator, _ = OPERATORS[name]
  out = operator(base, experts[:-1] + [_set(experts[-1], 'w', expert)], moments)
  w = np.asarray(out['layer']['w'])
  assert np.isfinite(np.delete(w.ravel(), 1)).all()
  if name == 'ota':  # (FFG's mask drops the NaN task-vector entry)
    assert np.isnan(w[0, 1])


def test_wrong_number_of_moments():
  base, experts, moments = _problem()
  with pytest.raises(ValueError, match='1 trees for 2 experts'):
    merge.ota(base, experts, moments[:1])


def test_bad_rank1_factors_name_the_leaf():
  base, experts, moments = _problem()
  factors = [merge.rank1_compress(v) for v in moments]
  wrong = merge.Rank1(jnp.ones(3), jnp.ones(2), jnp.asarray(6.0))
  with pytest.raises(ValueError, match='layer/w'):
    merge.ota(base, experts, factors[:-1] + [_set(factors[-1], 'w', wrong)])
  negative = merge.Rank1(jnp.asarray([1.0, -1.0]), jnp.ones(3), jnp.asarray(0.0))
  with pytest.raises(ValueError, match='layer/w.*negative or non-finite'):
    merge.ota(base, experts, factors[:-1] + [_set(factors[-1], 'w', negative)])
  with pytest.raises(ValueError, match='layer/b'):
    merge.ota(
      base,
      experts,
      factors[:-1]
      + [_set(factors[-1], 'b', merge.Rank1(jnp.ones(3), jnp.ones(1), jnp.asarray(3.0)))],
    )


@pytest.mark.parametrize('density', [-0.1, 1.5, float('nan')])
def test_density_or_mass_outside_unit_interval(density):
  base, experts, moments = _problem()
  calls = [
    lambda: merge.ties(base, experts, density=density),
    lambda: merge.ties(base, experts, density=[0.5, density]),
    lambda: merge.ffg_mask(base, experts[0], moments[0], density=density),
    lambda: merge.ffg_mask(base, experts[0], moments[0], density=density, scope='per_tensor'),
    lambda: merge.ffg_mask(base, experts[0], moments[0], mass=density),
    lambda: merge.ffg_threshold([jnp.ones(3)], density=density),
    lambda: merge.ffg_threshold([jnp.ones(3)], mass=density),
    lambda: merge.ota_ffg(base, experts, moments, density=[0.5, density]),
  ]
  for call in calls:
    with pytest.raises(ValueError, match=str(density)):
      call()


# name -> call with a bad option, text the error must contain
BAD_OPTIONS = {
  'drop_one': (lambda b, es, vs: merge.dare(b, es, drop=1.0, key=jax.random.key(0)), '1.0'),
  'combine': (
    lambda b, es, vs: merge.dare(b, es, drop=0.1, key=jax.random.key(0), combine='mean'),
    'mean',
  ),
  'weights_length': (lambda b, es, vs: merge.linear(es, weights=[1.0]), r'\[1.0\]'),
  'weights_zero_sum': (lambda b, es, vs: merge.linear(es, weights=[1.0, -1.0]), r'\[1.0, -1.0\]'),
  'power': (lambda b, es, vs: merge.ota(b, es, vs, power=0.0), 'power'),
  'eps': (lambda b, es, vs: merge.ota(b, es, vs, eps=-1e-8), 'eps'),
  'normalise': (lambda b, es, vs: merge.ota(b, es, vs, normalise='global'), 'global'),
  'bias_correction': (
    lambda b, es, vs: merge.ota(b, es, vs, bias_correction=[(0.999, 0), (0.999, 10)]),
    'count',
  ),
  'masks_count': (
    lambda b, es, vs: merge.ota(b, es, vs, masks=[jax.tree.map(lambda x: x > 0, b)]),
    'per expert',
  ),
  'mask_shape': (
    lambda b, es, vs: merge.ota(
      b, es, vs, masks=[None, _set(jax.tree.map(lambda x: x > 0, b), 'w', jnp.ones((3, 2), bool))]
    ),
    'layer/w',
  ),
  'mask_missing': (
    lambda b, es, vs: merge.ffg_graft(b, es[0], _without(jax.tree.map(lambda x: x > 0, b), 'b')),
    'layer/b',
  ),
  'density_and_threshold': (
    lambda b, es, vs: merge.ffg_mask(b, es[0], vs[0], density=0.5, threshold=1.0),
    'exactly one',
  ),
  'no_selector': (lambda b, es, vs: merge.ffg_mask(b, es[0], vs[0]), 'exactly one'),
  'threshold_nan': (
    lambda b, es, vs: merge.ffg_mask(b, es[0], vs[0], threshold=float('nan')),
    'nan',
  ),
  'scope': (lambda b, es, vs: merge.ffg_mask(b, es[0], vs[0], density=0.5, scope='layer'), 'layer'),
  'score': (
    lambda b, es, vs: merge.ffg_mask(b, es[0], vs[0], density=0.5, score='hessian'),
    'hessian',
  ),
  'fisher_score_needs_moment': (
    lambda b, es, vs: merge.ffg_mask(b, es[0], None, density=0.5),
    'second_moment',
  ),
  'ota_ffg_no_base': (lambda b, es, vs: merge.ota_ffg(None, es, vs, density=0.5), 'base'),
  'ota_ffg_no_selector': (lambda b, es, vs: merge.ota_ffg(b, es, vs), 'exactly one'),
  'ota_ffg_quantile': (
    lambda b, es, vs: merge.ota_ffg(b, es, vs, density=0.5, quantile='median'),
    'median',
  ),
  'ota_ffg_thresholds': (
    lambda b, es, vs: merge.ota_ffg(b, es, vs, threshold=[1.0, 2.0, 3.0]),
    'threshold',
  ),
}


@pytest.mark.parametrize('name', sorted(BAD_OPTIONS))
def test_bad_options_hold_the_value(name):
  base, experts, moments = _problem()
  call, text = BAD_OPTIONS[name]
  with pytest.raises(ValueError, match=text):
    call(base, experts, moments)


def test_non_floating_leaf_is_a_type_error():
  base, experts, _ = _problem()
  with pytest.raises(TypeError, match='layer/b'):
    merge.linear([_set(e, 'b', jnp.ones(3, jnp.int32)) for e in experts])


def test_leaf_cores_name_the_leaf_they_are_given():
  base, experts, moments = _problem()
  v = np.array(moments[0]['layer']['w'])
  v[0, 0] = -1.0
  with pytest.raises(ValueError, match='blocks.3.q'):
    merge.ota_leaf(base['layer']['w'], [experts[0]['layer']['w']], [v], name='blocks.3.q')
  with pytest.raises(ValueError, match='blocks.3.q'):
    merge.ties_leaf(base['layer']['w'], [experts[0]['layer']['b']], density=0.5, name='blocks.3.q')


def test_estimate_fisher_needs_examples():
  with pytest.raises(ValueError, match='at least one example'):
    merge.estimate_fisher(lambda p, x: jnp.sum(p * x), jnp.ones(2), [])
  with pytest.raises(ValueError, match='disagree'):
    merge.estimate_fisher(
      lambda p, x: jnp.sum(p * x['a']), jnp.ones(2), [{'a': jnp.ones((3, 2)), 'b': jnp.ones((2,))}]
    )


def _streamed(method='ota', **kwargs):
  def run(b, es, vs):
    return merge.merge_streaming(
      method,
      [merge.TreeReader(e) for e in es],
      merge.MemoryWriter(),
      base=merge.TreeReader(b),
      moments=[merge.TreeReader(v) for v in vs],
      **kwargs,
    )

  return run


# Every path that reads an expert's second moment for FFG, in memory and streamed.
FFG_PATHS = {
  'ota_ffg_density': lambda b, es, vs: merge.ota_ffg(b, es, vs, density=0.5),
  'ota_ffg_threshold': lambda b, es, vs: merge.ota_ffg(b, es, vs, threshold=0.1),
  'stream_global_density': _streamed(ffg={'density': 0.5}),
  'stream_sampled_density': _streamed(ffg={'density': 0.5, 'quantile': 'sampled'}),
  'stream_global_mass': _streamed(ffg={'mass': 0.5}),
  'stream_per_tensor': _streamed(ffg={'density': 0.5, 'scope': 'per_tensor'}),
  'stream_threshold': _streamed(ffg={'threshold': 0.1}),
  'stream_rank1': _streamed(ffg={'density': 0.5}, rank1=True),
  'stream_magnitude_ffg_ota': _streamed(ffg={'density': 0.5, 'score': 'magnitude'}),
}


@pytest.mark.parametrize('position', [0, 1, 2])
@pytest.mark.parametrize('path', sorted(FFG_PATHS))
def test_ffg_paths_name_the_expert_with_a_nan_moment(path, position):
  base, experts, moments = _problem(num=3)
  v = np.array(moments[position]['layer']['w'])
  v[1, 1] = np.nan
  moments[position] = _set(moments[position], 'w', jnp.asarray(v))
  with pytest.raises(ValueError, match=f"of expert {position} at leaf 'layer/w'"):
    FFG_PATHS[path](base, experts, moments)
