"""Learning-rate schedules chosen by name: warmup + cosine, warmup-stable-decay, constant."""

from typing import Callable

import jax.numpy as jnp
import ml_collections
import optax


def _warmup_cosine(peak, total_steps, cfg):
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=cfg.warmup_steps,
    decay_steps=max(total_steps, cfg.warmup_steps + 1),
    end_value=peak * cfg.final_fraction,
  )


def _wsd(peak, total_steps, cfg):
  """Warmup, stable at the peak, then linear decay over the last `decay_fraction` of training."""
  decay_steps = max(1, int(round(total_steps * cfg.decay_fraction)))
  stable_end = max(cfg.warmup_steps, total_steps - decay_steps)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1)),
      optax.constant_schedule(peak),
      optax.linear_schedule(peak, peak * cfg.final_fraction, decay_steps),
    ],
    boundaries=[cfg.warmup_steps, stable_end],
  )


def _constant(peak, total_steps, cfg):
  del total_steps
  return (
    optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    if cfg.warmup_steps
    else (optax.constant_schedule(peak))
  )


SCHEDULES = {'warmup_cosine': _warmup_cosine, 'wsd': _wsd, 'constant': _constant}


def make_schedule(
  peak: float, total_steps: int, cfg: ml_collections.ConfigDict
) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Returns step -> learning rate for the schedule named by `cfg.name`, peaking at `peak`."""
  if cfg.name not in SCHEDULES:
    raise ValueError(f'unknown schedule {cfg.name!r}; valid names: {sorted(SCHEDULES)}')
  if cfg.warmup_steps < 0 or not 0.0 <= cfg.final_fraction <= 1.0:
    raise ValueError(
      f'bad schedule settings: warmup_steps={cfg.warmup_steps}, final_fraction={cfg.final_fraction}'
    )
  return SCHEDULES[cfg.name](peak, total_steps, cfg)
