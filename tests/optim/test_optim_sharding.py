"""On the fake 8-device mesh: sharded updates equal unsharded ones, and the
batched Newton-Schulz needs few collectives."""

import collections
import functools
import re

import chex
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from curvopt import optim

D, V = 8, 24
_COLLECTIVE = re.compile(
  r'\s(all-gather|all-reduce|reduce-scatter|all-to-all'
  r'|collective-permute)(?:-start)?\('
)


def _collectives(compiled_text):
  return collections.Counter(
    m.group(1) for line in compiled_text.splitlines() for m in [_COLLECTIVE.search(line)] if m
  )


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params(seed=0):
  shapes = {
    'embed': {'embedding': (V, D)},
    'head': {'kernel': (D, V)},
    'final_norm': {'scale': (D,)},
    'layers_0': {
      'attn': {'q': {'kernel': (D, 2, D // 2)}, 'o': {'kernel': (D, D)}},
      'mlp': {'up': {'kernel': (D, 4 * D)}, 'down': {'kernel': (4 * D, D)}},
      'attn_norm': {'scale': (D,)},
    },
  }
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.unflatten(treedef, [_normal(seed + i, s) for i, s in enumerate(leaves)])


def _fsdp(tree, mesh):
  """FSDP: the leading axis over 'fsdp' where it divides, else replicated."""
  return jax.tree.map(
    lambda x: jax.device_put(
      x, NamedSharding(mesh, P('fsdp') if x.ndim > 1 and x.shape[0] % 4 == 0 else P())
    ),
    tree,
  )


def _fp32(sharding='batch'):
  return optim.NewtonSchulz(dtype='float32', sharding=sharding)


_OPTIMIZERS = {
  'dmuon': lambda s: optim.dmuon(0.1, newton_schulz=_fp32(s)),
  'lanton': lambda s: optim.lanton(0.1, newton_schulz=_fp32(s)),
  # min_ratio: after the second step every leaf has a sample and non-trivial factors.
  'dmuon_noise': lambda s: optim.noise_adaptive(
    optim.dmuon(0.1, newton_schulz=_fp32(s)), mapping='min_ratio', newton_schulz=_fp32(s)
  ),
}


def _two_steps(opt, params, grads_seq):
  update = jax.jit(opt.update)
  state = opt.init(params)
  for grads in grads_seq:
    updates, state = update(grads, state, params)
  return updates


@functools.lru_cache(maxsize=None)
def _unsharded(name):
  """The reference: the same steps without a mesh (computed once)."""
  return _two_steps(_OPTIMIZERS[name]('batch'), _params(), [_params(10), _params(20)])


def _spec(x):
  spec = tuple(x.sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def _check_sharded(name, ns_sharding, mesh):
  params = _fsdp(_params(), mesh)
  got = _two_steps(
    _OPTIMIZERS[name](ns_sharding), params, [_fsdp(_params(seed), mesh) for seed in (10, 20)]
  )
  chex.assert_trees_all_close(got, _unsharded(name), rtol=1e-4, atol=1e-6)
  for (path, a), p in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(params)):
    # Updates laid out like the params.
    assert _spec(a) == _spec(p), jax.tree_util.keystr(path)


# The layout strategies are shared code (orthogonalize_many): all of them on
# D-Muon, LANTON and noise_adaptive(D-Muon) on the default.
@pytest.mark.parametrize(
  'name, ns_sharding',
  [
    ('dmuon', 'batch'),
    ('dmuon', 'replicated'),
    ('dmuon', 'none'),
    ('lanton', 'batch'),
    ('dmuon_noise', 'batch'),
  ],
)
def test_sharded_update_equals_unsharded(mesh8, name, ns_sharding):
  _check_sharded(name, ns_sharding, mesh8)


def _auto_mesh(mesh8):
  return jax.make_mesh(
    (2, 4), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2, devices=mesh8.devices.reshape(-1)
  )


def test_auto_axes_mesh_equals_unsharded(mesh8):
  _check_sharded('dmuon', 'batch', _auto_mesh(mesh8))


def _hidden_only(n, mesh):
  """n FSDP-sharded [16, 32] hidden matrices and their gradients."""
  params = {f'layers_{i}': {'kernel': _normal(i, (16, 32))} for i in range(n)}
  return _fsdp(params, mesh), _fsdp(jax.tree.map(lambda x: 2 * x, params), mesh)


def _count(opt, params, grads):
  state = opt.init(params)
  text = jax.jit(opt.update).lower(grads, state, params).compile().as_text()
  return _collectives(text)


def test_batched_newton_schulz_needs_fewer_collectives(mesh8):
  n = 4
  # Auto axes: optax's per-matrix Newton-Schulz lets XLA place collectives
  # inside every iteration; one laid-out stack needs a handful in all.
  params, grads = _hidden_only(n, _auto_mesh(mesh8))
  before = _count(optax.contrib.muon(0.1), params, grads)
  after = _count(optim.dmuon(0.1, newton_schulz=_fp32()), params, grads)
  assert sum(after.values()) < sum(before.values()) / 4, (before, after)
  # Explicit axes, 'replicated': exactly one all-gather per matrix.
  params, grads = _hidden_only(n, mesh8)
  replicated = _count(optim.dmuon(0.1, newton_schulz=_fp32('replicated')), params, grads)
  assert replicated == {'all-gather': n}, replicated


@pytest.mark.parametrize('name', sorted(optim.LMO_NAMES))
def test_lmos_on_sharded_matrices(mesh8, name):
  oracle = optim.lmo(name)
  g = _normal(5, (16, 24))
  gs = jax.device_put(g, NamedSharding(mesh8, P('fsdp', 'data')))
  pair = jax.jit(lambda x: (oracle.direction(x), oracle.dual_norm(x)))
  (d0, n0), (d1, n1) = pair(g), pair(gs)
  np.testing.assert_allclose(np.asarray(d1), np.asarray(d0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(n1), float(n0), rtol=1e-5)
