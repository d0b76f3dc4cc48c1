r"""The RL regime study: can CAPO's mask make an aggressive regime learn where GRPO collapses?

Stages (docs/rl_experiments.md, "Decision rule written before any run", says what each decides):
  python experiments/rl_study.py --config=configs/rl_study.py:sweep --workdir=S \
      --config.init_from=SFT                                  # 1. the conservative rate x
  python experiments/rl_study.py --config=configs/rl_study.py:multiplier --workdir=S \
      --config.init_from=SFT --config.conservative_lr=X       # 2. aggressive = 5x or 10x
  python experiments/train_rl.py --config=configs/rl.py:capo_log --workdir=S/calibration \
      --config.init_from=SFT --config.optimizer.learning_rate=M*X   # 3. thresholds
  python experiments/capo_calibrate.py --run=S/calibration
  python experiments/rl_study.py --config=configs/rl_study.py --workdir=S --config.init_from=SFT \
      --config.conservative_lr=X --config.multiplier=M --config.tau_H=.. --config.tau_F=.. \
      --only=grpo_aggressive,capo_aggressive,capo_calibrated,grpo_conservative  # 4. the arms
  python experiments/rl_study.py ... (as 4) --config.random_rate=R   # 5. + the random mask
Variants:
  default     the study: GRPO, CAPO at the reference thresholds, CAPO at calibrated thresholds
              and the random mask at calibrated CAPO's masked share, 5 paired seeds each, in
              the aggressive regime; conservative GRPO with 3 seeds
  sweep       conservative GRPO at each rate of conservative_lrs, seed 0
  multiplier  aggressive GRPO at 5x and 10x the conservative rate, seeds 0-2
  gpu         the aggressive arms x 8 seeds (benchmarks/gpu_suite.sh), aggressive first
  smoke       seconds, for tests: the rl.py test config
"""

import os

import ml_collections
from ml_collections import config_dict

from curvopt import train

_VARIANTS = ('default', 'sweep', 'multiplier', 'gpu', 'smoke')
# The aggressive arms (configs/rl.py variants), in the order they run within a seed;
# capo_aggressive has the reference recipe's thresholds.
_ARMS = ('grpo_aggressive', 'capo_aggressive', 'capo_calibrated', 'random_aggressive')
# Stage 1's grid of conservative rates, and stage 2's multipliers of the chosen one.
_SWEEP_LRS = (1e-5, 2e-5, 5e-5, 1e-4)
_MULTIPLIERS = (5, 10)


def _rl(arg: str) -> ml_collections.ConfigDict:
  return train.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'rl.py'), arg)


def _name(lr: float) -> str:
  """1e-5 -> 'lr1em5': a config key that flags can address."""
  mantissa, exponent = f'{lr:.0e}'.split('e')
  return f'lr{mantissa}em{-int(exponent)}'


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  if arg not in _VARIANTS:
    raise ValueError(f'unknown configs/rl_study.py variant {arg!r}; valid: {list(_VARIANTS)}')
  config = ml_collections.ConfigDict()
  config.init_from = ''  # the SFT policy's workdir (configs/sft.py:arithmetic_untied)
  # The conservative rate x (stage 1 picks it) and the aggressive multiplier (stage 2: 5 or
  # 10); every run's learning rate follows them.
  config.conservative_lr = 2e-5
  config.multiplier = 5
  # Calibrated thresholds (stage 3) and the random mask's rate (calibrated CAPO's masked share
  # of the A != 0 tokens, stage 4): unset until measured.
  config.tau_H = config_dict.placeholder(float)
  config.tau_F = config_dict.placeholder(float)
  config.random_rate = config_dict.placeholder(float)
  config.seeds = (0, 1, 2, 3, 4)
  config.seeds_by_variant = ml_collections.ConfigDict({'grpo_conservative': (0, 1, 2)})
  config.baseline = 'grpo_conservative'
  config.candidate = 'capo_calibrated'
  # (a, b): a - b on paired seeds; CAPO "works" only if it beats the matched random mask.
  config.comparisons = (
    ('capo_calibrated', 'random_aggressive'),
    ('capo_calibrated', 'grpo_aggressive'),
    ('capo_aggressive', 'grpo_aggressive'),
  )
  config.collapse_drop = 0.15

  aggressive_lr = config.get_ref('conservative_lr') * config.get_ref('multiplier')
  runs = {}
  for name in _ARMS:
    runs[name] = _rl(name)
    runs[name].optimizer.learning_rate = aggressive_lr
  runs['capo_calibrated'].capo.tau_H = config.get_ref('tau_H')
  runs['capo_calibrated'].capo.tau_F = config.get_ref('tau_F')
  runs['random_aggressive'].capo.random_rate = config.get_ref('random_rate')
  runs['grpo_conservative'] = _rl('grpo_conservative')
  runs['grpo_conservative'].optimizer.learning_rate = config.get_ref('conservative_lr')
  config.runs = ml_collections.ConfigDict(runs)
  # The order runs go in within each seed (a ConfigDict sorts its keys): aggressive first.
  config.variants = _ARMS + ('grpo_conservative',)

  if arg == 'sweep':
    config.runs = ml_collections.ConfigDict()
    for lr in _SWEEP_LRS:
      run = _rl('grpo_conservative')
      run.optimizer.learning_rate = lr
      config.runs[f'grpo_conservative_{_name(lr)}'] = run
    config.variants = tuple(f'grpo_conservative_{_name(lr)}' for lr in _SWEEP_LRS)
    config.seeds = (0,)
    config.seeds_by_variant = ml_collections.ConfigDict()
    config.baseline = config.candidate = ''
    config.comparisons = ()
  if arg == 'multiplier':
    config.runs = ml_collections.ConfigDict()
    for multiplier in _MULTIPLIERS:
      run = _rl('grpo_aggressive')
      run.optimizer.learning_rate = config.get_ref('conservative_lr') * multiplier
      config.runs[f'grpo_aggressive_x{multiplier}'] = run
    config.variants = tuple(f'grpo_aggressive_x{m}' for m in _MULTIPLIERS)
    config.seeds = (0, 1, 2)
    config.seeds_by_variant = ml_collections.ConfigDict()
    config.baseline = config.candidate = ''
    config.comparisons = ()
  if arg == 'gpu':
    del config.runs['grpo_conservative']
    config.variants = _ARMS
    config.seeds = tuple(range(8))
    config.seeds_by_variant = ml_collections.ConfigDict()
    config.baseline = config.candidate = ''
  if arg == 'smoke':
    config.seeds = (0,)
    config.seeds_by_variant = ml_collections.ConfigDict()
    config.tau_H, config.tau_F, config.random_rate = 0.05, 1e-3, 0.05
    test = _rl('test')
    for run in config.runs.values():
      run.update(total_steps=2, eval_every=1, log_every=1, tensorboard=False)
      for section in ('model', 'task', 'eval', 'mesh', 'checkpoint'):
        run[section] = test[section].copy_and_resolve_references()
      run.rollout.update(max_new_tokens=test.rollout.max_new_tokens, group_size=2)
  return config
