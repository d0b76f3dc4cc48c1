"""The language-model trainer behind experiments/train_lm.py."""

import dataclasses
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np

from curvopt import data as data_lib
from curvopt import models
from curvopt.train import _checkpoint
from curvopt.train import _loop
from curvopt.train import _optimizers
from curvopt.train import _setup
from curvopt.train import _sharding
from curvopt.train import _state
from curvopt.train import _step

# Config sections that must match a checkpoint's for a resume to be the same run.
_RUN_DEFINING = ('model', 'data', 'optimizer', 'schedule', 'seed', 'total_steps', 'init_from')
_SHOWN = ('loss', 'eval_loss', 'learning_rate', 'grad_norm')


@dataclasses.dataclass
class RunResult:
  step: int
  halted: bool
  train_loss: float
  eval_loss: float
  tokens_per_s: float


class LMSteps(NamedTuple):
  """The jit'd pieces of a next-token-prediction trainer, with the shardings they use."""

  init_state: Callable[[jax.Array], Any]
  rng: jax.Array
  state_shapes: Any
  state_shardings: Any
  batch_sharding: Any
  train_step: Callable
  eval_step: Callable


def make_lm_steps(
  model, optimizer: '_optimizers.Optimizer', tokenizer, mesh, *, seq_len: int, seed: int
) -> LMSteps:
  """Train and eval steps jit'd once with explicit shardings (FSDP state, data-parallel batch)."""

  def logits_fn(params, tokens):
    return model.apply({'params': params}, tokens)[0]

  init_state = _step.make_init_state(model, optimizer.tx, seq_len=seq_len)
  rng = jax.random.key(seed)
  state_shapes = jax.eval_shape(init_state, rng)
  state_shardings = _sharding.fsdp_shardings(state_shapes, mesh)
  batch_sharding = _sharding.batch_sharding(mesh)
  train_step = jax.jit(
    _step.make_train_step(
      logits_fn,
      optimizer.tx,
      pad_id=tokenizer.pad_id,
      learning_rate=optimizer.learning_rate,
      optimizer_stats=optimizer.stats,
      grad_clip_norm=optimizer.grad_clip_norm,
    ),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    _step.make_eval_step(logits_fn, pad_id=tokenizer.pad_id),
    in_shardings=(state_shardings.params, batch_sharding),
  )
  return LMSteps(
    init_state, rng, state_shapes, state_shardings, batch_sharding, train_step, eval_step
  )


def state_from_params(params, tx, steps: LMSteps):
  """The TrainState of step 0 with given params, placed as steps' state.

  A fresh optimizer state (AdamW's moments start at 0) and the rng init_state would have
  made, without compiling the model's initializer.
  """
  opt_state = jax.jit(tx.init, out_shardings=steps.state_shardings.opt_state)(params)
  _, state_rng = jax.random.split(steps.rng)
  return _state.TrainState(
    step=jax.device_put(np.zeros((), np.int32), steps.state_shardings.step),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(jax.random.key_data(state_rng), steps.state_shardings.rng),
  )


def fresh_state(run: '_setup.RunSetup', tx, steps: LMSteps):
  """The state of step 0: the model's initializer, or the Hugging Face checkpoint's params."""
  if run.hf_dir is None:
    return jax.jit(steps.init_state, out_shardings=steps.state_shardings)(steps.rng)
  return state_from_params(_setup.hf_params(run, steps.state_shardings.params), tx, steps)


def train_lm(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains (or resumes training of) a decoder LM as the config says; returns the final numbers."""
  init_from = config.get('init_from')
  if init_from and not init_from.startswith(_setup.HF_PREFIX):
    raise ValueError(
      f"train_lm's config.init_from={init_from!r} must be 'hf:/path/to/model' (a Hugging Face "
      'model directory); sft and train_rl start from train_lm workdirs'
    )
  run = _setup.setup_run(config, workdir)
  data_dir = config.data.data_dir or data_lib.default_data_dir(workdir)
  batches = data_lib.PackedBatches(
    data_lib.text_source(config.data.name, 'train', data_dir=data_dir),
    run.tokenizer,
    batch_size=config.data.batch_size,
    seq_len=config.data.seq_len,
    seed=config.seed,
  )
  eval_set = data_lib.eval_batches(
    data_lib.text_source(config.data.name, config.data.eval_split, data_dir=data_dir),
    run.tokenizer,
    batch_size=config.data.batch_size,
    seq_len=config.data.seq_len,
    num_batches=config.data.eval_batches,
  )
  optimizer = _optimizers.make_optimizer(config.optimizer, config.total_steps, config.schedule)
  steps = make_lm_steps(
    run.model, optimizer, run.tokenizer, run.mesh, seq_len=config.data.seq_len, seed=config.seed
  )

  def place(tokens):
    return _sharding.put_global_batch(tokens, steps.batch_sharding)

  def init():
    state = fresh_state(run, optimizer.tx, steps)
    logging.info(
      'initialized %s (%d parameters) on mesh %s',
      run.hf_dir or config.model.name,
      models.count_params(state.params),
      dict(run.mesh.shape),
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

  def evaluate(params, step) -> dict[str, float]:
    del step
    total, count = 0.0, 0.0
    for tokens in eval_set:
      s, c = steps.eval_step(params, place(tokens))
      total, count = total + float(s), count + float(c)
    return {'eval_loss': total / max(count, 1.0)}

  result = _loop.run_loop(
    config,
    workdir,
    state=state,
    step_fn=lambda state, step: steps.train_step(state, place(next(batches))),
    data_state=batches.get_state,
    ckpt=ckpt,
    evaluate=evaluate,
    shown=lambda scalars: {k: v for k, v in scalars.items() if k in _SHOWN},
    work_per_step=config.data.batch_size * config.data.seq_len,
  )
  return RunResult(
    step=result.step,
    halted=result.halted,
    train_loss=result.scalars.get('loss', float('nan')),
    eval_loss=result.evaluation.get('eval_loss', float('nan')),
    tokens_per_s=result.rates.get('tokens_per_s', float('nan')),
  )
