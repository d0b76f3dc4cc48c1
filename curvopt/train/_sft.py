"""Supervised fine-tuning on the synthetic tasks, behind experiments/sft.py.

The loss covers completion tokens only (TaskBatches' loss_mask). Checkpoints, resume, the
NaN guard, metrics and the progress line are train_lm's; the evaluation adds per-task
exact-match accuracy of greedy completions of test prompts.
"""
import dataclasses
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from curvopt import data as data_lib
from curvopt import models
from curvopt.train import _checkpoint
from curvopt.train import _loop
from curvopt.train import _optimizers
from curvopt.train import _rollout
from curvopt.train import _sharding
from curvopt.train import _state

# Config sections that must match a checkpoint's for a resume to be the same run.
_RUN_DEFINING = ('model', 'data', 'optimizer', 'schedule', 'seed', 'total_steps', 'init_from')
# DecoderConfig fields that may differ between a run and the run it starts from: they
# change how the parameters are used, not what they are.
_NUMERICS_ONLY = ('dtype', 'remat', 'attention_impl')


@dataclasses.dataclass
class SftResult:
  step: int
  halted: bool
  train_loss: float
  eval_loss: float
  accuracy: dict[str, float]  # per eval task, at the last evaluation
  mean_accuracy: float
  tokens_per_s: float
  wall_s: float  # this process's time in train_sft, compilation included


def task_weights(tasks: Any) -> dict[str, float]:
  """{task: weight} from a config's data.tasks (a dict, or a comma-separated str of names)."""
  if isinstance(tasks, str):
    names = [t.strip() for t in tasks.split(',') if t.strip()]
    weights = {name: 1.0 for name in names}
  else:
    weights = {str(k): float(v) for k, v in dict(tasks).items()}
  if not weights:
    raise ValueError(f'data.tasks names no task: {tasks!r}')
  unknown = sorted(set(weights) - set(data_lib.TASK_NAMES))
  if unknown:
    raise ValueError(f'unknown task(s) {unknown} in data.tasks; valid: {list(data_lib.TASK_NAMES)}')
  return weights


def restore_params(init_from: str, abstract_params: Any,
                   model_cfg: 'models.DecoderConfig') -> tuple[Any, int]:
  """The newest checkpoint's params of a train_lm / train_sft workdir, in the given shardings.

  Only the params are read (whatever optimizer the other run used), placed as
  `abstract_params` says, so the mesh of the run that wrote them does not matter.
  Returns (params, step of the checkpoint).
  """
  directory = os.path.join(os.path.abspath(init_from), 'checkpoints')
  if not os.path.isdir(directory):
    raise ValueError(f'config.init_from={init_from!r} has no checkpoints/ directory')
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                           max_to_keep=None, create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f'config.init_from={init_from!r} holds no checkpoint')
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    saved_cfg = _loop.model_config_from(ml_collections.ConfigDict(saved['model']))
    details = _loop.describe_differences(
        {f.name: (getattr(saved_cfg, f.name), getattr(model_cfg, f.name))
         for f in dataclasses.fields(model_cfg) if f.name not in _NUMERICS_ONLY})
    if details:
      raise ValueError(f'config.model differs from the model of init_from={init_from!r} '
                       f'({details})')
    target = {'params': abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    manager.close()
  return restored.state['params'], step


class _Evaluator:
  """Completion loss on fixed test batches, and exact-match accuracy of greedy samples."""

  def __init__(self, config, model, tokenizer, data_dir, batch_sharding, eval_step):
    self._batch_sharding = batch_sharding
    self._eval_step = eval_step
    ecfg = config.eval
    names = task_weights(ecfg.tasks or config.data.tasks)
    sources = {name: data_lib.task_source(name, 'test', data_dir=data_dir) for name in names}
    self._examples = {name: src[:min(ecfg.num_prompts, len(src))]
                      for name, src in sources.items()}
    loss_batches = data_lib.TaskBatches(
        sources, tokenizer, batch_size=config.data.batch_size, seq_len=config.data.seq_len,
        seed=0)
    self._loss_set = [_device_batch(next(loss_batches), batch_sharding)
                      for _ in range(ecfg.loss_batches)]
    self._rollout = _rollout.Rollout(model, tokenizer, max_prompt_len=ecfg.max_prompt_len,
                                     max_new_tokens=ecfg.max_new_tokens)

  def loss(self, params) -> float:
    total, count = 0.0, 0.0
    for batch in self._loss_set:
      s, c = self._eval_step(params, batch)
      total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)

  def accuracy(self, params) -> dict[str, float]:
    return {name: self._rollout.accuracy(params, examples)
            for name, examples in self._examples.items()}


def init_state_from_params(params, opt_state, rng, state_shardings):
  """The TrainState of step 0 with given params: the rng as make_init_state derives it."""
  _, state_rng = jax.random.split(rng)
  return _state.TrainState(
      step=jax.device_put(np.zeros((), np.int32), state_shardings.step), params=params,
      opt_state=opt_state,
      rng=jax.device_put(jax.random.key_data(state_rng), state_shardings.rng))


