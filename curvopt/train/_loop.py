"""The step loop of every trainer: halt, non-finite guard, metrics, evaluation, checkpoints."""

import dataclasses
import math
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from curvopt.train import _checkpoint
from curvopt.train import _metrics
from curvopt.train import _setup


class NonFiniteError(FloatingPointError):
  """A loss or gradient went non-finite; the state of that step is never checkpointed."""


@dataclasses.dataclass(frozen=True)
class LoopResult:
  step: int
  halted: bool
  scalars: dict[str, float]  # the last metrics record written (empty if no step ran)
  evaluation: dict[str, float]  # the last evaluation's scalars (empty if none ran)
  rates: dict[str, float]  # steps_per_s and <unit>_per_s over this process's steps


def _check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches pending step metrics; raises NonFiniteError naming the first bad step and quantity."""
  fetched = jax.device_get(pending)
  for step, metrics in fetched:
    for name in ('loss', 'grad_norm'):
      if not math.isfinite(float(metrics[name])):
        raise NonFiniteError(
          f'non-finite {name} ({float(metrics[name])}) at step {step}; stopping without '
          f'checkpointing this state (last checkpoint is unchanged)'
        )
  return fetched


def _mean_metrics(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """The means of the pending step metrics, after _check_finite."""
  fetched = _check_finite(pending)
  keys = pending[-1][1].keys()  # in the step's order: fetching sorts the keys
  return {k: float(np.mean([m[k] for _, m in fetched])) for k in keys}


def run_loop(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  state: Any,
  step_fn: Callable[[Any, int], tuple[Any, dict]],
  data_state: Callable[[], dict],
  ckpt: _checkpoint.Checkpointer,
  evaluate: Callable[[Any, int], dict[str, float]],
  shown: Callable[[dict], dict],
  work_per_step: int,
  unit: str = 'tokens',
  write_every_step: bool = False,
  evaluate_first: bool = False,
) -> LoopResult:
  """Runs step_fn from state.step up to config.total_steps (or halt_after_steps).

  `step_fn(state, step)` takes step `step + 1` (drawing its own batch) and returns the new state
  and metrics with at least 'loss' and 'grad_norm' (arrays are fetched only when needed). At
  log, eval and checkpoint steps (every step with `write_every_step`) the loop fetches the
  pending metrics, raising NonFiniteError on a non-finite loss or gradient norm before anything
  is saved, and writes their means with the throughput and, at eval steps, the scalars of
  `evaluate(params, step)` to metrics.jsonl. At log, eval and checkpoint steps it logs
  `shown(scalars)` as a progress line; at checkpoint steps it saves the state with
  `data_state()` (the data position) and the config. `evaluate_first` also evaluates step 0 of
  a fresh run. Closes ckpt.
  """
  writer = _metrics.MetricWriter(workdir, tensorboard=config.tensorboard)
  config_json = _setup.config_to_json(config)
  step = int(state.step)
  stop_at = config.total_steps
  if config.halt_after_steps:
    stop_at = min(stop_at, config.halt_after_steps)
  progress = _metrics.Progress(step, config.total_steps, work_per_step, unit=unit)
  pending: list[tuple[int, dict]] = []
  clock_started = False
  scalars, evaluation, last_saved = {}, {}, ckpt.latest_step()
  try:
    if evaluate_first and step == 0 and config.eval_every:
      evaluation = evaluate(state.params, 0)
      writer.write(0, evaluation)
    while step < stop_at:
      state, metrics = step_fn(state, step)
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
      if write_every_step or log_now or eval_now or save_now:
        scalars = _mean_metrics(pending)
        pending = []
        scalars.update(progress.rates(step))
        if eval_now:
          evaluation = evaluate(state.params, step)
          scalars.update(evaluation)
        writer.write(step, scalars)
      if log_now or eval_now or save_now:
        progress.log(step, shown(scalars))
      if save_now:
        ckpt.save(step, state, data_state(), config_json)
        last_saved = step
  finally:
    writer.close()
    ckpt.close()
  halted = step < config.total_steps
  logging.info(
    '%s at step %d (last checkpoint %s)', 'halted' if halted else 'finished', step, last_saved
  )
  return LoopResult(
    step=step, halted=halted, scalars=scalars, evaluation=evaluation, rates=progress.rates(step)
  )
