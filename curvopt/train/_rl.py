"""The RL trainer: sample groups of completions, reward them, one policy-gradient step each."""

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from curvopt import data as data_lib
from curvopt import models
from curvopt import rl
from curvopt.train import _checkpoint
from curvopt.train import _loop
from curvopt.train import _optimizers
from curvopt.train import _rl_step
from curvopt.train import _rollout
from curvopt.train import _setup
from curvopt.train import _sft
from curvopt.train import _sharding

# A resumed run must be the same run: these config fields may not change across a restart.
_RUN_DEFINING = (
  'model',
  'task',
  'rollout',
  'reward',
  'advantage',
  'loss',
  'capo',
  'optimizer',
  'schedule',
  'seed',
  'total_steps',
  'init_from',
)
_SHOWN = ('reward', 'eval_accuracy', 'completion_len', 'capo/masked_frac', 'entropy')


@dataclasses.dataclass(frozen=True)
class RLResult:
  step: int
  halted: bool
  reward: float  # mean reward of the last step's completions
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
    out = [
      self._source[self._perm(i // n, i % n)] for i in range(self.position, self.position + count)
    ]
    self.position += count
    return out

  def get_state(self) -> dict:
    return {'position': self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state['position'])


def _capo_options(cfg):
  if not cfg.enabled:
    return None
  return dict(
    tau_H=cfg.tau_H,
    tau_F=cfg.tau_F,
    symmetric=cfg.symmetric,
    top_k=cfg.top_k,
    chunk_size=cfg.chunk_size,
  )


def _rollout_stats(rewards, samples, group_size) -> dict[str, float]:
  lengths = np.asarray(samples.mask).sum(axis=1)
  group_std = rewards.reshape(-1, group_size).std(axis=1)
  return {
    'reward': float(rewards.mean()),
    'reward_std': float(rewards.std()),
    'zero_std_groups': float(np.mean(group_std == 0)),
    'completion_len': float(lengths.mean()),
    'truncated': float(np.asarray(samples.truncated).mean()),
  }


class _PolicySteps(NamedTuple):
  """The RL trainer's jit'd pieces, with the shardings they use."""

  init_state: Callable[[Any], _rl_step.RLState]  # params -> the state of step 0
  param_shapes: Any
  state_shapes: Any
  state_shardings: Any
  batch_sharding: Any
  update: Callable  # (state, batch) -> (state, metrics)
  ref_logp: Callable  # (params, batch) -> completion log-probabilities


def _make_policy_steps(config, run: _setup.RunSetup, optimizer) -> _PolicySteps:
  """The policy-gradient update jit'd once with explicit shardings (FSDP state, rows on 'data')."""
  model, model_cfg, roll = run.model, run.model_cfg, config.rollout

  def apply_fn(params, tokens, positions, attention_mask):
    return model.apply(
      {'params': params}, tokens, positions=positions, attention_mask=attention_mask
    )

  seq_len = config.task.max_prompt_len + roll.max_new_tokens

  def init_state(params):
    return _rl_step.RLState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.tx.init(params),
      shadow=rl.capo_shadow_init(model_cfg.vocab_size, model_cfg.d_model),
    )

  param_shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))['params']
  )
  state_shapes = jax.eval_shape(init_state, param_shapes)
  state_shardings = _sharding.fsdp_shardings(state_shapes, run.mesh)
  batch_sharding = _sharding.batch_sharding(run.mesh)
  loss_options = dict(
    agg=config.loss.agg,
    eps_low=config.loss.eps_low,
    eps_high=config.loss.eps_high,
    dual_clip=config.loss.dual_clip,
    beta=config.loss.beta,
    kl=config.loss.kl,
    max_len=roll.max_new_tokens,
  )
  update = jax.jit(
    _rl_step.make_rl_step(
      apply_fn,
      functools.partial(models.output_head, cfg=model_cfg),
      optimizer.tx,
      learning_rate=optimizer.learning_rate,
      loss_options=loss_options,
      capo_options=_capo_options(config.capo),
      grad_clip_norm=optimizer.grad_clip_norm,
    ),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )
  ref_logp = jax.jit(lambda params, batch: _rl_step.completion_logprobs(apply_fn, params, batch)[0])
  return _PolicySteps(
    init_state, param_shapes, state_shapes, state_shardings, batch_sharding, update, ref_logp
  )


def _initial_params(config, run: _setup.RunSetup, steps: _PolicySteps):
  """init_from's params, placed as the state's; fresh ones without init_from."""
  if run.hf_dir is not None:
    return _setup.hf_params(run, steps.state_shardings.params)
  if config.init_from:
    params, _ = _sft.restore_params(
      config.init_from,
      _checkpoint.abstract_like(steps.param_shapes, steps.state_shardings.params),
      run.model_cfg,
    )
    return params
  # From scratch: for tests, and for a task the policy can learn by RL alone.
  seq_len = config.task.max_prompt_len + config.rollout.max_new_tokens
  return jax.jit(
    lambda: run.model.init(jax.random.key(config.seed), jnp.zeros((1, seq_len), jnp.int32))[
      'params'
    ],
    out_shardings=steps.state_shardings.params,
  )()


