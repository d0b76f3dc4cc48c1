"""The RL trainer: rollout alignment, the jit'd update (with and without CAPO), resume, sharding."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt import models
from curvopt import rl
from curvopt import train

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')
_VOCAB = 264


def _rl_config(**overrides):
  config = train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'test')
  config.update_from_flattened_dict(overrides)
  return config


def _digit_reward(prompts, completions, answers):
  """A dense reward a random policy already varies on, so advantages are not all zero."""
  del prompts, answers
  return np.asarray(
    [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions], np.float32
  )


@pytest.fixture(scope='module')
def policy():
  cfg = models.model_config(
    'tiny',
    d_model=32,
    n_layers=2,
    n_heads=2,
    d_ff=64,
    max_len=64,
    vocab_size=_VOCAB,
    dtype='float32',
  )
  model = models.Decoder(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  return model, params


def _apply_fn(model):
  def apply_fn(params, tokens, positions, attention_mask):
    return model.apply(
      {'params': params}, tokens, positions=positions, attention_mask=attention_mask
    )

  return apply_fn


def _rollout(model, params, group_size=4):
  rng = np.random.default_rng(0)
  prompts = np.full((2, 6), 256, np.int32)
  mask = np.zeros((2, 6), np.int32)
  for row, length in enumerate((6, 3)):  # left padding of different lengths
    prompts[row, 6 - length :] = rng.integers(0, 256, length)
    mask[row, 6 - length :] = 1
  cache = models.init_cache(model, 2 * group_size, 6 + 10)
  samples = rl.sample(
    models.decode_fn_for(model),
    params,
    cache,
    jnp.asarray(prompts),
    jnp.asarray(mask),
    jax.random.key(1),
    max_new_tokens=10,
    num_samples=group_size,
    temperature=1.0,
    eos_id=258,
    pad_id=256,
  )
  index = np.asarray(samples.prompt_index)
  batch = train.rollout_batch(
    jnp.asarray(prompts)[index], jnp.asarray(mask)[index], samples.completions, samples.mask
  )
  return samples, batch


def test_update_forward_reads_the_sampled_tokens_log_probs(policy):
  model, params = policy
  samples, batch = _rollout(model, params)
  from curvopt.train import _rl_step  # pylint: disable=g-import-not-at-top

  logp, (hidden, entropy) = _rl_step.completion_logprobs(_apply_fn(model), params, batch)
  valid = np.asarray(samples.mask) > 0
  np.testing.assert_allclose(
    np.asarray(logp)[valid], np.asarray(samples.logp)[valid], rtol=1e-4, atol=1e-4
  )
  assert hidden.shape == (*logp.shape, 32)
  assert np.all(np.asarray(entropy)[valid] > 0)


def _step_fn(model, capo_options, tx, **mode):
  head_fn = functools.partial(models.output_head, cfg=model.cfg)
  return train.make_rl_step(
    _apply_fn(model),
    head_fn,
    tx,
    learning_rate=lambda s: 1e-4,
    loss_options={'agg': 'seq-mean-token-mean'},
    capo_options=capo_options,
    **mode,
  )


def _state(params, tx):
  return train.RLState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    shadow=rl.capo_shadow_init(_VOCAB, 32),
  )


_CAPO = {'tau_H': 0.01, 'tau_F': 1e-4, 'symmetric': True, 'top_k': 20, 'chunk_size': 16}


@pytest.mark.parametrize(
  'capo_options, expect_update, expect_masked',
  [
    (None, True, None),  # plain GRPO
    (_CAPO, True, None),  # CAPO at the reference thresholds
    # Only zero-advantage tokens survive: the step is a no-op.
    (dict(_CAPO, tau_H=1e-30, tau_F=1e-30), False, 'nonzero_advantage_tokens'),
  ],
)
def test_rl_step(policy, capo_options, expect_update, expect_masked):
  model, params = policy
  samples, batch = _rollout(model, params)
  batch['advantages'] = rl.group_advantages(jnp.arange(8, dtype=jnp.float32) % 3, 4)
  tx = optax.sgd(1e-2)
  state, metrics = jax.jit(_step_fn(model, capo_options, tx))(_state(params, tx), batch)
  moved = optax.global_norm(jax.tree.map(jnp.subtract, state.params, params))
  assert (float(moved) > 0) == expect_update
  assert int(state.step) == 1
  assert np.isfinite(float(metrics['loss']))
  if capo_options is None:
    # A small step along the surrogate's gradient raises sum_i A_i * mean_t logp_it.
    from curvopt.train import _rl_step  # pylint: disable=g-import-not-at-top

    def objective(p):
      logp = _rl_step.completion_logprobs(_apply_fn(model), p, batch)[0]
      mask = batch['completion_mask']
      per_seq = (logp * mask).sum(1) / mask.sum(1)
      return float((batch['advantages'] * per_seq).sum())

    assert objective(state.params) > objective(params)
    assert 'capo/masked_frac' not in metrics
    assert int(state.shadow.count) == 0
  else:
    assert int(state.shadow.count) == 1
    if expect_masked is not None:
      mask = np.asarray(batch['completion_mask'])
      zero_adv = np.asarray(batch['advantages']) == 0
      assert zero_adv.any() and not zero_adv.all()
      np.testing.assert_allclose(
        float(metrics['capo/masked_frac']), 1 - mask[zero_adv].sum() / mask.sum(), rtol=1e-6
      )
      np.testing.assert_array_equal(np.asarray(state.shadow.mu), 0.0)  # kept g are all 0


def test_log_and_random_modes(policy):
  """'log' moves the policy exactly as plain GRPO and returns the stats; 'random' drops the
  rounded share of the A != 0 tokens, the same on a rerun of the step."""
  model, params = policy
  samples, batch = _rollout(model, params)
  batch['advantages'] = rl.group_advantages(jnp.arange(8, dtype=jnp.float32) % 3, 4)
  tx = optax.sgd(1e-2)
  results = {}
  for name, mode in (
    ('off', dict(mask_mode='off')),
    ('log', dict(mask_mode='log')),
    ('random', dict(mask_mode='random', random_rate=0.5, random_seed=3)),
  ):
    options = _CAPO if name == 'log' else None
    step = jax.jit(_step_fn(model, options, tx, **mode))
    results[name] = step(_state(params, tx), batch)
    if name == 'random':
      again = step(_state(params, tx), batch)
      jax.tree.map(np.testing.assert_array_equal, again[0].params, results[name][0].params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
    results['log'][0].params,
    results['off'][0].params,
  )
  state, metrics = results['log']
  assert int(state.shadow.count) == 1
  m_f = np.asarray(metrics['capo_tokens']['m_F'])
  assert m_f.shape == samples.mask.shape and (m_f >= 0).all()
  zero_adv = np.asarray(batch['advantages']) == 0
  assert (m_f[zero_adv] == 0).all() and (m_f[~zero_adv] > 0).any()
  assert 'capo/nz/masked_frac' in metrics and 'capo/pos/m_F_q0.5' in metrics
  metrics = results['random'][1]
  valid = np.asarray(samples.mask) > 0
  n = (valid & ~zero_adv[:, None]).sum()
  np.testing.assert_allclose(float(metrics['capo/nz/masked_frac']), round(0.5 * n) / n)
  moved = optax.global_norm(
    jax.tree.map(jnp.subtract, results['random'][0].params, results['off'][0].params)
  )
  assert float(moved) > 0
  with pytest.raises(ValueError, match="mask_mode 'log' needs capo_options"):
    _step_fn(model, None, tx, mask_mode='log')
  with pytest.raises(ValueError, match="unknown mask_mode 'mask'; valid"):
    _step_fn(model, None, tx, mask_mode='mask')
  with pytest.raises(ValueError, match="'random' needs random_rate in"):
    _step_fn(model, None, tx, mask_mode='random')


def test_shadow_adam_follows_the_optimizer_config():
  from curvopt.train import _rl  # pylint: disable=g-import-not-at-top

  config = _rl_config(**{'optimizer.b1': 0.8, 'optimizer.eps': 1e-6})
  options = _rl._capo_options(config)
  assert (options['b1'], options['b2'], options['eps']) == (0.8, 0.999, 1e-6)
  config.capo.b2 = 0.999  # restating the optimizer's value is fine
  assert _rl._capo_options(config)['b2'] == 0.999
  config.capo.b1 = 0.9
  with pytest.raises(ValueError, match=r'capo.b1=0.9 differs from optimizer.b1=0.8'):
    _rl._capo_options(config)
  for overrides, match in (
    ({'capo.mode': 'mask'}, "unknown capo.mode 'mask'; valid"),
    ({'capo.mode': 'random'}, "capo.mode 'random' needs capo.random_rate in"),
    ({'capo.tau_F': None}, 'capo.tau_F is unset'),
  ):
    with pytest.raises(ValueError, match=match):
      _rl._capo_options(_rl_config(**overrides))
  assert _rl._capo_options(_rl_config(**{'capo.mode': 'off'})) is None


def test_probe_metrics_match_numpy():
  from curvopt.train import _rl_step  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  logits, start = rng.normal(size=(2, 2, 3, 7)) * 3
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  out = _rl_step.probe_metrics(logits, start, mask)

  def probs(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  entropies, kls = [], []
  for b, t in zip(*np.nonzero(mask)):
    p, p0 = probs(logits[b, t]), probs(start[b, t])
    entropies.append(-sum(x * np.log(x) for x in p))
    kls.append(sum(a * np.log(a / c) for a, c in zip(p0, p)))
  np.testing.assert_allclose(out['probe/entropy'], np.mean(entropies), rtol=1e-5)
  np.testing.assert_allclose(out['probe/kl_to_start'], np.mean(kls), rtol=1e-5)


class _ScriptedRollout(train.Rollout):
  """Completions decided by (key, prompt, sample): the draws sampled_accuracy makes."""

  def __init__(self):  # pylint: disable=super-init-not-called
    self.keys = []

  def __call__(self, params, examples, key, *, num_samples=1, temperature=1.0, top_k=0, top_p=1):
    del params, temperature, top_k, top_p
    self.keys.append(key)
    index = np.repeat(np.arange(len(examples)), num_samples)
    texts = [
      f'#### {examples[i]["answer"] if (int(examples[i]["answer"]) + j) % 3 else "x"}'
      for i, j in zip(index, np.tile(np.arange(num_samples), len(examples)))
    ]
    return None, None, rl.Samples(None, None, None, None, index), texts


def test_sampled_accuracy_and_its_standard_error_over_prompts():
  examples = [{'prompt': f'Q: {i}\n', 'answer': str(i)} for i in range(10)]
  rollout = _ScriptedRollout()
  mean, se = rollout.sampled_accuracy(None, examples, jax.random.key(7), num_samples=4, max_rows=12)
  per_prompt = np.array([np.mean([(i + j) % 3 != 0 for j in range(4)]) for i in range(10)])
  assert mean == pytest.approx(per_prompt.mean())
  assert se == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(10))
  assert len(rollout.keys) == 4  # chunks of 3 prompts x 4 samples, each its own key
  for c, key in enumerate(rollout.keys):
    np.testing.assert_array_equal(
      jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(jax.random.key(7), c))
    )


def test_rl_step_on_8_devices_equals_one(policy):
  """The trainer's layout: batch rows over 'data', params and optimizer state FSDP-sharded."""
  model, params = policy
  _, batch = _rollout(model, params)
  batch['advantages'] = rl.group_advantages(jnp.arange(8, dtype=jnp.float32) % 3, 4)
  tx = optax.sgd(1e-2, momentum=0.9)  # Adam would magnify reduction-order noise of ~0 grads
  step_fn = _step_fn(model, _CAPO, tx)
  single, single_metrics = jax.jit(step_fn)(_state(params, tx), batch)
  mesh = train.make_mesh(data=2, fsdp=4, num_devices=8)
  state = _state(params, tx)
  shardings = train.fsdp_shardings(jax.eval_shape(lambda: state), mesh)
  step = jax.jit(
    step_fn, in_shardings=(shardings, train.batch_sharding(mesh)), out_shardings=(shardings, None)
  )
  sharded, sharded_metrics = step(
    jax.device_put(state, shardings), jax.device_put(batch, train.batch_sharding(mesh))
  )
  for key in ('loss', 'capo/masked_frac', 'grad_norm'):
    np.testing.assert_allclose(
      float(sharded_metrics[key]), float(single_metrics[key]), rtol=1e-5, atol=1e-7
    )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    sharded.params,
    single.params,
  )
  np.testing.assert_allclose(sharded.shadow.nu, single.shadow.nu, rtol=1e-5, atol=1e-12)


