r"""The RL regime study: conservative GRPO vs aggressive GRPO / Dr.GRPO / CAPO / Dr.CAPO.

  python experiments/sft.py --config=configs/sft.py:arithmetic --workdir=/tmp/rl/sft
  python experiments/rl_study.py --config=configs/rl_study.py --workdir=/tmp/rl/study \
      --config.init_from=/tmp/rl/sft
Variants: default (3 seeds), smoke (seconds, for tests: the rl.py test config).
"""

import os

import ml_collections

from curvopt import train

_RL_VARIANTS = (
  'grpo_conservative',
  'grpo_aggressive',
  'drgrpo_aggressive',
  'capo_aggressive',
  'drcapo_aggressive',
)


def _rl(arg: str) -> ml_collections.ConfigDict:
  return train.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'rl.py'), arg)


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  if arg not in ('default', 'smoke'):
    raise ValueError(f"unknown configs/rl_study.py variant {arg!r}; valid: ['default', 'smoke']")
  config = ml_collections.ConfigDict()
  config.init_from = ''  # the SFT policy's workdir (configs/sft.py:arithmetic)
  config.seeds = (0, 1, 2)
  config.baseline = 'grpo_conservative'
  config.candidate = 'capo_aggressive'
  config.collapse_fraction = 0.5
  config.runs = ml_collections.ConfigDict({name: _rl(name) for name in _RL_VARIANTS})
  if arg == 'smoke':
    config.seeds = (0,)
    test = _rl('test')
    for run in config.runs.values():
      run.update(total_steps=2, eval_every=1, log_every=1, tensorboard=False)
      for section in ('model', 'task', 'mesh', 'checkpoint'):
        run[section] = test[section].copy_and_resolve_references()
      run.rollout.update(max_new_tokens=test.rollout.max_new_tokens, group_size=2)
  return config
