"""The RL trainer: sample groups of completions, reward them, one policy-gradient step each."""

import dataclasses
import functools
import os
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
_SHOWN = (
  'reward',
  'eval_accuracy',
  'eval_sampled_accuracy',
  'completion_len',
  'capo/nz/masked_frac',
  'probe/entropy',
  'probe/kl_to_start',
)
# Where a run in capo.mode 'log' writes each step's per-token stats (calibration's input).
CAPO_TOKENS_DIR = 'capo_tokens'


@dataclasses.dataclass(frozen=True)
class RLResult:
  step: int
  halted: bool
  reward: float  # mean reward of the last step's completions
  eval_accuracy: float  # held-out greedy accuracy at the last evaluation
  completions_seen: int
  eval_sampled_accuracy: float = float('nan')  # held-out sampled accuracy, last evaluation


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


def _capo_options(config):
  """The CAPO options of make_rl_step for capo.mode 'capo' / 'log' (None otherwise).

  The shadow Adam models the real optimizer's step, so its b1, b2 and eps are the optimizer
  config's; capo.b1 / b2 / eps may only restate them.
  """
  cfg = config.capo
  if cfg.mode not in _rl_step.MASK_MODES:
    raise ValueError(f'unknown capo.mode {cfg.mode!r}; valid: {list(_rl_step.MASK_MODES)}')
  if cfg.mode == 'random' and (cfg.random_rate is None or not 0 <= cfg.random_rate <= 1):
    raise ValueError(f"capo.mode 'random' needs capo.random_rate in [0, 1], got {cfg.random_rate}")
  if cfg.mode not in ('capo', 'log'):
    return None
  for field in ('tau_H', 'tau_F'):
    if cfg[field] is None:
      raise ValueError(
        f'capo.{field} is unset: set it (e.g. calibrated from a capo.mode=log run with '
        f'experiments/capo_calibrate.py)'
      )
  shadow = {}
  for field in ('b1', 'b2', 'eps'):
    given, real = cfg.get(field), config.optimizer[field]
    if given is not None and given != real:
      raise ValueError(
        f"capo.{field}={given!r} differs from optimizer.{field}={real!r}: CAPO's shadow Adam "
        f"models the optimizer's own step; unset capo.{field} (it follows the optimizer)"
      )
    shadow[field] = real
  return dict(
    tau_H=cfg.tau_H,
    tau_F=cfg.tau_F,
    symmetric=cfg.symmetric,
    top_k=cfg.top_k,
    chunk_size=cfg.chunk_size,
    **shadow,
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
  forward: Callable  # (params, batch) -> completion logits [N, L, V] and hidden [N, L, H]
  probe: Callable  # (params, batch, start logits) -> probe metrics


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
      capo_options=_capo_options(config),
      grad_clip_norm=optimizer.grad_clip_norm,
      mask_mode=config.capo.mode,
      random_rate=config.capo.random_rate if config.capo.mode == 'random' else None,
      random_seed=config.seed,
    ),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )
  ref_logp = jax.jit(lambda params, batch: _rl_step.completion_logprobs(apply_fn, params, batch)[0])

  def forward(params, batch):
    return _rl_step.completion_logits(apply_fn, params, batch)

  def probe(params, batch, start_logits):
    logits = forward(params, batch)[0]
    return _rl_step.probe_metrics(logits, start_logits, batch['completion_mask'])

  return _PolicySteps(
    init_state,
    param_shapes,
    state_shapes,
    state_shardings,
    batch_sharding,
    update,
    ref_logp,
    jax.jit(forward),
    jax.jit(probe),
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


class _Probe(NamedTuple):
  """A fixed batch of the starting policy's own samples and its logits on them."""

  batch: dict
  start_logits: jax.Array


def _make_probe(config, steps: _PolicySteps, rollout, examples, params) -> Optional[_Probe]:
  """The probe of config.eval (None with eval.probe_prompts = 0): one completion per prompt,
  sampled once from `params` (the starting policy) with a key of eval.seed."""
  ecfg = config.eval
  if not ecfg.probe_prompts:
    return None
  examples = examples[: ecfg.probe_prompts]
  key = jax.random.fold_in(jax.random.key(ecfg.seed), 1)
  prompts, prompt_mask, samples, _ = rollout(
    params,
    examples,
    key,
    temperature=config.rollout.temperature,
    top_k=config.rollout.top_k,
    top_p=config.rollout.top_p,
  )
  batch = _rl_step.rollout_batch(
    jnp.asarray(prompts), jnp.asarray(prompt_mask), samples.completions, samples.mask
  )
  # Replicated: a few rows, whatever the data axis divides.
  batch = jax.device_put(
    batch, jax.sharding.NamedSharding(steps.batch_sharding.mesh, jax.sharding.PartitionSpec())
  )
  return _Probe(batch, steps.forward(params, batch)[0])


def _save_capo_tokens(directory: str, step: int, tokens: dict, advantages, mask) -> None:
  """Step `step`'s m_H, m_F and advantage of every valid token with A != 0, as an npz file."""
  if jax.process_index():
    return
  adv = np.broadcast_to(np.asarray(advantages, np.float32)[:, None], np.shape(mask))
  keep = (np.asarray(mask) > 0) & (adv != 0)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'step_{step:06d}.npz')
  with open(path + '.tmp', 'wb') as f:
    np.savez(
      f,
      m_H=np.asarray(tokens['m_H'])[keep],
      m_F=np.asarray(tokens['m_F'])[keep],
      advantages=adv[keep],
    )
  os.replace(path + '.tmp', path)