def test_prompt_stream_resumes_and_reshuffles_each_epoch():
  source = [{'prompt': str(i)} for i in range(5)]
  stream = train.PromptStream(source, seed=3)
  first = [e['prompt'] for e in stream.take(7)]
  assert sorted(first[:5]) == [str(i) for i in range(5)]  # one epoch is a permutation
  state = stream.get_state()
  rest = [e['prompt'] for e in stream.take(6)]
  other = train.PromptStream(source, seed=3)
  other.set_state(state)
  assert [e['prompt'] for e in other.take(6)] == rest


def test_halt_and_resume_equals_an_uninterrupted_run(tmp_path, mini_data_dir):
  del mini_data_dir  # the tasks are prepared under each run's own data dir below
  data_dir = str(tmp_path / 'tfds')
  full = train.train_rl(
    _rl_config(**{'task.data_dir': data_dir}), str(tmp_path / 'full'), reward_fn=_digit_reward
  )
  halted = train.train_rl(
    _rl_config(**{'task.data_dir': data_dir, 'halt_after_steps': 2}),
    str(tmp_path / 'resumed'),
    reward_fn=_digit_reward,
  )
  assert halted.halted and halted.step == 2
  resumed = train.train_rl(
    _rl_config(**{'task.data_dir': data_dir}), str(tmp_path / 'resumed'), reward_fn=_digit_reward
  )
  assert resumed.step == full.step == 4 and resumed.completions_seen == full.completions_seen

  def by_step(d):
    return {r['step']: r for r in train.read_metrics(d)}

  full_m, resumed_m = by_step(str(tmp_path / 'full')), by_step(str(tmp_path / 'resumed'))
  for step in (3, 4):
    for key in ('reward', 'loss', 'grad_norm', 'capo/masked_frac'):
      assert resumed_m[step][key] == full_m[step][key], (step, key)
  assert any(full_m[s]['grad_norm'] > 0 for s in (1, 2, 3, 4))  # the policy really moved
  # Evaluations (steps 0, 2, 4): greedy and sampled accuracy; the probe at every step.
  for step in (0, 2, 4):
    for key in ('eval_accuracy', 'eval_sampled_accuracy', 'eval_sampled_accuracy_se'):
      assert key in full_m[step], (step, key)
  assert full_m[0]['probe/kl_to_start'] == pytest.approx(0.0, abs=1e-6)
  assert all(full_m[s]['probe/entropy'] > 0 for s in range(5))
  assert full_m[4]['probe/kl_to_start'] > 0
  assert resumed_m[4]['eval_sampled_accuracy'] == full_m[4]['eval_sampled_accuracy']

  with pytest.raises(ValueError, match='config.capo differs'):
    train.train_rl(
      _rl_config(**{'task.data_dir': data_dir, 'capo.tau_H': 0.5}),
      str(tmp_path / 'resumed'),
      reward_fn=_digit_reward,
    )


