"""Adam second moments and params out of our trainers' orbax checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt import merge
from curvopt import optim
from curvopt import train

PARAMS_SHAPES = {'embed': (12, 8), 'layers_0': {'w': (8, 8), 'b': (8,)}, 'head': (8, 12)}
ALL = ('embed', 'head', 'layers_0/b', 'layers_0/w')


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
    PARAMS_SHAPES,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def _adam_in(opt_state):
  """Every ScaleByAdamState's nu (by param name) in a live optax state."""
  found = {}
  states = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    if isinstance(s, optax.ScaleByAdamState)
  ]
  for state in states:
    pairs = jax.tree_util.tree_flatten_with_path(state.nu)[0]
    for path, leaf in pairs:
      found[jax.tree_util.keystr(path, simple=True, separator='/')] = leaf
  return found


# name -> (optax chain, params that have a nu)
CHAINS = {
  'adamw': (lambda: optax.adamw(1e-2), ALL),
  'clip_chain': (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), ALL),
  'inject_hyperparams': (lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2), ALL),
  'multi_steps': (lambda: optax.MultiSteps(optax.adam(1e-2), 2), ALL),
  'masked': (
    lambda: optax.chain(
      optax.masked(
        optax.adam(1e-2), {'embed': True, 'head': False, 'layers_0': {'w': True, 'b': True}}
      ),
      optax.masked(
        optax.sgd(1e-2), {'embed': False, 'head': True, 'layers_0': {'w': False, 'b': False}}
      ),
    ),
    ('embed', 'layers_0/b', 'layers_0/w'),
  ),
  'dmuon': (lambda: optim.dmuon(1e-2), ('embed', 'head', 'layers_0/b')),
}


def _train_checkpoint(workdir, tx, params, steps=2):
  opt_state = tx.init(params)
  rng = np.random.default_rng(1)
  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  state = train.TrainState(
    step=jnp.int32(steps), params=params, opt_state=opt_state, rng=jnp.zeros((2,), jnp.uint32)
  )
  checkpointer = train.Checkpointer(str(workdir), async_save=False)
  checkpointer.save(steps, state, {'position': 0}, {'name': 'test'})
  checkpointer.close()
  return state


@pytest.mark.parametrize('chain', sorted(CHAINS))
def test_moments_of_any_chain_map_to_param_names(tmp_path, chain):
  make, covered = CHAINS[chain]
  state = _train_checkpoint(tmp_path, make(), _params())
  want = _adam_in(state.opt_state)
  reader = merge.orbax_moments_reader(str(tmp_path))
  assert reader.names == tuple(n for n in ALL if n in covered)
  assert reader.missing == tuple(n for n in ALL if n not in covered)
  got = reader.read(list(reader.names)[::-1])
  for name in covered:
    assert isinstance(got[name], np.ndarray)
    np.testing.assert_array_equal(got[name], np.asarray(want[name]))
    assert float(np.max(got[name])) > 0
  # MultiSteps(k=2) takes one inner Adam step per two micro-steps.
  assert set(reader.counts().values()) == {1 if chain == 'multi_steps' else 2}
  for name in reader.missing:
    with pytest.raises(ValueError, match=f'{name}.*estimate_fisher'):
      reader.spec(name)
  params = merge.orbax_params_reader(str(tmp_path))
  assert params.names == ALL
  for name, value in params.read(list(ALL)).items():
    np.testing.assert_array_equal(
      value, np.asarray(merge.TreeReader(state.params).read([name])[name])
    )


def test_no_second_moment_points_to_estimate_fisher(tmp_path):
  _train_checkpoint(
    tmp_path, optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2, momentum=0.9)), _params()
  )
  with pytest.raises(ValueError, match='no Adam second moment.*estimate_fisher'):
    merge.orbax_moments_reader(str(tmp_path))


