"""Merge invariants as hypothesis property tests on one small fixed shape.

Shapes are fixed so that each kernel compiles once; hypothesis varies the
values (including zeros, ties and sign cancellations).
"""

import itertools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import merge

SHAPE = (2, 3)
NUM = 3
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)

_weights = hnp.arrays(np.float32, SHAPE, elements=st.floats(-8, 8, width=32, allow_subnormal=False))
# Moments on a grid of quarters: zeros and ties, no near-cancellations.
_moments = hnp.arrays(np.float32, SHAPE, elements=st.integers(0, 64).map(lambda i: i / 4))


def _tree(x):
  return {'layer': {'w': jnp.asarray(x)}}


def _leaf(tree):
  return np.asarray(tree['layer']['w'], np.float64)


def _close(a, b):
  np.testing.assert_allclose(_leaf(a), _leaf(b), rtol=1e-5, atol=1e-5)


# name -> merge(base, experts, moments); all of them average task vectors, so
# one expert, or several identical ones, give that expert back. (DARE draws
# random masks; tests/merge/test_merge_operators.py checks it exactly.)
AVERAGING = {
  'linear': lambda b, es, vs: merge.linear(es),
  'task_arithmetic_mean': lambda b, es, vs: merge.task_arithmetic(b, es, weights=1.0 / len(es)),
  'ties': lambda b, es, vs: merge.ties(b, es, density=1.0),
  'fisher': lambda b, es, vs: merge.fisher(es, vs),
  'ota': lambda b, es, vs: merge.ota(b, es, vs),
  'ota_no_base': lambda b, es, vs: merge.ota(None, es, vs),
  'ota_rank1': lambda b, es, vs: merge.ota(b, es, [merge.rank1_compress(v) for v in vs]),
}


@pytest.mark.parametrize('name', sorted(AVERAGING))
@PROPERTY_SETTINGS
@given(base=_weights, expert=_weights, moments=st.lists(_moments, min_size=NUM, max_size=NUM))
def test_one_expert_or_identical_experts_return_that_expert(name, base, expert, moments):
  one = AVERAGING[name](_tree(base), [_tree(expert)], [_tree(moments[0])])
  _close(one, _tree(expert))
  identical = AVERAGING[name](_tree(base), [_tree(expert)] * NUM, [_tree(v) for v in moments])
  _close(identical, _tree(expert))


# name -> merge(base, experts, moments, masks, per-expert options); each
# per-expert option is permuted with the experts.
ORDER_FREE = {
  'linear': lambda b, es, vs, ms, o: merge.linear(es, weights=o['w']),
  'task_arithmetic': lambda b, es, vs, ms, o: merge.task_arithmetic(
    b, es, weights=o['w'], scale=0.7
  ),
  'ties': lambda b, es, vs, ms, o: merge.ties(b, es, density=o['d'], weights=o['w']),
  'fisher': lambda b, es, vs, ms, o: merge.fisher(es, vs, weights=o['w']),
  'ota_masks': lambda b, es, vs, ms, o: merge.ota(b, es, vs, masks=ms, scales=o['w']),
  'ota_no_base_mean': lambda b, es, vs, ms, o: merge.ota(
    None, es, vs, masks=ms, normalise='mean', power=0.25
  ),
}


@pytest.mark.parametrize('name', sorted(ORDER_FREE))
@PROPERTY_SETTINGS
@given(
  base=_weights,
  experts=st.lists(_weights, min_size=NUM, max_size=NUM),
  moments=st.lists(_moments, min_size=NUM, max_size=NUM),
  masks=st.lists(hnp.arrays(bool, SHAPE), min_size=NUM, max_size=NUM),
  order=st.permutations(range(NUM)),
)
def test_order_of_experts_does_not_matter(name, base, experts, moments, masks, order):
  options = {'w': [0.5, 1.0, 2.0], 'd': [0.2, 0.5, 1.0]}

  def run(idx):
    return ORDER_FREE[name](
      _tree(base),
      [_tree(experts[i]) for i in idx],
      [_tree(moments[i]) for i in idx],
      [_tree(masks[i]) for i in idx],
      {k: [v[i] for i in idx] for k, v in options.items()},
    )

  _close(run(list(order)), run(list(range(NUM))))


@PROPERTY_SETTINGS
@given(
  base=_weights,
  experts=st.lists(_weights, min_size=NUM, max_size=NUM),
  moment=_moments,
  power=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_ota_with_equal_moments_is_the_mean_task_vector(base, experts, moment, power):
  out = merge.ota(_tree(base), [_tree(e) for e in experts], [_tree(moment)] * NUM, power=power)
  mean_tau = np.mean([e.astype(np.float64) - base for e in experts], axis=0)
  np.testing.assert_allclose(_leaf(out), base + mean_tau, rtol=1e-5, atol=1e-5)


@PROPERTY_SETTINGS
@given(base=_weights, expert=_weights, moment=_moments)
def test_ffg_density_one_is_the_expert_and_zero_the_base(base, expert, moment):
  b, e, v = _tree(base), _tree(expert), _tree(moment)
  for scope, score in itertools.product(merge.SCOPES, merge.SCORES):
    for density, want in ((1.0, expert), (0.0, base)):
      mask = merge.ffg_mask(b, e, v, density=density, scope=scope, score=score)
      np.testing.assert_array_equal(
        np.asarray(merge.ffg_graft(b, e, mask)['layer']['w']),
        want,
        err_msg=f'{scope} {score} density {density}',
      )


@PROPERTY_SETTINGS
@given(
  rows=hnp.arrays(np.float32, SHAPE[0], elements=st.floats(0, 16, width=32)),
  cols=hnp.arrays(np.float32, SHAPE[1], elements=st.floats(0, 16, width=32)),
)
def test_rank1_of_a_rank1_moment_is_exact(rows, cols):
  v = np.outer(rows.astype(np.float64), cols).astype(np.float32)
  expanded = merge.rank1_expand(merge.rank1_compress(_tree(v)))
  np.testing.assert_allclose(_leaf(expanded), v, rtol=1e-5, atol=1e-6 * max(1.0, float(v.max())))
