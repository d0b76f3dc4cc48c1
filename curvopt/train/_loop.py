"""The language-model training loop behind experiments/train_lm.py."""
import dataclasses
import json
import math
import os
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np

from curvopt import data as data_lib
from curvopt import models
from curvopt.train import _checkpoint
from curvopt.train import _metrics
from curvopt.train import _optimizers
from curvopt.train import _sharding
from curvopt.train import _step

# Config sections that must match a checkpoint's for a resume to be the same run.
_RUN_DEFINING = ('model', 'data', 'optimizer', 'schedule', 'seed', 'total_steps')


class NonFiniteError(FloatingPointError):
  """A loss or gradient went non-finite; the state of that step is never checkpointed."""


@dataclasses.dataclass
class RunResult:
  step: int
  halted: bool
  train_loss: float
  eval_loss: float
  tokens_per_s: float


def resolve_dtype(name: str) -> str:
  """'auto' is bf16 compute on accelerators and fp32 on the CPU."""
  if name == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return name


def model_config_from(cfg: ml_collections.ConfigDict) -> 'models.DecoderConfig':
  overrides = {k: v for k, v in cfg.items() if k != 'name' and v is not None}
  overrides['dtype'] = resolve_dtype(overrides.get('dtype', 'auto'))
  return models.model_config(cfg.name, **overrides)


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _without_unset(value):
  # A field added to the configs after a run was saved (default None) does not change that run.
  if isinstance(value, dict):
    return {k: _without_unset(v) for k, v in value.items() if v is not None}
  return value


def _run_defining(key: str, value):
  value = _without_unset(value)
  if key == 'optimizer' and isinstance(value, dict):
    ignored = _optimizers.fields_ignored_by(value.get('name'))
    value = {k: v for k, v in value.items() if k not in ignored}
  return value


def check_resume_compatible(saved: dict, config: dict, keys=_RUN_DEFINING) -> None:
  """Raises unless the saved run's config equals this one on every run-defining key.

  Fields added to the configs later (unset) and optimizer fields that the run's optimizer does
  not read are ignored; the error names the fields that differ.
  """
  for key in keys:
    old, new = _run_defining(key, saved.get(key)), _run_defining(key, config.get(key))
    if old != new:
      if isinstance(old, dict) and isinstance(new, dict):
        detail = describe_differences({k: (old.get(k), new.get(k))
                                       for k in sorted(set(old) | set(new))})
      else:
        detail = f'saved {old!r}, config {new!r}'
      raise ValueError(f'config.{key} differs from the checkpoint\'s ({detail}); use a new '
                       'workdir for a different run')


def describe_differences(pairs: dict) -> str:
  """'k: saved A, config B' for each key whose (saved, config) pair differs."""
  return ', '.join(f'{k}: saved {s!r}, config {c!r}' for k, (s, c) in pairs.items() if s != c)


def _check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches pending step metrics; raises NonFiniteError naming the first bad step and quantity."""
  fetched = jax.device_get(pending)
  for step, metrics in fetched:
    for name in ('loss', 'grad_norm'):
      if not math.isfinite(float(metrics[name])):
        raise NonFiniteError(
            f'non-finite {name} ({float(metrics[name])}) at step {step}; stopping without '
            f'checkpointing this state (last checkpoint is unchanged)')
  return fetched


def _mean_metrics(fetched: list[tuple[int, dict]]) -> dict[str, float]:
  keys = fetched[-1][1].keys()
  return {k: float(np.mean([m[k] for _, m in fetched])) for k in keys}



class LMSteps(NamedTuple):
  """The jit'd pieces of a next-token-prediction trainer, with the shardings they use."""
  init_state: Callable[[jax.Array], Any]
  rng: jax.Array
  state_shapes: Any
  state_shardings: Any
  batch_sharding: Any
  train_step: Callable
  eval_step: Callable


def make_lm_steps(model, optimizer: '_optimizers.Optimizer', tokenizer, mesh, *, seq_len: int,
                  seed: int) -> LMSteps:
  """Train and eval steps jit'd once with explicit shardings (FSDP state, data-parallel batch)."""

  def logits_fn(params, tokens):
    return model.apply({'params': params}, tokens)[0]

  init_state = _step.make_init_state(model, optimizer.tx, seq_len=seq_len)
  rng = jax.random.key(seed)
  state_shapes = jax.eval_shape(init_state, rng)
  state_shardings = _sharding.fsdp_shardings(state_shapes, mesh)
  batch_sharding = _sharding.batch_sharding(mesh)
  train_step = jax.jit(
      _step.make_train_step(logits_fn, optimizer.tx, pad_id=tokenizer.pad_id,
                            learning_rate=optimizer.learning_rate,
                            optimizer_stats=optimizer.stats),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, None),
      donate_argnums=0)
  eval_step = jax.jit(_step.make_eval_step(logits_fn, pad_id=tokenizer.pad_id),
                      in_shardings=(state_shardings.params, batch_sharding))
  return LMSteps(init_state, rng, state_shapes, state_shardings, batch_sharding, train_step,
                 eval_step)


