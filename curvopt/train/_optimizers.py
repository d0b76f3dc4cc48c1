"""The optimizer registry: optimizers are chosen by name from the config."""
from typing import Callable

import ml_collections
import optax

from curvopt.train import _schedules


def _adamw(cfg, lr, adam_lr):
  del adam_lr
  return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _optax_muon(cfg, lr, adam_lr):
  return optax.contrib.muon(
      lr, beta=cfg.momentum, weight_decay=cfg.weight_decay, adam_b1=cfg.b1, adam_b2=cfg.b2,
      adam_weight_decay=cfg.weight_decay, adam_learning_rate=adam_lr,
      consistent_rms=cfg.consistent_rms)


# name -> (optimizer config, learning-rate schedule, Adam learning-rate schedule) -> transform.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'adamw': _adamw,
    'optax_muon': _optax_muon,
}


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, schedule_cfg):
  """Builds (optimizer, learning-rate schedule) from the config's `optimizer` and `schedule`."""
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {cfg.name!r}; valid names: {sorted(OPTIMIZERS)}')
  if not cfg.learning_rate > 0:
    raise ValueError(f'optimizer.learning_rate must be positive, got {cfg.learning_rate}')
  lr = _schedules.make_schedule(cfg.learning_rate, total_steps, schedule_cfg)
  adam_peak = cfg.adam_learning_rate if cfg.get('adam_learning_rate') is not None else cfg.learning_rate
  adam_lr = _schedules.make_schedule(adam_peak, total_steps, schedule_cfg)
  tx = OPTIMIZERS[cfg.name](cfg, lr, adam_lr)
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, lr
