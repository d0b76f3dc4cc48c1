"""The option objects: NewtonSchulz reaches every polar factor, and the
transformation of the leaves LANTON / D-Muon do not orthogonalize."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt import optim

NS = optim.NewtonSchulz
LR = 0.05


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params(seed=0):
  return {
    'embed': {'embedding': _normal(seed, (10, 4))},
    'layers_0': {
      'kernel': _normal(seed + 1, (4, 6)),
      'attn': {'kernel': _normal(seed + 2, (6, 6))},
      'bias': _normal(seed + 3, (6,)),
    },
    'head': {'kernel': _normal(seed + 4, (6, 10))},
  }


def _hidden(tree):
  return {'kernel': tree['layers_0']['kernel'], 'attn': tree['layers_0']['attn']['kernel']}


def _run(opt, steps=2, **kw):
  """Updates and final state of `steps` jit'd updates from _params()."""
  params = _params()
  state = opt.init(params)
  update = jax.jit(opt.update)
  out = []
  for t in range(steps):
    u, state = update(_params(10 + 10 * t), state, params, **kw)
    out.append(u)
  return out, state


# Each field moves the polar factors on its own (eps=1.0 shrinks Newton-Schulz'
# start far below unit norm, which 5 steps do not undo).
_CHANGES = [
  dict(steps=1),
  dict(coeffs=(1.5, -0.5, 0.0)),
  dict(dtype='bfloat16'),
  dict(eps=1.0),
  dict(polar='svd'),
]


@pytest.mark.parametrize('change', _CHANGES, ids=lambda c: next(iter(c)))
def test_newton_schulz_reaches_lanton_direction_and_noise(change):
  ns = NS(**change)
  default, default_state = _run(optim.lanton(LR))
  ours, ours_state = _run(optim.lanton(LR, newton_schulz=ns))
  assert not np.allclose(_hidden(ours[-1])['kernel'], _hidden(default[-1])['kernel'])
  # The noise estimate's nuclear norms use it too (noise_ns_steps=None).
  h0 = optim.lanton_stats(default_state)['h']['layers_0/kernel']
  h1 = optim.lanton_stats(ours_state)['h']['layers_0/kernel']
  assert float(h0) != float(h1)
  # lanton is -LR times scale_by_lanton with the same options on the matrix
  # leaves (the vector leaf is AdamW's, a group of its own in the core).
  core, core_state = _run(optim.scale_by_lanton(weight_decay=0.1, newton_schulz=ns))
  for ours_u, core_u in zip(ours, core):
    for tree in (_hidden, lambda t: t['embed'], lambda t: t['head']):
      chex.assert_trees_all_close(
        tree(ours_u), jax.tree.map(lambda x: -LR * x, tree(core_u)), rtol=1e-6, atol=1e-7
      )
  chex.assert_trees_all_equal(
    optim.lanton_stats(ours_state)['h']['layers_0/kernel'],
    optim.lanton_stats(core_state)['h']['layers_0/kernel'],
  )


@pytest.mark.parametrize('change', _CHANGES, ids=lambda c: next(iter(c)))
def test_newton_schulz_reaches_dmuon(change):
  ns = NS(**change)
  default, _ = _run(optim.dmuon(LR))
  ours, _ = _run(optim.dmuon(LR, newton_schulz=ns))
  assert not np.allclose(_hidden(ours[-1])['kernel'], _hidden(default[-1])['kernel'])
  # The hidden leaves are scale_by_dmuon's, with the same options.
  core = optim.scale_by_dmuon(newton_schulz=ns)
  params = _hidden(_params())
  state = core.init(params)
  for t, u in enumerate(ours):
    expected, state = jax.jit(core.update)(_hidden(_params(10 + 10 * t)), state, params)
    expected = jax.tree.map(lambda e, x: -LR * (e + 0.1 * x), expected, params)
    chex.assert_trees_all_close(_hidden(u), expected, rtol=1e-5, atol=1e-7)


def test_newton_schulz_reaches_the_spectral_lmo_and_the_batched_calls():
  x = _normal(5, (6, 9))
  ns = NS(steps=2, coeffs=(1.5, -0.5, 0.0), dtype='float32', eps=1e-3)
  expected = optim.newton_schulz(x, steps=2, coeffs=(1.5, -0.5, 0.0), eps=1e-3)
  chex.assert_trees_all_close(
    optim.spectral(newton_schulz=ns).direction(x), -np.sqrt(9 / 6) * expected, rtol=1e-6
  )
  (stack,) = optim.orthogonalize_many([x[None]], newton_schulz=ns)
  chex.assert_trees_all_close(stack[0], expected, rtol=1e-6)
  (norm,) = optim.nuclear_norms_many([x[None]], newton_schulz=ns)
  np.testing.assert_allclose(float(norm), float(jnp.sum(x * expected)), rtol=1e-5)