# variant -> its capo.mode
_RL_VARIANTS = {
  'grpo_conservative': 'off',
  'grpo_aggressive': 'off',
  'drgrpo_aggressive': 'off',
  'capo_aggressive': 'capo',
  'drcapo_aggressive': 'capo',
  'capo_calibrated': 'capo',
  'random_aggressive': 'random',
  'capo_log': 'log',
  'test': 'capo',
}


@pytest.mark.parametrize('arg', sorted(_RL_VARIANTS))
def test_rl_configs(arg):
  config = train.load_config(os.path.join(_CONFIGS, 'rl.py'), arg)
  assert config.advantage in rl.ADVANTAGE_MODES and config.loss.agg in rl.AGG_MODES
  assert config.capo.mode == _RL_VARIANTS[arg]
  # Warm-up over 10% of the steps, cosine to 0, in every regime; the head untied.
  assert config.schedule.name == 'warmup_cosine' and config.schedule.final_fraction == 0.0
  assert config.schedule.warmup_steps == config.total_steps // 10
  config.total_steps = 300
  assert config.schedule.warmup_steps == 30  # follows an overridden total_steps
  assert config.model.tie_embeddings is False
  assert config.eval_every <= 5 and config.eval.probe_every == 1 or arg == 'test'
  assert config.eval.sampled_prompts * config.eval.samples_per_prompt >= 1024 or arg == 'test'
  assert config.seed == (100 if arg == 'capo_log' else 0)
  if 'aggressive' in arg or arg in ('capo_calibrated', 'capo_log'):
    conservative = train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'grpo_conservative')
    assert config.optimizer.learning_rate == 5 * conservative.optimizer.learning_rate
    assert 12 * config.rollout.prompts_per_step == conservative.rollout.prompts_per_step
    assert config.rollout.prompts_per_step * config.rollout.group_size == 32