def test_overlapping_adam_states_need_a_choice(tmp_path):
  _train_checkpoint(
    tmp_path, optax.chain(optax.scale_by_adam(), optax.scale_by_adam(b2=0.9)), _params()
  )
  with pytest.raises(ValueError, match='two Adam states.*adam_state='):
    merge.orbax_moments_reader(str(tmp_path))
  first = merge.orbax_moments_reader(str(tmp_path), adam_state=0)
  second = merge.orbax_moments_reader(str(tmp_path), adam_state=1)
  assert first.states != second.states
  a, b = first.read(['embed'])['embed'], second.read(['embed'])['embed']
  assert not np.array_equal(a, b)
  with pytest.raises(ValueError, match='unknown adam_state 5'):
    merge.orbax_moments_reader(str(tmp_path), adam_state=5)


def test_paths_resolve_from_workdir_step_and_item(tmp_path):
  _train_checkpoint(tmp_path, optax.adam(1e-2), _params(), steps=1)
  for path in (
    tmp_path,
    tmp_path / 'checkpoints',
    tmp_path / 'checkpoints' / '1',
    tmp_path / 'checkpoints' / '1' / 'state',
  ):
    assert merge.orbax_params_reader(str(path)).names == ALL
  with pytest.raises(ValueError, match='no step 7'):
    merge.orbax_params_reader(str(tmp_path), step=7)
  with pytest.raises(ValueError, match='does not exist'):
    merge.orbax_params_reader(str(tmp_path / 'nope'))


def test_writers_round_trip(tmp_path):
  tree = {
    'layers_0': {'w': jnp.ones((3, 2), jnp.bfloat16), 'b': jnp.arange(2.0)},
    'model.embed.weight': jnp.eye(2),
  }
  merge.save_orbax(str(tmp_path / 'a'), tree)
  got = merge.orbax_params_reader(str(tmp_path / 'a'))
  assert sorted(got.names) == ['layers_0/b', 'layers_0/w', 'model.embed.weight']
  assert got.spec('layers_0/w').dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.read(['model.embed.weight'])['model.embed.weight'], np.eye(2))
  writer = merge.OrbaxWriter(str(tmp_path / 'b'), {n: got.spec(n) for n in got.names})
  for name, value in got.read(list(got.names)).items():
    writer.write(name, value)
  writer.close()
  again = merge.orbax_params_reader(str(tmp_path / 'b')).read_tree()
  np.testing.assert_array_equal(again['layers_0']['b'], [0.0, 1.0])
  with pytest.raises(ValueError, match='never written'):
    merge.OrbaxWriter(str(tmp_path / 'c'), {'x': got.spec('layers_0/b')}).close()


def test_streamed_ota_from_train_checkpoints_equals_in_memory(tmp_path):
  base = _params()
  states = [
    _train_checkpoint(tmp_path / f'e{t}', optax.adamw(0.1 * (t + 1)), base, steps=2 + t)
    for t in range(2)
  ]
  merge.save_orbax(str(tmp_path / 'base'), base)
  writer = merge.MemoryWriter()
  merge.merge_streaming(
    'ota',
    [merge.orbax_params_reader(str(tmp_path / f'e{t}')) for t in range(2)],
    writer,
    base=merge.orbax_params_reader(str(tmp_path / 'base')),
    moments=[merge.orbax_moments_reader(str(tmp_path / f'e{t}')) for t in range(2)],
    ffg={'density': 0.4},
    batch_bytes=700,
  )
  nus = [merge.TreeReader(_adam_in(s.opt_state)).read_tree() for s in states]
  experts = [s.params for s in states]
  masks = [merge.ffg_mask(base, e, v, density=0.4) for e, v in zip(experts, nus)]
  want = merge.TreeReader(merge.ota(base, experts, nus, masks=masks))
  for name, value in want.read(list(want.names)).items():
    np.testing.assert_array_equal(np.asarray(writer.values[name]), np.asarray(value))


def test_streaming_a_muon_checkpoint_names_the_params_without_nu(tmp_path):
  _train_checkpoint(tmp_path / 'e', optim.dmuon(1e-2), _params())
  merge.save_orbax(str(tmp_path / 'base'), _params())
  with pytest.raises(ValueError, match="'layers_0/w'.*masked out of Adam"):
    merge.merge_streaming(
      'ota',
      [merge.orbax_params_reader(str(tmp_path / 'e'))],
      merge.MemoryWriter(),
      base=merge.orbax_params_reader(str(tmp_path / 'base')),
      moments=[merge.orbax_moments_reader(str(tmp_path / 'e'))],
    )
