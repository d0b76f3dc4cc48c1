"""Supervised fine-tuning on the synthetic tasks, behind experiments/sft.py.

The loss covers completion tokens only (TaskBatches' loss_mask). Checkpoints, resume, the
NaN guard, metrics and the progress line are the shared step loop's, as for train_lm; the
evaluation adds per-task exact-match accuracy of greedy completions of test prompts.
"""

import dataclasses
import functools
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
from curvopt.train import _lm
from curvopt.train import _loop
from curvopt.train import _optimizers
from curvopt.train import _rollout
from curvopt.train import _setup
from curvopt.train import _sharding

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
  """{task: weight} from a config's data.tasks (a dict, or a comma-separated str of names).

  A name is a synthetic task or 'jsonl:/path/to/dir' (data.jsonl_task_source's files).
  """
  if tasks is None:
    raise ValueError(
      'data.tasks is unset: name synthetic tasks (e.g. arithmetic,reversal) or a directory of '
      'GSM8K-style train.jsonl / test.jsonl, --config.data.tasks=jsonl:/path/to/dir'
    )
  if isinstance(tasks, str):
    names = [t.strip() for t in tasks.split(',') if t.strip()]
    weights = {name: 1.0 for name in names}
  else:
    weights = {str(k): float(v) for k, v in dict(tasks).items()}
  if not weights:
    raise ValueError(f'data.tasks names no task: {tasks!r}')
  unknown = sorted(
    n for n in weights if n not in data_lib.ALL_TASKS and not n.startswith(data_lib.JSONL_PREFIX)
  )
  if unknown:
    raise ValueError(
      f'unknown task(s) {unknown} in data.tasks; valid: {list(data_lib.ALL_TASKS)} or '
      f"'{data_lib.JSONL_PREFIX}/path/to/dir' (GSM8K-style train.jsonl / test.jsonl)"
    )
  return weights


def restore_params(
  init_from: str, abstract_params: Any, model_cfg: 'models.DecoderConfig'
) -> tuple[Any, int]:
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
    options=ocp.CheckpointManagerOptions(
      read_only=True, save_interval_steps=0, max_to_keep=None, create=False
    ),
    item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()},
  )
  try:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f'config.init_from={init_from!r} holds no checkpoint')
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    saved_cfg = _setup.model_config_from(ml_collections.ConfigDict(saved['model']))
    details = _setup.describe_differences(
      {
        f.name: (getattr(saved_cfg, f.name), getattr(model_cfg, f.name))
        for f in dataclasses.fields(model_cfg)
        if f.name not in _NUMERICS_ONLY
      }
    )
    if details:
      raise ValueError(
        f'config.model differs from the model of init_from={init_from!r} ({details})'
      )
    target = {'params': abstract_params}
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        )
      ),
    )
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
    self._examples = {name: src[: min(ecfg.num_prompts, len(src))] for name, src in sources.items()}
    loss_batches = data_lib.TaskBatches(
      sources, tokenizer, batch_size=config.data.batch_size, seq_len=config.data.seq_len, seed=0
    )
    self._loss_set = [
      _device_batch(next(loss_batches), batch_sharding) for _ in range(ecfg.loss_batches)
    ]
    self._rollout = _rollout.Rollout(
      model, tokenizer, max_prompt_len=ecfg.max_prompt_len, max_new_tokens=ecfg.max_new_tokens
    )

  def loss(self, params) -> float:
    total, count = 0.0, 0.0
    for batch in self._loss_set:
      s, c = self._eval_step(params, batch)
      total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)

  def accuracy(self, params) -> dict[str, float]:
    return {
      name: self._rollout.accuracy(params, examples) for name, examples in self._examples.items()
    }

  def sampled_accuracy(self, params, *, num_samples: int, top_k: int, seed: int):
    """{task: (mean, standard error)} of sampled completions at temperature 1 (what an RL run
    starting from these params first samples)."""
    return {
      name: self._rollout.sampled_accuracy(
        params, examples, jax.random.key(seed), num_samples=num_samples, top_k=top_k
      )
      for name, examples in self._examples.items()
    }


def _device_batch(batch: dict, sharding) -> dict:
  # prompt_mask is for samplers; the step reads only these two.
  return {k: _sharding.put_global_batch(batch[k], sharding) for k in ('tokens', 'loss_mask')}