# GRPO from a Hugging Face checkpoint on GSM8K-style JSONL; they differ only in the model.
_GSM8K_VARIANTS = ('qwen2_5_0_5b_gsm8k', 'qwen2_5_1_5b_gsm8k')


def test_every_rl_variant_is_tested():
  with pytest.raises(ValueError, match='unknown configs/rl.py variant') as error:
    train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'nope')
  valid = set(re.findall(r"'(\w+)'", str(error.value).split('valid:')[1]))
  assert valid == set(_RL_VARIANTS) | set(_GSM8K_VARIANTS)


@pytest.mark.parametrize('arg', _GSM8K_VARIANTS)
def test_gsm8k_configs(arg):
  config = train.load_config(os.path.join(_CONFIGS, 'rl.py'), arg)
  # The user names the checkpoint and the data; the checkpoint sets the shapes.
  assert config.init_from is None and config.task.name is None and config.model.name is None
  assert set(config.model) == {'name', 'dtype', 'param_dtype', 'remat', 'attention_impl', 'max_len'}
  assert (config.model.dtype, config.model.param_dtype, config.model.remat) == (
    'bfloat16',
    'float32',
    True,
  )
  assert config.task.max_prompt_len + config.rollout.max_new_tokens <= config.model.max_len
  # The reference GRPO recipe: G = 8, lr 1e-6, 10% warm-up then cosine to 0; 32 prompts
  # (one 8-GPU host's memory).
  roll = config.rollout
  assert (roll.group_size, roll.prompts_per_step, roll.max_new_tokens) == (8, 32, 512)
  assert config.optimizer.name == 'adamw' and config.optimizer.learning_rate == 1e-6
  assert config.schedule.name == 'warmup_cosine' and config.schedule.final_fraction == 0.0
  assert config.schedule.warmup_steps == config.total_steps // 10
  assert config.advantage in rl.ADVANTAGE_MODES and config.loss.agg in rl.AGG_MODES
  assert config.capo.mode == 'off' and config.loss.beta == 0.0
  assert isinstance(config.total_steps, int) and config.total_steps * 32 >= 3 * 7473 - 32
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.num_devices) == (1, -1, None)
  train.check_rl_config(_with(config, **{'task.name': 'jsonl:/data/gsm8k'}))