def _make_step_fn(
  config,
  steps: _PolicySteps,
  rollout: _rollout.Rollout,
  reward_fn: rl.RewardFn,
  stream: PromptStream,
  ref_params: Any,
  completions_per_step: int,
):
  """One RL step: sample groups for the next prompts, reward them, one policy-gradient update."""
  roll = config.rollout
  base_key = jax.random.key(config.seed)

  def step_fn(state, step):
    t0 = time.perf_counter()
    examples = stream.take(roll.prompts_per_step)
    # The step's key depends only on (seed, step): a resumed run samples what it would have.
    key = jax.random.fold_in(base_key, step)
    prompts, prompt_mask, samples, texts = rollout(
      state.params,
      examples,
      key,
      num_samples=roll.group_size,
      temperature=roll.temperature,
      top_k=roll.top_k,
      top_p=roll.top_p,
    )
    index = np.asarray(samples.prompt_index)
    rewards = np.asarray(
      reward_fn(
        [examples[i]['prompt'] for i in index], texts, [examples[i]['answer'] for i in index]
      ),
      np.float32,
    )
    advantages = rl.group_advantages(rewards, roll.group_size, mode=config.advantage)
    batch = _rl_step.rollout_batch(
      jnp.asarray(prompts)[index],
      jnp.asarray(prompt_mask)[index],
      samples.completions,
      samples.mask,
    )
    batch['advantages'] = jnp.asarray(advantages, jnp.float32)
    if ref_params is not None:
      batch['ref_logp'] = steps.ref_logp(ref_params, batch)
    batch = jax.device_put(batch, steps.batch_sharding)
    rollout_s = time.perf_counter() - t0
    state, metrics = steps.update(state, batch)
    return state, {
      **metrics,
      **_rollout_stats(rewards, samples, roll.group_size),
      'rollout_s': rollout_s,
      'completions_seen': (step + 1) * completions_per_step,
    }

  return step_fn


def train_rl(
  config: ml_collections.ConfigDict, workdir: str, reward_fn: Optional[rl.RewardFn] = None
) -> RLResult:
  """Trains (or resumes) a policy on a task's verifiable reward as the config says.

  `reward_fn(prompts, completions, answers) -> [N]` replaces the registry's `config.reward`
  (a TRL-style reward function of your own).
  """
  roll = config.rollout
  if roll.group_size < 2 and config.advantage != 'none':
    raise ValueError(
      f'rollout.group_size must be >= 2 for advantage {config.advantage!r}, got {roll.group_size}'
    )
  run = _setup.setup_run(config, workdir)
  data_dir = config.task.data_dir or data_lib.default_data_dir(workdir)
  stream = PromptStream(
    data_lib.task_source(config.task.name, 'train', data_dir=data_dir), seed=config.seed
  )
  test = data_lib.task_source(config.task.name, 'test', data_dir=data_dir)
  eval_examples = test[: min(config.task.eval_prompts, len(test))]
  rollout = _rollout.Rollout(
    run.model,
    run.tokenizer,
    max_prompt_len=config.task.max_prompt_len,
    max_new_tokens=roll.max_new_tokens,
  )
  reward_fn = reward_fn or rl.reward_fn(config.reward)
  optimizer = _optimizers.make_optimizer(config.optimizer, config.total_steps, config.schedule)
  steps = _make_policy_steps(config, run, optimizer)
  init_params = _initial_params(config, run, steps)

  ckpt = _setup.make_checkpointer(config, workdir)
  state = _setup.restore_or_init(
    config,
    ckpt,
    run_defining=_RUN_DEFINING,
    data=stream,
    init=lambda: jax.jit(steps.init_state, out_shardings=steps.state_shardings)(init_params),
    abstract_state=_checkpoint.abstract_like(steps.state_shapes, steps.state_shardings),
  )
  completions_per_step = roll.prompts_per_step * roll.group_size

  def evaluate(params, step) -> dict[str, float]:
    return {
      'eval_accuracy': rollout.accuracy(params, eval_examples),
      'completions_seen': step * completions_per_step,
    }

  result = _loop.run_loop(
    config,
    workdir,
    state=state,
    step_fn=_make_step_fn(
      config,
      steps,
      rollout,
      reward_fn,
      stream,
      ref_params=init_params if config.loss.beta > 0 else None,
      completions_per_step=completions_per_step,
    ),
    data_state=stream.get_state,
    ckpt=ckpt,
    evaluate=evaluate,
    shown=lambda scalars: {k: v for k, v in scalars.items() if k in _SHOWN},
    work_per_step=completions_per_step,
    unit='completions',
    write_every_step=True,
    evaluate_first=True,
  )
  return RLResult(
    step=result.step,
    halted=result.halted,
    reward=result.scalars.get('reward', float('nan')),
    eval_accuracy=result.evaluation.get('eval_accuracy', float('nan')),
    completions_seen=result.step * completions_per_step,
  )
