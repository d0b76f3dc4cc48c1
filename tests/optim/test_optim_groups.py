"""Parameter groups, label overrides, and matrix views of n-D weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import optim

D, V, H = 8, 24, 2


def _normal(seed, shape):
  # numpy, not jax.random: each new jax.random shape costs a compilation.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _decoder_shapes(tied=False):
  """Shapes of the reference decoder's parameter tree (2 layers)."""
  tree = {'embed': {'embedding': (V, D)}, 'final_norm': {'scale': (D,)}}
  if not tied:
    tree['head'] = {'kernel': (D, V)}
  for i in range(2):
    tree[f'layers_{i}'] = {
      'attn': {n: {'kernel': (D, D)} for n in 'qkvo'},
      'mlp': {
        n: {'kernel': (D, 4 * D) if n != 'down' else (4 * D, D)} for n in ('gate', 'up', 'down')
      },
      'attn_norm': {'scale': (D,)},
      'mlp_norm': {'scale': (D,)},
    }
  return tree


def _zeros(shapes):
  return jax.tree.map(jnp.zeros, shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_default_groups_of_the_reference_decoder():
  labels = optim.param_groups(_zeros(_decoder_shapes()))
  assert labels['embed']['embedding'] == 'embed_head'
  assert labels['head']['kernel'] == 'embed_head'
  assert labels['final_norm']['scale'] == 'vector'
  for i in range(2):
    layer = labels[f'layers_{i}']
    assert {layer['attn'][n]['kernel'] for n in 'qkvo'} == {'hidden'}
    assert {layer['mlp'][n]['kernel'] for n in ('gate', 'up', 'down')} == {'hidden'}
    assert layer['attn_norm']['scale'] == layer['mlp_norm']['scale'] == 'vector'


def test_tied_model_has_no_head_and_nd_kernels_are_hidden():
  params = _zeros(_decoder_shapes(tied=True))
  params['layers_0']['attn']['q']['kernel'] = jnp.zeros((D, H, D // H))
  labels = optim.param_groups(params)
  assert 'head' not in labels
  assert labels['layers_0']['attn']['q']['kernel'] == 'hidden'
  counts = {g: 0 for g in optim.GROUPS}
  for label in jax.tree.leaves(labels):
    counts[label] += 1
  assert counts == {'hidden': 14, 'embed_head': 1, 'vector': 5}


def test_names_match_whole_components_only():
  params = {
    'num_heads_proj': {'kernel': jnp.zeros((4, 4))},
    'lm_head': {'kernel': jnp.zeros((4, 8))},
  }
  labels = optim.param_groups(params)
  assert labels == {'num_heads_proj': {'kernel': 'hidden'}, 'lm_head': {'kernel': 'embed_head'}}


def _overrides(params):
  """The same override given as a callable and as a label tree."""

  def fn(p):
    labels = optim.param_groups(p)
    labels['final_norm']['scale'] = 'hidden'  # nonsense on purpose: rank 1
    return labels

  return fn, fn(params)


@pytest.mark.parametrize('form', ['callable', 'tree'])
@pytest.mark.parametrize('make', [optim.dmuon, optim.lanton])
def test_label_overrides_are_used_and_checked(form, make):
  params = _zeros(_decoder_shapes())
  fn, tree = _overrides(params)
  labels = fn if form == 'callable' else tree
  # 'hidden' on a 1-D leaf: a matrix LMO cannot take it; the error names it.
  with pytest.raises(ValueError, match='final_norm/scale'):
    opt = make(0.1, param_labels=labels)
    state = opt.init(params)
    opt.update(params, state, params)
  bad = optim.param_groups(params)
  bad['layers_1']['mlp']['up']['kernel'] = 'hiden'
  with pytest.raises(ValueError, match=r"'hiden'.*layers_1/mlp/up/kernel"):
    make(0.1, param_labels=bad).init(params)


def test_override_moves_a_matrix_to_adam():
  params = _zeros(_decoder_shapes())
  labels = optim.param_groups(params)
  labels['layers_0']['attn']['q']['kernel'] = 'vector'
  state = optim.dmuon(0.1, param_labels=labels).init(params)
  adam_mu = state.inner_states['adam'][0][0].mu
  assert adam_mu['layers_0']['attn']['q']['kernel'].shape == (D, D)
  assert not jax.tree.leaves(adam_mu['layers_0']['attn']['k'])  # masked


@pytest.mark.parametrize(
  'shape, reduction, output',
  [
    ((8, 8), (0,), (1,)),
    ((16, 2, 8), (0,), (1, 2)),  # q/k/v kernel [d, heads, head_dim]
    ((2, 8, 16), (0, 1), (2,)),  # o kernel [heads, head_dim, d]
    ((3, 3, 4, 32), (0, 1, 2), (3,)),  # conv [kh, kw, c_in, c_out]
  ],
)
def test_default_dimension_numbers(shape, reduction, output):
  dims = optim.default_dimension_numbers(shape)
  assert tuple(dims.reduction_axis) == reduction
  assert tuple(dims.output_axis) == output


def test_dimension_numbers_override_changes_the_view():
  # [layers, d_in, d_out] stacked kernels: batch axis 0 with explicit dims.
  w = _normal(1, (3, 4, 12))
  params = {'stack': {'kernel': w}}
  dims = optim.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
  grads = {'stack': {'kernel': w}}

  def step(**kw):
    opt = optim.dmuon(
      1.0, weight_decay=0.0, nesterov=False, newton_schulz=optim.NewtonSchulz(polar='svd'), **kw
    )
    return opt.update(grads, opt.init(params), params)[0]['stack']['kernel']

  batched = np.asarray(step(weight_dimension_numbers={'stack': {'kernel': dims}}))
  # Each [4, 12] slice is its own matrix: -0.2 sqrt(12) * polar(slice).
  for i in range(3):
    u, _, vh = np.linalg.svd(np.asarray(w[i]), full_matrices=False)
    np.testing.assert_allclose(batched[i], -0.2 * np.sqrt(12) * u @ vh, rtol=1e-4, atol=1e-5)
  # The default rule would have flattened it to one [12, 12] matrix.
  assert not np.allclose(np.asarray(step()), batched, atol=1e-3)


def test_bad_dimension_numbers_name_the_leaf():
  params = {'a': {'kernel': jnp.zeros((4, 4))}}
  dims = {'a': {'kernel': optim.MuonDimensionNumbers(0, 0)}}
  opt = optim.dmuon(0.1, weight_dimension_numbers=dims)
  with pytest.raises(ValueError, match="'a/kernel'"):
    opt.update(params, opt.init(params), params)
