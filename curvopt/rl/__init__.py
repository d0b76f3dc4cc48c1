"""GRPO-family policy-gradient losses and the CAPO curvature mask."""

from curvopt.rl._advantages import ADVANTAGE_MODES
from curvopt.rl._advantages import group_advantages
from curvopt.rl._capo import capo_mask
from curvopt.rl._capo import capo_shadow_init
from curvopt.rl._capo import capo_shadow_update
from curvopt.rl._capo import capo_token_stats
from curvopt.rl._capo import CapoShadow
from curvopt.rl._capo_metrics import capo_metrics
from curvopt.rl._policy_loss import AGG_MODES
from curvopt.rl._policy_loss import aggregate_tokens
from curvopt.rl._policy_loss import kl_per_token
from curvopt.rl._policy_loss import KL_MODES
from curvopt.rl._policy_loss import policy_loss

__all__ = (
    'ADVANTAGE_MODES',
    'AGG_MODES',
    'CapoShadow',
    'KL_MODES',
    'aggregate_tokens',
    'capo_mask',
    'capo_metrics',
    'capo_shadow_init',
    'capo_shadow_update',
    'capo_token_stats',
    'group_advantages',
    'kl_per_token',
    'policy_loss',
)
