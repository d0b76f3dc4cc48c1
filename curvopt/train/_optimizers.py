"""The optimizer registry: optimizers are chosen by name from the config."""

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import ml_collections
import optax

from curvopt import optim
from curvopt.train import _schedules

# opt_state -> {metric name: scalar}, logged by the trainer every step.
StatsFn = Callable[[Any], dict[str, jax.Array]]


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  learning_rate: Callable[[jax.Array], jax.Array]  # the main schedule, for logging
  stats: Optional[StatsFn] = None
  grad_clip_norm: Optional[float] = None  # the global-norm clip inside tx (None: none)


def _adamw(cfg, lr, adam_lr):
  del adam_lr
  return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _optax_muon(cfg, lr, adam_lr):
  return optax.contrib.muon(
    lr,
    beta=cfg.momentum,
    weight_decay=cfg.weight_decay,
    adam_b1=cfg.b1,
    adam_b2=cfg.b2,
    adam_weight_decay=cfg.weight_decay,
    adam_learning_rate=adam_lr,
    consistent_rms=cfg.consistent_rms,
  )


def _adam_part(cfg, adam_lr):
  """AdamW from the b1, b2, eps and weight_decay fields, for the leaves D-Muon / LANTON leave."""
  return optax.adamw(adam_lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _dmuon(cfg, lr, adam_lr):
  return optim.dmuon(
    lr, beta=cfg.momentum, weight_decay=cfg.weight_decay, others=_adam_part(cfg, adam_lr)
  )


# The noise mapping's option fields, and the mappings that read each (others raise if it is set).
_MAPPING_OPTIONS = {
  'noise_exponent': ('min_ratio', 'mean_ratio'),
  'noise_normaliser': ('mean_ratio',),
  'noise_s_min': ('mean_ratio',),
  'noise_s_max': ('mean_ratio',),
}


def _noise_mapping(cfg, name, *, defaults=None):
  """The mapping `name` with the options of the noise_* fields (None: `defaults`' value, else
  the mapping's default).

  With every option field unset and no defaults it is the name itself, so the optimizer builds
  its default.
  """
  if name not in optim.MAPPING_NAMES:
    raise ValueError(f'unknown noise mapping {name!r}; valid: {list(optim.MAPPING_NAMES)}')
  given = {f: cfg.get(f) for f in _MAPPING_OPTIONS if cfg.get(f) is not None}
  given = {**(defaults or {}), **given}
  for field in given:
    if name not in _MAPPING_OPTIONS[field]:
      raise ValueError(
        f'optimizer.{field}={given[field]!r} does not apply to the {name!r} mapping '
        f'(only to {list(_MAPPING_OPTIONS[field])}); unset it'
      )
  if not given:
    return name
  options = {
    'exponent': given.get('noise_exponent'),
    'normaliser': given.get('noise_normaliser'),
    's_min': given.get('noise_s_min'),
    's_max': given.get('noise_s_max'),
  }
  options = {k: v for k, v in options.items() if v is not None}
  return {'min_ratio': optim.min_ratio, 'mean_ratio': optim.mean_ratio}[name](**options)


def _lanton(cfg, lr, adam_lr, *, mapping=None):
  scales = {'embed_head': cfg.lanton_embed_head_scale}
  if cfg.lanton_vector_scale is not None:
    scales['vector'] = cfg.lanton_vector_scale
  vector = cfg.lanton_vector or 'adamw'
  return optim.lanton(
    lr,
    b1=cfg.momentum,
    nesterov=bool(cfg.get('lanton_nesterov')),
    mapping=_noise_mapping(cfg, mapping or cfg.lanton_mapping),
    relative=bool(cfg.get('noise_relative')),
    group_lr_scales=scales,
    noise_every=cfg.lanton_noise_every,
    noise_ns_steps=cfg.lanton_noise_ns_steps,
    vector=_adam_part(cfg, adam_lr) if vector == 'adamw' else vector,
    weight_decay=cfg.weight_decay,
  )


def _dmuon_noise(cfg, lr, adam_lr):
  """D-Muon exactly as 'dmuon' builds it, times the noise factors of `optim.noise_adaptive`.

  Unset noise_* fields take `optim.noise_adaptive`'s default mapping (mean_ratio, p = 1/4,
  geometric mean); a field that is set replaces that one option only.
  """
  name, defaults = cfg.get('noise_mapping'), {}
  if name is None:
    name = 'mean_ratio'
    defaults = {f'noise_{k}': v for k, v in optim.DEFAULT_NOISE_MAPPING_OPTIONS.items()}
  return optim.noise_adaptive(
    _dmuon(cfg, lr, adam_lr),
    mapping=_noise_mapping(cfg, name, defaults=defaults),
    relative=bool(cfg.get('noise_relative')),
  )


def _flat_metrics(prefix: str, stats: dict) -> dict[str, jax.Array]:
  return {
    f'{prefix}/{kind}/{name}': value
    for kind in ('lr_scale', 'h', 'clip_low', 'clip_high')
    for name, value in stats[kind].items()
  }


def lanton_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Every LANTON leaf's noise estimate H and learning-rate scale, and the fraction of each
  group's leaves at the mapping's clip bounds, as flat metric names:
  'lanton/{lr_scale,h}/<leaf path>', 'lanton/{clip_low,clip_high}/<group>'."""
  return _flat_metrics('lanton', optim.lanton_stats(opt_state))


def noise_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Like `lanton_metrics` for `optim.noise_adaptive` ('dmuon_noise'), under 'noise/'."""
  return _flat_metrics('noise', optim.noise_adaptive_stats(opt_state))


# name -> (optimizer config, lr schedule, Adam lr schedule) -> transform.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
  'adamw': _adamw,
  'optax_muon': _optax_muon,
  'dmuon': _dmuon,
  'dmuon_noise': _dmuon_noise,
  'lanton': _lanton,
  'lanton_mean': functools.partial(_lanton, mapping='mean_ratio'),
}
_STATS: dict[str, StatsFn] = {
  'lanton': lanton_metrics,
  'lanton_mean': lanton_metrics,
  'dmuon_noise': noise_metrics,
}

