r"""GRPO-family RL on the synthetic arithmetic task, with and without the CAPO mask.

Launch (CPU), from an SFT policy (configs/sft.py:arithmetic):
  python experiments/sft.py --config=configs/sft.py:arithmetic --workdir=/tmp/rl/sft
  python experiments/train_rl.py --config=configs/rl.py:capo_aggressive --workdir=/tmp/rl/capo \
      --config.init_from=/tmp/rl/sft
Variants (the paper's regimes, scaled to a 0.9M-parameter policy): grpo_conservative (learning
rate x, 12b completions a step), grpo_aggressive and drgrpo_aggressive (5x, b completions),
capo_aggressive and drcapo_aggressive (the same with the CAPO mask), test (seconds, from scratch).
"""

import os

import ml_collections
from ml_collections import config_dict

from curvopt import train

# The conservative learning rate x; the aggressive regime runs at 5x with 1/12 of the batch.
_LR = 2e-5
_PROMPTS = 2  # b prompts a step in the aggressive regime (b * group_size completions)
# CAPO thresholds of its reference recipes: (tau_H, tau_F) per advantage kind.
_CAPO_TAUS = {'grpo': (0.01, 1e-4), 'dr_grpo': (5e-4, 1e-3)}
_VARIANTS = (
  'grpo_conservative',
  'grpo_aggressive',
  'drgrpo_aggressive',
  'capo_aggressive',
  'drcapo_aggressive',
  'test',
)


def get_config(arg: str = 'capo_aggressive') -> ml_collections.ConfigDict:
  if arg not in _VARIANTS:
    raise ValueError(f'unknown configs/rl.py variant {arg!r}; valid: {sorted(_VARIANTS)}')
  lm = train.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lm.py'), 'tiny')
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A train_sft (or train_lm) workdir: the policy starts from its params; or 'hf:/path', a
  # Hugging Face model directory (its tokenizer.json replaces the byte tokenizer).
  config.init_from = ''
  config.total_steps = 150
  config.halt_after_steps = 0
  config.log_every = 10
  config.eval_every = 15
  config.tensorboard = True
  config.model = lm.model  # the SFT policy's architecture (configs/sft.py uses lm.py:tiny's)

  config.task = ml_collections.ConfigDict()
  config.task.name = 'arithmetic'
  config.task.data_dir = config_dict.placeholder(str)  # default: $TFDS_DATA_DIR or <workdir>/tfds
  config.task.max_prompt_len = 32
  config.task.eval_prompts = 256  # greedy accuracy on the first test prompts

  config.rollout = ml_collections.ConfigDict()
  config.rollout.prompts_per_step = _PROMPTS
  config.rollout.group_size = 8  # G completions per prompt
  config.rollout.max_new_tokens = 48
  config.rollout.temperature = 1.0
  config.rollout.top_k = 50  # as CAPO's top-K set, so every sampled token is in it
  config.rollout.top_p = 1.0

  config.reward = 'exact_match'
  config.advantage = 'grpo'  # or dr_grpo, rloo, none
  config.loss = ml_collections.ConfigDict()
  config.loss.agg = 'seq-mean-token-mean'
  config.loss.eps_low = 0.2
  config.loss.eps_high = 0.2
  config.loss.dual_clip = config_dict.placeholder(float)
  config.loss.beta = 0.0  # KL to the initial policy (the aggressive regime of the paper: 0)
  config.loss.kl = 'k3'

  config.capo = ml_collections.ConfigDict()
  config.capo.enabled = False
  config.capo.tau_H, config.capo.tau_F = _CAPO_TAUS['grpo']
  config.capo.symmetric = True
  config.capo.top_k = 50
  config.capo.chunk_size = 256

  config.optimizer = lm.optimizer
  config.optimizer.update(
    name='adamw', learning_rate=5 * _LR, weight_decay=0.0, b2=0.999, grad_clip_norm=1.0
  )
  config.schedule = lm.schedule
  config.schedule.update(name='constant', warmup_steps=0)
  config.checkpoint = lm.checkpoint
  config.checkpoint.every = 25
  config.mesh = lm.mesh

  if arg == 'grpo_conservative':
    config.rollout.prompts_per_step = 12 * _PROMPTS
    config.optimizer.learning_rate = _LR
    config.total_steps = 60
    config.eval_every = 5
    config.checkpoint.every = 10
  if arg.startswith('dr'):
    config.advantage = 'dr_grpo'
    config.loss.agg = 'seq-mean-token-sum-norm'
    config.capo.tau_H, config.capo.tau_F = _CAPO_TAUS['dr_grpo']
  if 'capo' in arg:
    config.capo.enabled = True
  if arg == 'test':
    config.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64)
    config.capo.enabled = True
    config.total_steps = 4
    config.log_every = 2
    config.eval_every = 2
    config.task.max_prompt_len = 40
    config.task.eval_prompts = 8
    config.rollout.max_new_tokens = 16
    config.rollout.group_size = 4
    config.checkpoint.every = 2
    config.checkpoint.async_save = False
    config.tensorboard = False
    config.mesh.num_devices = 1
  return config