def train_lm(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains (or resumes training of) a decoder LM as the config says; returns the final numbers."""
  if config.total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {config.total_steps}')
  os.makedirs(workdir, exist_ok=True)
  mesh = _sharding.make_mesh(**config.mesh)
  model_cfg = model_config_from(config.model)
  model = models.Decoder(model_cfg)
  tokenizer = data_lib.ByteTokenizer()
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model vocab_size {model_cfg.vocab_size} < tokenizer vocab_size '
                     f'{tokenizer.vocab_size}')

  data_dir = config.data.data_dir or data_lib.default_data_dir(workdir)
  batches = data_lib.PackedBatches(
      data_lib.text_source(config.data.name, 'train', data_dir=data_dir), tokenizer,
      batch_size=config.data.batch_size, seq_len=config.data.seq_len, seed=config.seed)
  eval_set = data_lib.eval_batches(
      data_lib.text_source(config.data.name, config.data.eval_split, data_dir=data_dir),
      tokenizer, batch_size=config.data.batch_size, seq_len=config.data.seq_len,
      num_batches=config.data.eval_batches)

  optimizer = _optimizers.make_optimizer(config.optimizer, config.total_steps, config.schedule)

  steps = make_lm_steps(model, optimizer, tokenizer, mesh, seq_len=config.data.seq_len,
                        seed=config.seed)
  init_state, rng, state_shapes, state_shardings, batch_sharding, train_step, eval_step = steps

  config_json = config_to_json(config)
  ckpt = _checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                  save_every=config.checkpoint.every,
                                  async_save=config.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(init_state, out_shardings=state_shardings)(rng)
    logging.info('initialized %s (%d parameters) on mesh %s', config.model.name,
                 models.count_params(state.params), dict(mesh.shape))
  else:
    check_resume_compatible(ckpt.saved_config(latest), config_json)
    state, data_pos = ckpt.restore(
        latest, _checkpoint.abstract_like(state_shapes, state_shardings))
    batches.set_state(data_pos)
    logging.info('resumed from step %d in %s', latest, ckpt.directory)

  def evaluate(params) -> dict[str, float]:
    total, count = 0.0, 0.0
    for tokens in eval_set:
      s, c = eval_step(params, _sharding.put_global_batch(tokens, batch_sharding))
      total, count = total + float(s), count + float(c)
    return {'eval_loss': total / max(count, 1.0)}

  return run_steps(
      config, workdir, state=state, batches=batches, train_step=train_step,
      place=lambda tokens: _sharding.put_global_batch(tokens, batch_sharding), ckpt=ckpt,
      latest=latest, config_json=config_json, evaluate=evaluate,
      shown=lambda scalars: {k: v for k, v in scalars.items() if k in _SHOWN})


_SHOWN = ('loss', 'eval_loss', 'learning_rate', 'grad_norm')


def run_steps(config: ml_collections.ConfigDict, workdir: str, *, state: Any, batches: Any,
              train_step: Callable, place: Callable, ckpt: _checkpoint.Checkpointer,
              latest: int | None, config_json: dict,
              evaluate: Callable[[Any], dict[str, float]],
              shown: Callable[[dict], dict]) -> RunResult:
  """The step loop of the LM and SFT trainers, up to total_steps (or halt_after_steps).

  Runs train_step on place(next(batches)); at log, eval and checkpoint steps fetches the pending
  metrics (raising NonFiniteError on a non-finite loss or gradient norm), writes their means with
  the throughput and evaluate(params)'s scalars (which hold 'eval_loss') on eval steps, logs
  shown(scalars), and checkpoints the state with the batches' position. Closes ckpt.
  """
  writer = _metrics.MetricWriter(workdir, tensorboard=config.tensorboard)
  step = int(state.step)
  stop_at = config.total_steps
  if config.halt_after_steps:
    stop_at = min(stop_at, config.halt_after_steps)
  progress = _metrics.Progress(step, config.total_steps,
                               config.data.batch_size * config.data.seq_len)
  pending: list[tuple[int, dict]] = []
  clock_started = False
  train_loss, eval_loss, last_saved = float('nan'), float('nan'), latest
  try:
    while step < stop_at:
      state, metrics = train_step(state, place(next(batches)))
      step += 1
      pending.append((step, metrics))
      if not clock_started:
        jax.block_until_ready(metrics)
        progress.start(step)  # after the first (compiling) step, so rates are steady-state
        clock_started = True
      is_last = step == stop_at
      log_now = step % config.log_every == 0 or is_last
      eval_now = (config.eval_every and step % config.eval_every == 0) or is_last
      save_now = ckpt.should_save(step) or is_last
      if log_now or eval_now or save_now:
        fetched = _check_finite(pending)
        pending = []
        scalars = _mean_metrics(fetched)
        train_loss = scalars['loss']
        scalars.update(progress.rates(step))
        if eval_now:
          scalars.update(evaluate(state.params))
          eval_loss = scalars['eval_loss']
        writer.write(step, scalars)
        progress.log(step, shown(scalars))
      if save_now:
        ckpt.save(step, state, batches.get_state(), config_json)
        last_saved = step
  finally:
    writer.close()
    ckpt.close()
  halted = step < config.total_steps
  logging.info('%s at step %d (last checkpoint %s)', 'halted' if halted else 'finished', step,
               last_saved)
  return RunResult(step=step, halted=halted, train_loss=train_loss, eval_loss=eval_loss,
                   tokens_per_s=progress.rates(step).get('tokens_per_s', float('nan')))