def _with(config, **overrides):
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(overrides)
  return config


# (overrides of a gsm8k variant, error fragment): the placeholders left unset.
_GSM8K_UNSET = [
  ({}, r'config.task.name is unset: .*--config.task.name=jsonl:/path/to/dir'),
  (
    {'task.name': 'jsonl:/data/gsm8k'},
    r"config.model.name is unset and config.init_from is not 'hf:/path'.*"
    r'--config.init_from=hf:/path/to/model',
  ),
]


@pytest.mark.parametrize('overrides,fragment', _GSM8K_UNSET)
def test_gsm8k_configs_refuse_to_start_unset(overrides, fragment, tmp_path):
  config = _with(
    train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'qwen2_5_0_5b_gsm8k'),
    **overrides,
    **{'mesh.num_devices': 1},
  )
  with pytest.raises(ValueError, match=fragment):
    train.train_rl(config, str(tmp_path))


def test_the_schedule_warms_up_then_decays_to_zero():
  config = train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'grpo_aggressive')
  optimizer = train.make_optimizer(config.optimizer, config.total_steps, config.schedule)
  peak, warmup = config.optimizer.learning_rate, config.total_steps // 10
  rates = np.array([float(optimizer.learning_rate(s)) for s in range(config.total_steps + 1)])
  assert rates[0] == 0.0 and rates[warmup] == pytest.approx(peak)
  np.testing.assert_allclose(rates[: warmup + 1], np.linspace(0, peak, warmup + 1), rtol=1e-5)
  decay = np.arange(warmup, config.total_steps + 1)
  want = 0.5 * peak * (1 + np.cos(np.pi * (decay - warmup) / (config.total_steps - warmup)))
  np.testing.assert_allclose(rates[warmup:], want, rtol=1e-4, atol=1e-12)
  assert rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_group_size_one_is_refused(tmp_path):
  with pytest.raises(ValueError, match='group_size must be >= 2'):
    train.train_rl(_rl_config(**{'rollout.group_size': 1}), str(tmp_path))