_MUON_FAMILY = ('optax_muon', 'dmuon', 'dmuon_noise', 'lanton', 'lanton_mean')
_NOISE_READERS = ('dmuon_noise', 'lanton', 'lanton_mean')
# Fields of config.optimizer that only some optimizers read: a change in one (e.g. a new default)
# does not change a run of another optimizer, so resuming that run ignores it.
_READ_ONLY_BY = {
  'momentum': _MUON_FAMILY,
  'adam_learning_rate': _MUON_FAMILY,
  'consistent_rms': ('optax_muon',),
  'lanton_mapping': ('lanton',),  # lanton_mean fixes its mapping
  'lanton_embed_head_scale': ('lanton', 'lanton_mean'),
  'lanton_noise_every': ('lanton', 'lanton_mean'),
  'lanton_noise_ns_steps': ('lanton', 'lanton_mean'),
  'lanton_vector': ('lanton', 'lanton_mean'),
  'lanton_vector_scale': ('lanton', 'lanton_mean'),
  'lanton_nesterov': ('lanton', 'lanton_mean'),
  'noise_mapping': ('dmuon_noise',),  # lanton reads lanton_mapping
  'noise_exponent': _NOISE_READERS,
  'noise_normaliser': _NOISE_READERS,
  'noise_relative': _NOISE_READERS,
  'noise_s_min': _NOISE_READERS,
  'noise_s_max': _NOISE_READERS,
}


def fields_ignored_by(name: str) -> frozenset[str]:
  """The config.optimizer fields that the optimizer `name` never reads."""
  return frozenset(f for f, readers in _READ_ONLY_BY.items() if name not in readers)


def make_optimizer(
  cfg: ml_collections.ConfigDict, total_steps: int, schedule_cfg: ml_collections.ConfigDict
) -> Optimizer:
  """Builds the optimizer named by `cfg.name`, on the schedule of `schedule_cfg`."""
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {cfg.name!r}; valid names: {sorted(OPTIMIZERS)}')
  if not cfg.learning_rate > 0:
    raise ValueError(f'optimizer.learning_rate must be positive, got {cfg.learning_rate}')
  lr = _schedules.make_schedule(cfg.learning_rate, total_steps, schedule_cfg)
  adam_peak = cfg.get('adam_learning_rate')
  if adam_peak is None:
    adam_peak = cfg.learning_rate
  adam_lr = _schedules.make_schedule(adam_peak, total_steps, schedule_cfg)
  tx = OPTIMIZERS[cfg.name](cfg, lr, adam_lr)
  clip = cfg.grad_clip_norm or None
  if clip:
    # Clips G and an independent noise gradient (update(..., noise_grads=)) alike; its state
    # is that of optax.chain(optax.clip_by_global_norm(clip), tx), which older runs saved.
    tx = optim.clip_by_global_norm(clip, tx)
  return Optimizer(tx, lr, _STATS.get(cfg.name), clip)
