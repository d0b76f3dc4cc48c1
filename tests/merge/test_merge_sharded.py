"""Every merge operator on leaves sharded over the fake 8-device mesh equals
its single-device result."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from curvopt import merge

NUM = 3
# One leaf sharded over both mesh axes keeps compilations few.
SPECS = {'w': P('data', 'fsdp')}


def _problem():
  rng = np.random.default_rng(0)

  def tree(make):
    return {'w': make(size=(4, 8)).astype(np.float32)}

  base = tree(rng.normal)
  experts = [tree(rng.normal) for _ in range(NUM)]
  moments = [tree(lambda size: rng.uniform(size=size) ** 4) for _ in range(NUM)]
  masks = [tree(lambda size: rng.uniform(size=size) < 0.5) for _ in range(NUM)]
  masks = [{k: v.astype(bool) for k, v in m.items()} for m in masks]
  return base, experts, moments, masks


def _place(tree, mesh):
  """Numpy leaves -> arrays sharded by SPECS (mesh) or on device 0 (None)."""
  if mesh is None:
    device = jax.devices()[0]
    return {k: jax.device_put(v, device) for k, v in tree.items()}
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in tree.items()}


# name -> merge(base, experts, moments, masks) on placed trees
OPERATORS = {
  'linear': lambda b, es, vs, ms: merge.linear(es, weights=[1.0, 2.0, 3.0]),
  'task_arithmetic': lambda b, es, vs, ms: merge.task_arithmetic(b, es, scale=0.5),
  'ties': lambda b, es, vs, ms: merge.ties(b, es, density=0.3),
  'dare': lambda b, es, vs, ms: merge.dare(b, es, drop=0.4, key=jax.random.key(3)),
  'fisher': lambda b, es, vs, ms: merge.fisher(es, vs),
  'ota': lambda b, es, vs, ms: merge.ota(b, es, vs, normalise='mean'),
  'ota_masks_rank1': lambda b, es, vs, ms: merge.ota(
    b, es, [merge.rank1_compress(v) for v in vs], masks=ms
  ),
  'ffg_mask_global': lambda b, es, vs, ms: merge.ffg_mask(b, es[0], vs[0], density=0.3),
  'ffg_mask_per_tensor': lambda b, es, vs, ms: merge.ffg_mask(
    b, es[1], vs[1], density=0.3, scope='per_tensor'
  ),
  'ffg_graft': lambda b, es, vs, ms: merge.ffg_graft(b, es[2], ms[2]),
  'ota_ffg': lambda b, es, vs, ms: merge.ota_ffg(b, es, vs, density=[0.2, 0.5, 0.8]),
  'rank1_round_trip': lambda b, es, vs, ms: merge.rank1_expand(merge.rank1_compress(vs[0])),
}


# Operators with whole-tensor steps (sorts, means, sums, a global cutoff),
# also run on an Auto-axes mesh such as the trainers' `jax.sharding.Mesh`.
AUTO_MESH_OPERATORS = (
  'dare',
  'ffg_mask_global',
  'ffg_mask_per_tensor',
  'ota',
  'ota_ffg',
  'ota_masks_rank1',
  'ties',
)
CASES = [(name, 'explicit') for name in sorted(OPERATORS)] + [
  (name, 'auto') for name in AUTO_MESH_OPERATORS
]


@pytest.mark.parametrize('name,axes', CASES)
def test_sharded_equals_single_device(name, axes, mesh8):
  base, experts, moments, masks = _problem()
  if axes == 'auto':
    mesh8 = jax.sharding.Mesh(mesh8.devices, mesh8.axis_names)

  def run(mesh):
    return OPERATORS[name](
      _place(base, mesh),
      [_place(e, mesh) for e in experts],
      [_place(v, mesh) for v in moments],
      [_place(m, mesh) for m in masks],
    )

  single, sharded = run(None), run(mesh8)
  assert len(sharded['w'].sharding.device_set) == 8
  assert sharded['w'].dtype == single['w'].dtype
  np.testing.assert_allclose(
    np.asarray(sharded['w']), np.asarray(single['w']), rtol=1e-6, atol=1e-7
  )


def test_estimate_fisher_sharded_equals_single_device(mesh8):
  rng = np.random.default_rng(1)
  params = {'w': rng.normal(size=(4, 8)).astype(np.float32)}
  batches = [{'x': rng.normal(size=(8, 4)).astype(np.float32)}]

  def loss(p, example):
    return jnp.sum(jnp.tanh(example['x'] @ p['w']))

  single = merge.estimate_fisher(loss, params, batches)
  sharded_params = {'w': jax.device_put(params['w'], NamedSharding(mesh8, P(None, 'fsdp')))}
  sharded_batches = [
    {'x': jax.device_put(b['x'], NamedSharding(mesh8, P('data', None)))} for b in batches
  ]
  sharded = merge.estimate_fisher(loss, sharded_params, sharded_batches)
  np.testing.assert_allclose(
    np.asarray(sharded['w']), np.asarray(single['w']), rtol=1e-5, atol=1e-7
  )
