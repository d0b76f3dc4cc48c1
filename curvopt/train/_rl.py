"""The RL trainer: sample groups of completions, reward them, one policy-gradient step each."""
import dataclasses
import functools
import os
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from curvopt import data as data_lib
from curvopt import models
from curvopt import rl
from curvopt.train import _checkpoint
from curvopt.train import _loop
from curvopt.train import _metrics
from curvopt.train import _optimizers
from curvopt.train import _rl_step
from curvopt.train import _rollout
from curvopt.train import _sft
from curvopt.train import _sharding

# A resumed run must be the same run: these config fields may not change across a restart.
_RUN_DEFINING = ('model', 'task', 'rollout', 'reward', 'advantage', 'loss', 'capo', 'optimizer',
                 'schedule', 'seed', 'total_steps', 'init_from')


@dataclasses.dataclass(frozen=True)
class RLResult:
  step: int
  halted: bool
  reward: float  # mean reward of the last logged steps
  eval_accuracy: float  # held-out greedy accuracy at the last evaluation
  completions_seen: int


class PromptStream:
  """Task examples in a fresh seeded order every epoch; the position is one int (checkpointed)."""

  def __init__(self, source, *, seed: int):
    self._source = source
    self._perm = data_lib.IndexPermutation(len(source), seed=seed)
    self.position = 0

  def take(self, count: int) -> list[dict]:
    n = len(self._source)
    out = [self._source[self._perm(i // n, i % n)]
           for i in range(self.position, self.position + count)]
    self.position += count
    return out

  def get_state(self) -> dict:
    return {'position': self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state['position'])


def _capo_options(cfg):
  if not cfg.enabled:
    return None
  return dict(tau_H=cfg.tau_H, tau_F=cfg.tau_F, symmetric=cfg.symmetric, top_k=cfg.top_k,
              chunk_size=cfg.chunk_size)


def _rollout_stats(rewards, samples, group_size) -> dict[str, float]:
  lengths = np.asarray(samples.mask).sum(axis=1)
  group_std = rewards.reshape(-1, group_size).std(axis=1)
  return {'reward': float(rewards.mean()), 'reward_std': float(rewards.std()),
          'zero_std_groups': float(np.mean(group_std == 0)),
          'completion_len': float(lengths.mean()),
          'truncated': float(np.asarray(samples.truncated).mean())}


def train_rl(config: ml_collections.ConfigDict, workdir: str,
             reward_fn: Optional[rl.RewardFn] = None) -> RLResult:
  """Trains (or resumes) a policy on a task's verifiable reward as the config says.

  `reward_fn(prompts, completions, answers) -> [N]` replaces the registry's `config.reward`
  (a TRL-style reward function of your own).
  """
  if config.total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {config.total_steps}')
  roll = config.rollout
  if roll.group_size < 2 and config.advantage != 'none':
    raise ValueError(f'rollout.group_size must be >= 2 for advantage {config.advantage!r}, '
                     f'got {roll.group_size}')
  os.makedirs(workdir, exist_ok=True)
  mesh = _sharding.make_mesh(**config.mesh)
  model_cfg = _loop.model_config_from(config.model)
  model = models.Decoder(model_cfg)
  tokenizer = data_lib.ByteTokenizer()
  data_dir = config.task.data_dir or data_lib.default_data_dir(workdir)
  stream = PromptStream(data_lib.task_source(config.task.name, 'train', data_dir=data_dir),
                        seed=config.seed)
  test = data_lib.task_source(config.task.name, 'test', data_dir=data_dir)
  eval_examples = test[:min(config.task.eval_prompts, len(test))]
  rollout = _rollout.Rollout(model, tokenizer, max_prompt_len=config.task.max_prompt_len,
                             max_new_tokens=roll.max_new_tokens)
  reward_fn = reward_fn or rl.reward_fn(config.reward)
  optimizer = _optimizers.make_optimizer(config.optimizer, config.total_steps, config.schedule)

  def apply_fn(params, tokens, positions, attention_mask):
    return model.apply({'params': params}, tokens, positions=positions,
                       attention_mask=attention_mask)

  seq_len = config.task.max_prompt_len + roll.max_new_tokens

  def init_state(params):
    return _rl_step.RLState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=optimizer.tx.init(params),
                            shadow=rl.capo_shadow_init(model_cfg.vocab_size, model_cfg.d_model))

  param_shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))['params'])
  state_shapes = jax.eval_shape(init_state, param_shapes)
  state_shardings = _sharding.fsdp_shardings(state_shapes, mesh)
  batch_sharding = _sharding.batch_sharding(mesh)
  loss_options = dict(agg=config.loss.agg, eps_low=config.loss.eps_low,
                      eps_high=config.loss.eps_high, dual_clip=config.loss.dual_clip,
                      beta=config.loss.beta, kl=config.loss.kl,
                      max_len=roll.max_new_tokens)
  rl_step = jax.jit(
      _rl_step.make_rl_step(apply_fn, functools.partial(models.output_head, cfg=model_cfg), optimizer.tx,
                            learning_rate=optimizer.learning_rate, loss_options=loss_options,
                            capo_options=_capo_options(config.capo)),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=0)
  ref_logp_fn = jax.jit(
      lambda params, batch: _rl_step.completion_logprobs(apply_fn, params, batch)[0])

  if config.init_from:
    init_params, _ = _sft.restore_params(
        config.init_from, _checkpoint.abstract_like(param_shapes, state_shardings.params),
        model_cfg)
  else:  # from scratch: for tests, and for a task the policy can learn by RL alone
    init_params = jax.jit(lambda: model.init(jax.random.key(config.seed),
                                             jnp.zeros((1, seq_len), jnp.int32))['params'],
                          out_shardings=state_shardings.params)()
  ref_params = init_params if config.loss.beta > 0 else None

  config_json = _loop.config_to_json(config)
  ckpt = _checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                  save_every=config.checkpoint.every,
                                  async_save=config.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(init_state, out_shardings=state_shardings)(init_params)
  else:
    _loop.check_resume_compatible(ckpt.saved_config(latest), config_json, _RUN_DEFINING)
    state, position = ckpt.restore(latest, _checkpoint.abstract_like(state_shapes,
                                                                      state_shardings))
    stream.set_state(position)
    logging.info('resumed from step %d in %s', latest, ckpt.directory)

  writer = _metrics.MetricWriter(workdir, tensorboard=config.tensorboard)
  completions_per_step = roll.prompts_per_step * roll.group_size
  step = int(state.step)
  stop_at = min(config.total_steps, config.halt_after_steps or config.total_steps)
  progress = _metrics.Progress(step, config.total_steps, completions_per_step,
                              unit='completions')
  base_key = jax.random.key(config.seed)
  eval_accuracy, reward, last_saved, started = float('nan'), float('nan'), latest, False
  if step == 0 and config.eval_every:
    eval_accuracy = rollout.accuracy(state.params, eval_examples)
    writer.write(0, {'eval_accuracy': eval_accuracy, 'completions_seen': 0})
  try:
    while step < stop_at:
      t0 = time.perf_counter()
      examples = stream.take(roll.prompts_per_step)
      # The step's key depends only on (seed, step): a resumed run samples what it would have.
      key = jax.random.fold_in(base_key, step)
      prompts, prompt_mask, samples, texts = rollout(
          state.params, examples, key, num_samples=roll.group_size,
          temperature=roll.temperature, top_k=roll.top_k, top_p=roll.top_p)
      index = np.asarray(samples.prompt_index)
      rewards = np.asarray(reward_fn([examples[i]['prompt'] for i in index], texts,
                                     [examples[i]['answer'] for i in index]), np.float32)
      advantages = rl.group_advantages(rewards, roll.group_size, mode=config.advantage)
      batch = _rl_step.rollout_batch(jnp.asarray(prompts)[index], jnp.asarray(prompt_mask)[index],
                                     samples.completions, samples.mask)
      batch['advantages'] = jnp.asarray(advantages, jnp.float32)
      if ref_params is not None:
        batch['ref_logp'] = ref_logp_fn(ref_params, batch)
      batch = jax.device_put(batch, batch_sharding)
      rollout_s = time.perf_counter() - t0
      state, metrics = rl_step(state, batch)
      step += 1
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics['loss']) or not np.isfinite(metrics['grad_norm']):
        raise _loop.NonFiniteError(f'non-finite loss or grad_norm at step {step}; stopping '
                                   'without checkpointing this state (last checkpoint is '
                                   'unchanged)')
      if not started:
        progress.start(step)
        started = True
      stats = _rollout_stats(rewards, samples, roll.group_size)
      reward = stats['reward']
      scalars = {**metrics, **stats, **progress.rates(step), 'rollout_s': rollout_s,
                 'completions_seen': step * completions_per_step}
      is_last = step == stop_at
      if (config.eval_every and step % config.eval_every == 0) or is_last:
        eval_accuracy = rollout.accuracy(state.params, eval_examples)
        scalars['eval_accuracy'] = eval_accuracy
      if step % config.log_every == 0 or is_last or 'eval_accuracy' in scalars:
        progress.log(step, {k: v for k, v in scalars.items()
                            if k in ('reward', 'eval_accuracy', 'completion_len',
                                     'capo/masked_frac', 'entropy')})
      writer.write(step, scalars)
      if ckpt.should_save(step) or is_last:
        ckpt.save(step, state, stream.get_state(), config_json)
        last_saved = step
  finally:
    writer.close()
    ckpt.close()
  halted = step < config.total_steps
  logging.info('%s at step %d (last checkpoint %s)', 'halted' if halted else 'finished', step,
               last_saved)
  return RLResult(step=step, halted=halted, reward=reward, eval_accuracy=eval_accuracy,
                  completions_seen=step * completions_per_step)
