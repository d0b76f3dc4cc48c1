"""D-Muon equals optax.contrib.muon(consistent_rms=0.2) on the same inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers as Dims
import pytest

from curvopt import optim

D, V, H = 8, 20, 2


def _normal(seed, shape):
  # numpy, not jax.random: each new jax.random shape costs a compilation.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params():
  seeds = iter(range(100))
  normal = lambda *s: _normal(next(seeds), s)  # noqa: E731
  return {
    'embed': {'embedding': normal(V, D)},
    'head': {'kernel': normal(D, V)},
    'final_norm': {'scale': 1 + normal(D)},
    'layers_0': {
      'attn': {'q': {'kernel': normal(D, H, D // H)}, 'o': {'kernel': normal(H, D // H, D)}},
      'mlp': {
        'up': {'kernel': normal(D, 3 * D)},
        'down': {'kernel': normal(3 * D, D)},
        'gate': {'kernel': normal(D, 3 * D)},
      },
      'attn_norm': {'scale': 1 + normal(D)},
    },
  }


def _optax_dims():
  """optax's muon tree: dims for hidden leaves, None (AdamW) elsewhere."""
  return {
    'embed': {'embedding': None},
    'head': {'kernel': None},
    'final_norm': {'scale': None},
    'layers_0': {
      'attn': {'q': {'kernel': Dims((0,), (1, 2))}, 'o': {'kernel': Dims((0, 1), (2,))}},
      'mlp': {n: {'kernel': Dims()} for n in ('up', 'down', 'gate')},
      'attn_norm': {'scale': None},
    },
  }


@pytest.mark.parametrize('nesterov', [True, False])
def test_update_equals_optax_muon_with_consistent_rms(nesterov):
  lr = optax.linear_schedule(0.05, 0.01, 3)
  reference = optax.contrib.muon(
    lr,
    beta=0.9,
    nesterov=nesterov,
    weight_decay=0.1,
    adam_weight_decay=0.05,
    adam_b1=0.8,
    adam_b2=0.95,
    consistent_rms=0.2,
    muon_weight_dimension_numbers=_optax_dims(),
  )
  ours = optim.dmuon(
    lr,
    beta=0.9,
    nesterov=nesterov,
    weight_decay=0.1,
    others=optax.adamw(lr, b1=0.8, b2=0.95, weight_decay=0.05, nesterov=nesterov),
    newton_schulz=optim.NewtonSchulz(dtype='float32'),
  )
  params = _params()
  ref_state, our_state = reference.init(params), ours.init(params)
  ref_update, our_update = jax.jit(reference.update), jax.jit(ours.update)
  for t in range(3):
    grads = jax.tree.map(lambda x, t=t: _normal(10 + t, x.shape), params)
    ref_u, ref_state = ref_update(grads, ref_state, params)
    our_u, our_state = our_update(grads, our_state, params)
    chex.assert_trees_all_close(our_u, ref_u, rtol=2e-5, atol=1e-7)
    params = optax.apply_updates(params, our_u)


def test_hidden_update_rms_is_consistent():
  # 0.2 * sqrt(max(d_in, d_out)) * polar(M) has RMS 0.2 for every shape.
  params = _params()
  opt = optim.dmuon(1.0, weight_decay=0.0, newton_schulz=optim.NewtonSchulz(polar='svd'))
  grads = jax.tree.map(lambda x: _normal(3, x.shape), params)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  for name in ('up', 'down', 'gate'):
    u = updates['layers_0']['mlp'][name]['kernel']
    np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(u**2))), 0.2, rtol=1e-4)