def _fresh_state(config, run: _setup.RunSetup, tx, steps: _lm.LMSteps):
  """The state of step 0: the model's initializer, or init_from's params."""
  if run.hf_dir is not None or not config.init_from:
    return _lm.fresh_state(run, tx, steps)
  params, from_step = restore_params(
    config.init_from,
    _checkpoint.abstract_like(steps.state_shapes.params, steps.state_shardings.params),
    run.model_cfg,
  )
  logging.info('initialized params from step %d of %s', from_step, config.init_from)
  return _lm.state_from_params(params, tx, steps)


def train_sft(config: ml_collections.ConfigDict, workdir: str) -> SftResult:
  """Fine-tunes (or resumes fine-tuning) a decoder on a task mixture; returns the final numbers."""
  started = time.perf_counter()
  weights = task_weights(config.data.tasks)
  run = _setup.setup_run(config, workdir)
  if config.data.seq_len > run.model_cfg.max_len:
    raise ValueError(
      f'data.seq_len={config.data.seq_len} exceeds the model max_len {run.model_cfg.max_len}'
    )
  data_dir = config.data.data_dir or data_lib.default_data_dir(workdir)
  batches = data_lib.TaskBatches(
    {name: data_lib.task_source(name, 'train', data_dir=data_dir) for name in weights},
    run.tokenizer,
    batch_size=config.data.batch_size,
    seq_len=config.data.seq_len,
    seed=config.seed,
    weights=weights,
  )
  optimizer = _optimizers.make_optimizer(config.optimizer, config.total_steps, config.schedule)
  steps = _lm.make_lm_steps(
    run.model, optimizer, run.tokenizer, run.mesh, seq_len=config.data.seq_len, seed=config.seed
  )
  evaluator = _Evaluator(
    config, run.model, run.tokenizer, data_dir, steps.batch_sharding, steps.eval_step
  )

  def init():
    state = _fresh_state(config, run, optimizer.tx, steps)
    logging.info(
      '%s (%d parameters) on mesh %s, tasks %s',
      config.model.name,
      models.count_params(state.params),
      dict(run.mesh.shape),
      batches.weights,
    )
    return state

  ckpt = _setup.make_checkpointer(config, workdir)
  state = _setup.restore_or_init(
    config,
    ckpt,
    run_defining=_RUN_DEFINING,
    data=batches,
    init=init,
    abstract_state=_checkpoint.abstract_like(steps.state_shapes, steps.state_shardings),
  )

  accuracy: dict[str, float] = {}
  shown = ['loss', 'eval_loss', 'accuracy/mean', 'learning_rate', 'grad_norm']

  def evaluate(params, step) -> dict[str, float]:
    del step
    nonlocal accuracy
    scalars = {'eval_loss': evaluator.loss(params)}
    if config.eval.num_prompts:
      accuracy = evaluator.accuracy(params)
      scalars.update({f'accuracy/{k}': v for k, v in accuracy.items()})
      scalars['accuracy/mean'] = float(np.mean(list(accuracy.values())))
      if len(accuracy) > 1:
        shown[5:] = [f'accuracy/{k}' for k in accuracy]
      if config.eval.get('samples_per_prompt'):
        sampled = evaluator.sampled_accuracy(
          params,
          num_samples=config.eval.samples_per_prompt,
          top_k=config.eval.top_k,
          seed=config.eval.seed,
        )
        for name, (mean, se) in sampled.items():
          scalars[f'sampled_accuracy/{name}'] = mean
          scalars[f'sampled_accuracy_se/{name}'] = se
        scalars['sampled_accuracy/mean'] = float(np.mean([m for m, _ in sampled.values()]))
        if 'sampled_accuracy/mean' not in shown:
          shown.insert(4, 'sampled_accuracy/mean')
    scalars['wall_s'] = time.perf_counter() - started
    return scalars

  place = functools.partial(_device_batch, sharding=steps.batch_sharding)
  result = _loop.run_loop(
    config,
    workdir,
    state=state,
    step_fn=lambda state, step: steps.train_step(state, place(next(batches))),
    data_state=batches.get_state,
    ckpt=ckpt,
    evaluate=evaluate,
    shown=lambda scalars: {k: scalars[k] for k in shown if k in scalars},
    work_per_step=config.data.batch_size * config.data.seq_len,
  )
  return SftResult(
    step=result.step,
    halted=result.halted,
    train_loss=result.scalars.get('loss', float('nan')),
    eval_loss=result.evaluation.get('eval_loss', float('nan')),
    accuracy=accuracy,
    mean_accuracy=float(np.mean(list(accuracy.values()))) if accuracy else float('nan'),
    tokens_per_s=result.rates.get('tokens_per_s', float('nan')),
    wall_s=time.perf_counter() - started,
  )
