"""Unit tests of the training plumbing that need no model or data: schedules, registry, sharding,
metrics, checkpoints, the loss."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from curvopt import train


def _schedule_cfg(name, warmup=10, final=0.1, decay=0.2):
  return ml_collections.ConfigDict(
    dict(name=name, warmup_steps=warmup, final_fraction=final, decay_fraction=decay)
  )


def _optimizer_cfg(name='adamw', **kw):
  cfg = dict(
    name=name,
    learning_rate=1e-2,
    adam_learning_rate=None,
    weight_decay=0.0,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    momentum=0.95,
    consistent_rms=None,
    grad_clip_norm=0.0,
    lanton_mapping='min_ratio',
    lanton_embed_head_scale=1.0,
    lanton_noise_every=None,
    lanton_noise_ns_steps=None,
    lanton_vector=None,
    lanton_vector_scale=None,
  )
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def test_warmup_cosine_schedule_shape():
  lr = train.make_schedule(1.0, 100, _schedule_cfg('warmup_cosine'))
  values = np.array([float(lr(s)) for s in range(101)])
  assert values[0] == 0.0
  np.testing.assert_allclose(values[10], 1.0, rtol=1e-6)
  np.testing.assert_allclose(values[100], 0.1, rtol=1e-5)
  assert np.all(np.diff(values[10:]) <= 1e-7)  # monotone decay after warmup


def test_wsd_schedule_is_stable_then_decays():
  lr = train.make_schedule(2.0, 100, _schedule_cfg('wsd', warmup=10, final=0.0, decay=0.2))
  np.testing.assert_allclose(
    [float(lr(s)) for s in (5, 10, 50, 80)], [1.0, 2.0, 2.0, 2.0], rtol=1e-6
  )
  np.testing.assert_allclose(float(lr(90)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 0.0, atol=1e-7)


@pytest.mark.parametrize(
  'bad, match',
  [
    (dict(name='linear_warmup'), 'unknown schedule'),
    (dict(name='wsd', warmup=-1), 'warmup_steps=-1'),
    (dict(name='wsd', final=1.5), 'final_fraction=1.5'),
  ],
)
def test_bad_schedule_raises(bad, match):
  kwargs = dict(name=bad.pop('name'), **bad)
  with pytest.raises(ValueError, match=match):
    train.make_schedule(1.0, 100, _schedule_cfg(**kwargs))


@pytest.mark.parametrize('name', sorted(train.OPTIMIZERS))
def test_every_registered_optimizer_reduces_a_quadratic(name):
  # A full-rank matrix: orthogonalizing optimizers move a rank-1 one along one direction only.
  params = {'w': jax.random.normal(jax.random.key(0), (8, 8)), 'b': jnp.ones((8,))}
  tx = train.make_optimizer(
    _optimizer_cfg(name, learning_rate=0.05), 100, _schedule_cfg('constant', warmup=0)
  ).tx

  def loss(p):
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  start = float(loss(params))
  for _ in range(100):
    params, state = step(params, state)
  assert float(loss(params)) < 0.5 * start


def test_unknown_optimizer_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown optimizer 'sgdd'.*adamw.*optax_muon"):
    train.make_optimizer(_optimizer_cfg('sgdd'), 10, _schedule_cfg('constant'))


def test_non_positive_learning_rate_raises():
  with pytest.raises(ValueError, match='learning_rate must be positive, got -1'):
    train.make_optimizer(_optimizer_cfg(learning_rate=-1.0), 10, _schedule_cfg('constant'))


@pytest.mark.parametrize(
  'vector, scale, on_lanton',
  [(None, None, False), ('adamw', None, False), ('bias_rms', None, True), ('bias_rms', 0.2, True)],
)
def test_lanton_vector_option_puts_vectors_on_lanton_or_adamw(vector, scale, on_lanton):
  params = {'w': jax.random.normal(jax.random.key(0), (8, 8)), 'b': jnp.ones((8,))}
  opt = train.make_optimizer(
    _optimizer_cfg('lanton_mean', lanton_vector=vector, lanton_vector_scale=scale),
    10,
    _schedule_cfg('constant', warmup=0),
  )
  state = opt.tx.init(params)
  updates, state = opt.tx.update(params, state, params)
  stats = opt.stats(state)
  assert ('lanton/lr_scale/b' in stats) == on_lanton
  assert 'lanton/lr_scale/w' in stats
  if on_lanton:  # the group scale multiplies the vector's step: |B / RMS(B)| = 1 on ones
    np.testing.assert_allclose(stats['lanton/lr_scale/b'], scale or 1.0, rtol=1e-6)
    np.testing.assert_allclose(updates['b'], -1e-2 * (scale or 1.0), rtol=1e-5)


@pytest.mark.parametrize(
  'fields, match',
  [
    (dict(lanton_vector='rms'), "unknown vector option 'rms'"),
    (dict(lanton_vector_scale=0.2), r"group_lr_scales\['vector'\].*bias_rms"),
  ],
)
def test_bad_lanton_vector_fields_raise(fields, match):
  with pytest.raises(ValueError, match=match):
    train.make_optimizer(_optimizer_cfg('lanton', **fields), 10, _schedule_cfg('constant'))


@pytest.mark.parametrize(
  'shape, fsdp, expected',
  [
    ((384, 128), 4, jax.sharding.PartitionSpec('fsdp', None)),
    ((128, 384), 4, jax.sharding.PartitionSpec(None, 'fsdp')),
    ((6, 10), 4, jax.sharding.PartitionSpec()),
    ((128,), 4, jax.sharding.PartitionSpec('fsdp')),
    ((), 4, jax.sharding.PartitionSpec()),
    ((384, 128), 1, jax.sharding.PartitionSpec()),
  ],
)
def test_fsdp_spec_shards_largest_divisible_dim(shape, fsdp, expected):
  assert train.fsdp_spec(shape, fsdp) == expected


def test_mesh_shapes_and_errors():
  assert dict(train.make_mesh(data=-1, fsdp=4).shape) == {'data': 2, 'fsdp': 4}
  assert dict(train.make_mesh(data=1, fsdp=-1, num_devices=2).shape) == {'data': 1, 'fsdp': 2}
  with pytest.raises(ValueError, match='data=3 x fsdp=1'):
    train.make_mesh(data=3, fsdp=1)
  with pytest.raises(ValueError, match='num_devices=9'):
    train.make_mesh(num_devices=9)


def test_put_global_batch_places_shards(mesh8):
  batch = np.arange(16 * 5, dtype=np.int32).reshape(16, 5)
  placed = train.put_global_batch(batch, train.batch_sharding(mesh8))
  assert len(placed.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(placed), batch)
  with pytest.raises(ValueError, match='global batch size 12'):
    train.put_global_batch(batch[:12], train.batch_sharding(mesh8))


def test_lm_loss_matches_numpy_and_ignores_pad():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = np.array([[1, 2, 6], [0, 6, 6]])  # 6 is the pad id
  loss, count = train.lm_loss(jnp.asarray(logits), jnp.asarray(targets), pad_id=6)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = [logp[0, 0, 1], logp[0, 1, 2], logp[1, 0, 0]]
  np.testing.assert_allclose(float(loss), -np.mean(picked), rtol=1e-5)
  assert float(count) == 3


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  writer = train.MetricWriter(str(tmp_path))
  writer.write(1, {'loss': 2.5})
  writer.write(2, {'loss': 2.0, 'eval_loss': 2.2})
  writer.close()
  assert train.read_metrics(str(tmp_path)) == [
    {'step': 1, 'loss': 2.5},
    {'step': 2, 'loss': 2.0, 'eval_loss': 2.2},
  ]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))


def test_progress_line_has_rate_and_eta():
  progress = train.Progress(0, 100, tokens_per_step=1000)
  progress.start(1)
  line = progress.line(1, {'loss': 2.0})
  assert line.startswith('step 1/100') and 'loss 2' in line
  import time

  time.sleep(0.01)
  assert 'ETA' in progress.line(11, {'loss': 1.5}) and 'tok/s' in progress.line(11, {})


def test_checkpointer_roundtrip_into_shardings(tmp_path, mesh8):
  params = {'w': jnp.arange(32.0).reshape(8, 4), 'b': jnp.ones((3,))}
  state = train.TrainState(
    step=jnp.array(7, jnp.int32),
    params=params,
    opt_state=optax.adam(1e-3).init(params),
    rng=jax.random.key_data(jax.random.key(3)),
  )
  shardings = train.fsdp_shardings(state, mesh8)
  ckpt = train.Checkpointer(str(tmp_path), keep=2, save_every=10)
  ckpt.save(7, state, {'epoch': 1, 'rows': [1, 2]}, {'seed': 0})
  ckpt.wait()
  assert ckpt.latest_step() == 7
  restored, data = ckpt.restore(7, train.abstract_like(state, shardings))
  config = ckpt.saved_config(7)
  ckpt.close()
  assert data == {'epoch': 1, 'rows': [1, 2]} and config == {'seed': 0}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored.params['w'].sharding.spec == jax.sharding.PartitionSpec('fsdp', None)


def test_checkpointer_names_the_step_when_the_state_does_not_fit(tmp_path):
  ckpt = train.Checkpointer(str(tmp_path), keep=1, save_every=1, async_save=False)
  ckpt.save(3, {'x': jnp.zeros(2), 'y': jnp.ones(3)}, {}, {})
  other = {
    'x': jax.ShapeDtypeStruct((2,), jnp.float32),
    'z': jax.ShapeDtypeStruct((3,), jnp.float32),
  }
  with pytest.raises(ValueError, match='checkpoint step 3 in .* does not fit'):
    ckpt.restore(3, other)
  ckpt.close()


def test_checkpointer_keeps_last_k(tmp_path):
  state = {'x': jnp.zeros(2)}
  ckpt = train.Checkpointer(str(tmp_path), keep=2, save_every=1, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, state, {}, {})
  ckpt.close()
  assert sorted(int(d) for d in os.listdir(ckpt.directory) if d.isdigit()) == [2, 3]


def test_distributed_needs_complete_arguments():
  with pytest.raises(ValueError, match='num_processes=None'):
    train.initialize_distributed(coordinator_address='127.0.0.1:1')
  with pytest.raises(ValueError, match='process_id=2'):
    train.initialize_distributed(coordinator_address='127.0.0.1:1', num_processes=2, process_id=2)


_KEYS = ('optimizer',)


def test_resume_check_ignores_fields_added_later_but_not_changed_ones():
  from curvopt.train import _setup  # pylint: disable=g-import-not-at-top

  saved = {'optimizer': {'name': 'lanton', 'learning_rate': 0.03}}
  _setup.check_resume_compatible(  # a new field at its unset default: same run
    saved,
    {'optimizer': {'name': 'lanton', 'learning_rate': 0.03, 'lanton_noise_every': None}},
    _KEYS,
  )
  with pytest.raises(ValueError, match='config.optimizer differs'):
    _setup.check_resume_compatible(
      saved,
      {'optimizer': {'name': 'lanton', 'learning_rate': 0.03, 'lanton_noise_every': 4}},
      _KEYS,
    )


def test_resume_check_ignores_fields_the_optimizer_does_not_read():
  from curvopt.train import _setup  # pylint: disable=g-import-not-at-top

  adamw = {'name': 'adamw', 'learning_rate': 3e-3, 'lanton_mapping': 'min_ratio', 'momentum': 0.9}
  # A later default of a LANTON or Muon field does not change an AdamW run.
  _setup.check_resume_compatible(
    {'optimizer': adamw},
    {'optimizer': {**adamw, 'lanton_mapping': 'mean_ratio', 'momentum': 0.95}},
    _KEYS,
  )
  lanton = {**adamw, 'name': 'lanton'}
  with pytest.raises(ValueError, match="lanton_mapping: saved 'min_ratio', config 'mean_ratio'"):
    _setup.check_resume_compatible(
      {'optimizer': lanton}, {'optimizer': {**lanton, 'lanton_mapping': 'mean_ratio'}}, _KEYS
    )
  with pytest.raises(ValueError, match='learning_rate: saved 0.003, config 0.001'):
    _setup.check_resume_compatible(
      {'optimizer': adamw}, {'optimizer': {**adamw, 'learning_rate': 1e-3}}, _KEYS
    )


def _two_leaf_params():
  return {
    'layers_0': {'kernel': jax.random.normal(jax.random.key(0), (8, 8))},
    'embed': {'embedding': jax.random.normal(jax.random.key(1), (16, 8))},
    'head': {'kernel': jax.random.normal(jax.random.key(2), (8, 16))},
    'norm': {'scale': jnp.ones((8,))},
  }


def _run(opt, params, steps=3, scale=1.0):
  state = opt.tx.init(params)
  update = jax.jit(opt.tx.update)
  out = []
  for t in range(steps):
    grads = jax.tree.map(lambda x, t=t: scale * jnp.sin(x * (t + 1.0)), params)
    updates, state = update(grads, state, params)
    out.append(updates)
  return out, state


@pytest.mark.parametrize('clip', [0.0, 0.5])
def test_dmuon_noise_with_ones_is_dmuon(clip):
  params = _two_leaf_params()
  schedule = _schedule_cfg('constant', warmup=0)
  dmuon = train.make_optimizer(_optimizer_cfg('dmuon', grad_clip_norm=clip), 10, schedule)
  noise = train.make_optimizer(
    _optimizer_cfg('dmuon_noise', grad_clip_norm=clip, noise_mapping='ones'), 10, schedule
  )
  assert noise.grad_clip_norm == (clip or None)
  (u0, _), (u1, state) = _run(dmuon, params), _run(noise, params)
  for a, b in zip(u0, u1):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  stats = noise.stats(state)
  # Both the embedding and the untied head are adapted (the embed_head group of two).
  assert {
    'noise/h/embed/embedding',
    'noise/h/head/kernel',
    'noise/lr_scale/layers_0/kernel',
  } <= set(stats)
  assert 'noise/clip_low/hidden' in stats and 'noise/h/norm/scale' not in stats


_G4 = dict(exponent=0.25, normaliser='geometric')  # dmuon_noise's default mapping's options


@pytest.mark.parametrize(
  'name, fields, kind, expected',
  [
    ('dmuon_noise', {}, 'mean_ratio', _G4),
    ('dmuon_noise', dict(noise_exponent=0.5), 'mean_ratio', dict(_G4, exponent=0.5)),
    ('dmuon_noise', dict(noise_s_max=2.0), 'mean_ratio', dict(_G4, s_max=2.0)),
    # A named mapping starts from its own defaults (built by name: no options passed).
    ('dmuon_noise', dict(noise_mapping='mean_ratio'), 'mean_ratio', None),
    (
      'dmuon_noise',
      dict(noise_mapping='min_ratio', noise_exponent=0.25),
      'min_ratio',
      dict(exponent=0.25),
    ),
    ('lanton', dict(lanton_mapping='ones'), 'ones', None),
    ('lanton_mean', dict(noise_relative=True, lanton_nesterov=True), 'mean_ratio', None),
  ],
)
def test_noise_fields_reach_the_optimizers(name, fields, kind, expected, monkeypatch):
  from curvopt import optim  # pylint: disable=g-import-not-at-top

  seen = {}
  for mapping in ('min_ratio', 'mean_ratio', 'ones'):
    real = getattr(optim, mapping)

    def spy(*, _real=real, _name=mapping, **kw):
      seen['mapping'] = (_name, kw)
      return _real(**kw)

    monkeypatch.setattr(optim, mapping, spy)
  real_lanton = optim.lanton

  def lanton_spy(*args, **kw):
    seen['lanton'] = kw
    return real_lanton(*args, **kw)

  monkeypatch.setattr(optim, 'lanton', lanton_spy)
  opt = train.make_optimizer(
    _optimizer_cfg(name, **fields), 10, _schedule_cfg('constant', warmup=0)
  )
  _run(opt, _two_leaf_params(), steps=2)
  if name.startswith('lanton'):
    assert seen['lanton']['nesterov'] == bool(fields.get('lanton_nesterov'))
    assert seen['lanton']['relative'] == bool(fields.get('noise_relative'))
    if not any(k.startswith('noise_') and k != 'noise_relative' for k in fields):
      assert seen['lanton']['mapping'] == (fields.get('lanton_mapping') or 'mean_ratio')
  elif expected is None:
    assert 'mapping' not in seen
  else:
    assert seen['mapping'] == (kind, expected)


@pytest.mark.parametrize(
  'fields, match',
  [
    (dict(noise_mapping='max_ratio'), r"unknown noise mapping 'max_ratio'.*ones"),
    (dict(noise_mapping='ones', noise_exponent=0.25), 'noise_exponent=0.25 does not apply'),
    (dict(noise_mapping='min_ratio', noise_s_min=0.2), 'noise_s_min=0.2 does not apply'),
    (dict(noise_normaliser='harmonic'), "'harmonic'"),
  ],
)
def test_bad_noise_fields_raise(fields, match):
  with pytest.raises(ValueError, match=match):
    train.make_optimizer(_optimizer_cfg('dmuon_noise', **fields), 10, _schedule_cfg('constant'))


def test_new_fields_are_ignored_by_the_optimizers_that_do_not_read_them():
  from curvopt.train import _optimizers  # pylint: disable=g-import-not-at-top

  for field in ('noise_mapping', 'noise_exponent', 'noise_relative', 'lanton_nesterov'):
    assert field in _optimizers.fields_ignored_by('adamw')
    assert field in _optimizers.fields_ignored_by('dmuon')
  assert 'noise_exponent' not in _optimizers.fields_ignored_by('lanton')
  assert 'lanton_nesterov' in _optimizers.fields_ignored_by('dmuon_noise')
  assert 'noise_mapping' not in _optimizers.fields_ignored_by('dmuon_noise')


def test_train_step_reports_clipped_steps():
  params = {'w': jnp.ones((4,))}
  opt = train.make_optimizer(
    _optimizer_cfg('adamw', grad_clip_norm=1.0), 10, _schedule_cfg('constant', warmup=0)
  )

  def logits_fn(p, tokens):
    return jnp.broadcast_to(p['w'], tokens.shape + (4,)) * tokens[..., None]

  step = jax.jit(
    train.make_train_step(
      logits_fn,
      opt.tx,
      pad_id=-1,
      learning_rate=opt.learning_rate,
      grad_clip_norm=opt.grad_clip_norm,
    )
  )
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=opt.tx.init(params),
    rng=jax.random.key_data(jax.random.key(0)),
  )
  small = jnp.zeros((2, 3), jnp.int32)  # logits all 0 at scale 0: gradient 0
  big = 50 * jnp.ones((2, 3), jnp.int32).at[:, 1:].set(jnp.array([3, 1]))
  _, m_small = step(state, small)
  _, m_big = step(state, big)
  assert float(m_small['grad_clipped']) == 0.0
  assert float(m_big['grad_norm']) > 1.0 and float(m_big['grad_clipped']) == 1.0


@pytest.mark.parametrize('arg, base', [('tiny_untied', 'tiny'), ('small_untied', 'small')])
def test_untied_lm_configs_put_embedding_and_head_in_embed_head(arg, base):
  from curvopt import models  # pylint: disable=g-import-not-at-top
  from curvopt import optim  # pylint: disable=g-import-not-at-top

  configs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), 'configs')
  untied = train.load_config(os.path.join(configs, 'lm.py'), arg)
  tied = train.load_config(os.path.join(configs, 'lm.py'), base)
  assert untied.model.tie_embeddings is False and tied.model.tie_embeddings is None
  untied.model.tie_embeddings = None
  assert untied.to_dict() == tied.to_dict()  # everything else as the base variant
  model = models.Decoder(models.model_config('tiny', tie_embeddings=False))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  labels = optim.param_groups(shapes)
  assert labels['embed']['embedding'] == labels['head']['kernel'] == 'embed_head'
  # The new optimizer fields default to None, so older runs resume unchanged.
  for field in ('noise_mapping', 'noise_exponent', 'noise_normaliser', 'noise_relative'):
    assert tied.optimizer[field] is None
  assert tied.optimizer.lanton_nesterov is None