class RLRun(NamedTuple):
  """What an RL run is built from, before any step: its data, sampler, jit'd steps, policy."""

  run: _setup.RunSetup
  stream: PromptStream  # the training prompts
  test: Any  # the held-out examples
  rollout: _rollout.Rollout
  reward_fn: rl.RewardFn
  optimizer: _optimizers.Optimizer
  steps: _PolicySteps
  init_params: Any  # the starting policy (init_from's params, or fresh ones)


def check_rl_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for an RL config train_rl would refuse (before any set-up)."""
  if not config.task.name:
    raise ValueError(
      'config.task.name is unset: name a synthetic task (e.g. arithmetic) or a directory of '
      'GSM8K-style train.jsonl / test.jsonl, --config.task.name=jsonl:/path/to/dir'
    )
  roll = config.rollout
  if roll.group_size < 2 and config.advantage != 'none':
    raise ValueError(
      f'rollout.group_size must be >= 2 for advantage {config.advantage!r}, got {roll.group_size}'
    )
  _capo_options(config)


def setup_rl(
  config: ml_collections.ConfigDict, workdir: str, reward_fn: Optional[rl.RewardFn] = None
) -> RLRun:
  """Checks the config and builds an RL run's pieces (no checkpoint is read or written)."""
  check_rl_config(config)
  roll = config.rollout
  run = _setup.setup_run(config, workdir)
  data_dir = config.task.data_dir or data_lib.default_data_dir(workdir)
  stream = PromptStream(
    data_lib.task_source(config.task.name, 'train', data_dir=data_dir), seed=config.seed
  )
  test = data_lib.task_source(config.task.name, 'test', data_dir=data_dir)
  rollout = _rollout.Rollout(
    run.model,
    run.tokenizer,
    max_prompt_len=config.task.max_prompt_len,
    max_new_tokens=roll.max_new_tokens,
  )
  optimizer = _optimizers.make_optimizer(config.optimizer, config.total_steps, config.schedule)
  steps = _make_policy_steps(config, run, optimizer)
  return RLRun(
    run,
    stream,
    test,
    rollout,
    reward_fn or rl.reward_fn(config.reward),
    optimizer,
    steps,
    _initial_params(config, run, steps),
  )


class _StepBatch(NamedTuple):
  batch: dict  # the update's inputs, placed on the mesh
  rewards: np.ndarray  # [N]
  advantages: np.ndarray  # [N]
  samples: rl.Samples
  rollout_s: float


def make_sampler(config, rl_run: 'RLRun') -> Callable[[Any, int], _StepBatch]:
  """sample_batch(params, step) -> the next prompts' groups, rewarded, as the update's batch."""
  roll, steps, rollout, stream = config.rollout, rl_run.steps, rl_run.rollout, rl_run.stream
  ref_params = rl_run.init_params if config.loss.beta > 0 else None
  base_key = jax.random.key(config.seed)

  def sample_batch(params, step) -> _StepBatch:
    t0 = time.perf_counter()
    examples = stream.take(roll.prompts_per_step)
    # The step's key depends only on (seed, step): a resumed run samples what it would have.
    key = jax.random.fold_in(base_key, step)
    prompts, prompt_mask, samples, texts = rollout(
      params,
      examples,
      key,
      num_samples=roll.group_size,
      temperature=roll.temperature,
      top_k=roll.top_k,
      top_p=roll.top_p,
    )
    index = np.asarray(samples.prompt_index)
    rewards = np.asarray(
      rl_run.reward_fn(
        [examples[i]['prompt'] for i in index], texts, [examples[i]['answer'] for i in index]
      ),
      np.float32,
    )
    advantages = np.asarray(rl.group_advantages(rewards, roll.group_size, mode=config.advantage))
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
    return _StepBatch(batch, rewards, advantages, samples, time.perf_counter() - t0)

  return sample_batch