def test_default_vector_and_others_are_adamw():
  # The defaults are optax.adamw at the optimizer's rate and weight decay:
  # bit for bit given explicitly; on its own (not under a partition) XLA may
  # fuse it differently, to within float rounding.
  default, _ = _run(optim.lanton(LR))
  explicit, _ = _run(optim.lanton(LR, vector=optax.adamw(LR, b2=0.95, weight_decay=0.1)))
  chex.assert_trees_all_equal(default, explicit)
  adam, _ = _run(optax.adamw(LR, b2=0.95, weight_decay=0.1))
  for d, a in zip(default, adam):
    chex.assert_trees_all_close(d['layers_0']['bias'], a['layers_0']['bias'], rtol=1e-6)
  default, _ = _run(optim.dmuon(LR))
  explicit, _ = _run(optim.dmuon(LR, others=optax.adamw(LR, b2=0.95, weight_decay=0.1)))
  chex.assert_trees_all_equal(default, explicit)
  for d, a in zip(default, adam):
    for path in ('embed', 'head'):
      chex.assert_trees_all_close(d[path], a[path], rtol=1e-6)
    chex.assert_trees_all_close(d['layers_0']['bias'], a['layers_0']['bias'], rtol=1e-6)


def test_custom_transformation_takes_the_non_matrix_leaves():
  grads = [_params(10 + 10 * t) for t in range(2)]
  lanton_default, _ = _run(optim.lanton(LR))
  lanton_sgd, _ = _run(optim.lanton(LR, vector=optax.sgd(0.5)))
  dmuon_default, _ = _run(optim.dmuon(LR))
  dmuon_sgd, _ = _run(optim.dmuon(LR, others=optax.sgd(0.5)))
  for t, g in enumerate(grads):
    chex.assert_trees_all_close(
      lanton_sgd[t]['layers_0']['bias'], -0.5 * g['layers_0']['bias'], rtol=1e-6
    )
    for path in ('embed', 'head'):
      chex.assert_trees_all_equal(lanton_sgd[t][path], lanton_default[t][path])
      chex.assert_trees_all_close(
        dmuon_sgd[t][path], jax.tree.map(lambda x: -0.5 * x, g[path]), rtol=1e-6
      )
    chex.assert_trees_all_equal(_hidden(lanton_sgd[t]), _hidden(lanton_default[t]))
    chex.assert_trees_all_equal(_hidden(dmuon_sgd[t]), _hidden(dmuon_default[t]))


_BAD_NS = [
  (NS(dtype='fp8'), ValueError, "'fp8'"),
  (NS(sharding='sideways'), ValueError, "'sideways'"),
  (NS(polar='qr'), ValueError, "'qr'"),
  (NS(steps=-1), ValueError, '-1'),
  (NS(steps=2.5), TypeError, '2.5'),
  (NS(coeffs=(1.0, 2.0)), ValueError, r'\(1.0, 2.0\)'),
  ({'steps': 5}, TypeError, "{'steps': 5}"),
]
_TAKERS = {
  'lanton': lambda ns: optim.lanton(0.1, newton_schulz=ns),
  'scale_by_lanton': lambda ns: optim.scale_by_lanton(newton_schulz=ns),
  'dmuon': lambda ns: optim.dmuon(0.1, newton_schulz=ns),
  'scale_by_dmuon': lambda ns: optim.scale_by_dmuon(newton_schulz=ns),
  'spectral': lambda ns: optim.spectral(newton_schulz=ns),
}


@pytest.mark.parametrize('taker', sorted(_TAKERS))
@pytest.mark.parametrize('bad, error, match', _BAD_NS)
def test_bad_newton_schulz_raises_naming_the_value(taker, bad, error, match):
  with pytest.raises(error, match=match):
    _TAKERS[taker](bad)


@pytest.mark.parametrize(
  'make, error, match',
  [
    (lambda: optim.lanton(0.1, vector='rms'), ValueError, "unknown vector option 'rms'"),
    (lambda: optim.lanton(0.1, vector=42), TypeError, '42'),
    (
      lambda: optim.lanton(0.1, vector=optax.sgd(0.1), group_lr_scales={'vector': 0.2}),
      ValueError,
      r"group_lr_scales\['vector'\].*bias_rms",
    ),
    (lambda: optim.dmuon(0.1, others='adamw'), TypeError, "'adamw'"),
  ],
)
def test_bad_non_matrix_transformation_raises(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_noise_ns_steps_traced_under_inject_hyperparams():
  # A numeric option, so optax traces it: the estimate's Newton-Schulz runs
  # in a fori_loop over the traced steps, the rest of NewtonSchulz stays static.
  wrapped = optax.inject_hyperparams(optim.lanton)(learning_rate=LR, noise_ns_steps=2)
  bare = optim.lanton(LR, noise_ns_steps=2)
  _, wrapped_state = _run(wrapped, steps=3)
  _, bare_state = _run(bare, steps=3)
  assert wrapped_state.hyperparams['noise_ns_steps'].dtype == jnp.int32
  chex.assert_trees_all_close(
    optim.lanton_stats(wrapped_state), optim.lanton_stats(bare_state), rtol=1e-5
  )