def _device_batch(batch: dict, sharding) -> dict:
  # prompt_mask is for samplers; the step reads only these two.
  return {k: _sharding.put_global_batch(batch[k], sharding) for k in ('tokens', 'loss_mask')}


def _initial_state(config, config_json: dict, ckpt, batches, model_cfg, tx, init_state, rng,
                   state_shapes, state_shardings):
  """The state to start from: the workdir's newest checkpoint, init_from's params, or fresh.

  A resume also moves `batches` to the checkpoint's data position.
  """
  latest = ckpt.latest_step()
  if latest is not None:
    _loop.check_resume_compatible(ckpt.saved_config(latest), config_json, keys=_RUN_DEFINING)
    state, data_pos = ckpt.restore(
        latest, _checkpoint.abstract_like(state_shapes, state_shardings))
    batches.set_state(data_pos)
    logging.info('resumed from step %d in %s', latest, ckpt.directory)
    return state
  if not config.init_from:
    return jax.jit(init_state, out_shardings=state_shardings)(rng)
  params, from_step = restore_params(
      config.init_from, _checkpoint.abstract_like(state_shapes.params, state_shardings.params),
      model_cfg)
  logging.info('initialized params from step %d of %s', from_step, config.init_from)
  # A fresh optimizer state for the restored params (AdamW's moments start at 0), and the
  # rng init_state would have made, without compiling the model's initializer.
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  return init_state_from_params(params, opt_state, rng, state_shardings)


def train_sft(config: ml_collections.ConfigDict, workdir: str) -> SftResult:
  """Fine-tunes (or resumes fine-tuning) a decoder on a task mixture; returns the final numbers."""
  started = time.perf_counter()
  if config.total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {config.total_steps}')
  weights = task_weights(config.data.tasks)
  os.makedirs(workdir, exist_ok=True)
  mesh = _sharding.make_mesh(**config.mesh)
  model_cfg = _loop.model_config_from(config.model)
  model = models.Decoder(model_cfg)
  tokenizer = data_lib.ByteTokenizer()
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model vocab_size {model_cfg.vocab_size} < tokenizer vocab_size '
                     f'{tokenizer.vocab_size}')
  if config.data.seq_len > model_cfg.max_len:
    raise ValueError(f'data.seq_len={config.data.seq_len} exceeds the model max_len '
                     f'{model_cfg.max_len}')

  data_dir = config.data.data_dir or data_lib.default_data_dir(workdir)
  batches = data_lib.TaskBatches(
      {name: data_lib.task_source(name, 'train', data_dir=data_dir) for name in weights},
      tokenizer, batch_size=config.data.batch_size, seq_len=config.data.seq_len,
      seed=config.seed, weights=weights)

  optimizer = _optimizers.make_optimizer(config.optimizer, config.total_steps, config.schedule)

  steps = _loop.make_lm_steps(model, optimizer, tokenizer, mesh, seq_len=config.data.seq_len,
                              seed=config.seed)
  init_state, rng, state_shapes, state_shardings, batch_sharding, train_step, eval_step = steps
  evaluator = _Evaluator(config, model, tokenizer, data_dir, batch_sharding, eval_step)

  config_json = _loop.config_to_json(config)
  ckpt = _checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                  save_every=config.checkpoint.every,
                                  async_save=config.checkpoint.async_save)
  latest = ckpt.latest_step()
  try:
    state = _initial_state(config, config_json, ckpt, batches, model_cfg, optimizer.tx,
                           init_state, rng, state_shapes, state_shardings)
  except BaseException:
    ckpt.close()
    raise
  if latest is None:
    logging.info('%s (%d parameters) on mesh %s, tasks %s', config.model.name,
                 models.count_params(state.params), dict(mesh.shape), batches.weights)

  accuracy: dict[str, float] = {}
  shown = ['loss', 'eval_loss', 'accuracy/mean', 'learning_rate', 'grad_norm']

  def evaluate(params) -> dict[str, float]:
    nonlocal accuracy
    scalars = {'eval_loss': evaluator.loss(params)}
    if config.eval.num_prompts:
      accuracy = evaluator.accuracy(params)
      scalars.update({f'accuracy/{k}': v for k, v in accuracy.items()})
      scalars['accuracy/mean'] = float(np.mean(list(accuracy.values())))
      if len(accuracy) > 1:
        shown[5:] = [f'accuracy/{k}' for k in accuracy]
    scalars['wall_s'] = time.perf_counter() - started
    return scalars

  result = _loop.run_steps(
      config, workdir, state=state, batches=batches, train_step=train_step,
      place=lambda batch: _device_batch(batch, batch_sharding), ckpt=ckpt, latest=latest,
      config_json=config_json, evaluate=evaluate,
      shown=lambda scalars: {k: scalars[k] for k in shown if k in scalars})
  return SftResult(step=result.step, halted=result.halted, train_loss=result.train_loss,
                   eval_loss=result.eval_loss, accuracy=accuracy,
                   mean_accuracy=float(np.mean(list(accuracy.values()))) if accuracy
                   else float('nan'),
                   tokens_per_s=result.tokens_per_s, wall_s=time.perf_counter() - started)
