"""GRPO-family policy-gradient losses, the CAPO curvature mask, sampling, rewards.

Papers: CAPO (arXiv 2510.00819); GRPO (DeepSeekMath, arXiv 2402.03300); Dr. GRPO
(arXiv 2503.20783); DAPO's clip-higher and token-level loss (arXiv 2503.14476).
"""

from curvopt.rl._advantages import ADVANTAGE_MODES
from curvopt.rl._advantages import group_advantages
from curvopt.rl._capo import CapoShadow
from curvopt.rl._capo import capo_mask
from curvopt.rl._capo import capo_shadow_init
from curvopt.rl._capo import capo_shadow_update
from curvopt.rl._capo import capo_token_set
from curvopt.rl._capo import capo_token_stats
from curvopt.rl._capo_calibration import CapoThresholds
from curvopt.rl._capo_calibration import capo_thresholds
from curvopt.rl._capo_metrics import capo_metrics
from curvopt.rl._capo_metrics import masked_shares
from curvopt.rl._divergence import categorical_entropy
from curvopt.rl._divergence import categorical_kl
from curvopt.rl._policy_loss import AGG_MODES
from curvopt.rl._policy_loss import KL_MODES
from curvopt.rl._policy_loss import aggregate_tokens
from curvopt.rl._policy_loss import kl_per_token
from curvopt.rl._policy_loss import policy_loss
from curvopt.rl._random_mask import random_mask
from curvopt.rl._rewards import REWARD_NAMES
from curvopt.rl._rewards import RewardFn
from curvopt.rl._rewards import combine_rewards
from curvopt.rl._rewards import exact_match_reward
from curvopt.rl._rewards import extract_answer
from curvopt.rl._rewards import reward_fn
from curvopt.rl._sampling import DecodeFn
from curvopt.rl._sampling import Samples
from curvopt.rl._sampling import filter_logits
from curvopt.rl._sampling import sample

__all__ = (
  'ADVANTAGE_MODES',
  'AGG_MODES',
  'CapoShadow',
  'CapoThresholds',
  'DecodeFn',
  'KL_MODES',
  'REWARD_NAMES',
  'RewardFn',
  'Samples',
  'aggregate_tokens',
  'capo_mask',
  'capo_metrics',
  'capo_shadow_init',
  'capo_shadow_update',
  'capo_thresholds',
  'capo_token_set',
  'capo_token_stats',
  'categorical_entropy',
  'categorical_kl',
  'combine_rewards',
  'exact_match_reward',
  'extract_answer',
  'filter_logits',
  'group_advantages',
  'kl_per_token',
  'masked_shares',
  'policy_loss',
  'random_mask',
  'reward_fn',
  'sample',
)