def _make_step_fn(
  config,
  steps: _PolicySteps,
  sample_batch: Callable[[Any, int], _StepBatch],
  completions_per_step: int,
  probe: Optional[_Probe],
  tokens_dir: str,
):
  """One RL step: sample groups for the next prompts, reward them, one policy-gradient update."""
  probe_every = config.eval.probe_every if probe is not None else 0

  def step_fn(state, step):
    sampled = sample_batch(state.params, step)
    state, metrics = steps.update(state, sampled.batch)
    tokens = metrics.pop('capo_tokens', None)
    if tokens is not None:
      _save_capo_tokens(tokens_dir, step + 1, tokens, sampled.advantages, sampled.samples.mask)
    if probe_every and (step + 1) % probe_every == 0:
      metrics.update(steps.probe(state.params, probe.batch, probe.start_logits))
    return state, {
      **metrics,
      **_rollout_stats(sampled.rewards, sampled.samples, config.rollout.group_size),
      'rollout_s': sampled.rollout_s,
      'completions_seen': (step + 1) * completions_per_step,
    }

  return step_fn


def _make_evaluate(config, steps, rollout, test, probe, completions_per_step):
  """evaluate(params, step): greedy and sampled held-out accuracy, and the probe's metrics."""
  ecfg = config.eval
  greedy_examples = test[: min(config.task.eval_prompts, len(test))]
  sampled_examples = test[: min(ecfg.sampled_prompts, len(test))]
  sample_key = jax.random.key(ecfg.seed)

  def evaluate(params, step) -> dict[str, float]:
    out = {'completions_seen': step * completions_per_step}
    if greedy_examples:
      out['eval_accuracy'] = rollout.accuracy(params, greedy_examples)
    if sampled_examples and ecfg.samples_per_prompt:
      mean, se = rollout.sampled_accuracy(
        params,
        sampled_examples,
        sample_key,
        num_samples=ecfg.samples_per_prompt,
        temperature=ecfg.temperature,
        top_k=ecfg.top_k,
      )
      out.update(eval_sampled_accuracy=mean, eval_sampled_accuracy_se=se)
    if probe is not None:
      out.update(
        {k: float(v) for k, v in steps.probe(params, probe.batch, probe.start_logits).items()}
      )
    return out

  return evaluate


def train_rl(
  config: ml_collections.ConfigDict, workdir: str, reward_fn: Optional[rl.RewardFn] = None
) -> RLResult:
  """Trains (or resumes) a policy on a task's verifiable reward as the config says.

  `reward_fn(prompts, completions, answers) -> [N]` replaces the registry's `config.reward`
  (a TRL-style reward function of your own). Evaluations (config.eval_every, and step 0) log
  held-out greedy accuracy ('eval_accuracy', task.eval_prompts prompts), sampled accuracy
  ('eval_sampled_accuracy' and its standard error, eval.sampled_prompts x
  eval.samples_per_prompt completions at eval.temperature / eval.top_k) and the probe's
  entropy and KL to the starting policy ('probe/...', also every eval.probe_every steps).
  In capo.mode 'log' each step's per-token stats go to <workdir>/capo_tokens/.
  """
  rl_run = setup_rl(config, workdir, reward_fn)
  roll, steps, init_params = config.rollout, rl_run.steps, rl_run.init_params
  probe = _make_probe(config, steps, rl_run.rollout, rl_run.test, init_params)

  ckpt = _setup.make_checkpointer(config, workdir)
  state = _setup.restore_or_init(
    config,
    ckpt,
    run_defining=_RUN_DEFINING,
    data=rl_run.stream,
    init=lambda: jax.jit(steps.init_state, out_shardings=steps.state_shardings)(init_params),
    abstract_state=_checkpoint.abstract_like(steps.state_shapes, steps.state_shardings),
  )
  completions_per_step = roll.prompts_per_step * roll.group_size

  result = _loop.run_loop(
    config,
    workdir,
    state=state,
    step_fn=_make_step_fn(
      config,
      steps,
      make_sampler(config, rl_run),
      completions_per_step=completions_per_step,
      probe=probe,
      tokens_dir=os.path.join(workdir, CAPO_TOKENS_DIR),
    ),
    data_state=rl_run.stream.get_state,
    ckpt=ckpt,
    evaluate=_make_evaluate(
      config, steps, rl_run.rollout, rl_run.test, probe, completions_per_step
    ),
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
    eval_sampled_accuracy=result.evaluation.get('eval_sampled_accuracy', float('nan')),
  )
