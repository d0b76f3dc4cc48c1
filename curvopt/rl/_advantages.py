"""Group-relative advantages for GRPO-family policy gradients.

GRPO's group baseline: DeepSeekMath, Shao et al. 2024 (arXiv 2402.03300); 'dr_grpo' drops
the std normalization as Dr. GRPO does, Liu et al. 2025 (arXiv 2503.20783).
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from curvopt.rl import _sharding

ADVANTAGE_MODES = ('grpo', 'dr_grpo', 'rloo', 'none')
_BASELINE_MODES = ('grpo', 'dr_grpo', 'rloo')


def _check_finite_if_concrete(rewards: jax.Array) -> None:
  """Raises on a non-finite reward when the values are known (not traced)."""
  try:
    values = np.asarray(rewards)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise ValueError(
      f'rewards must be finite; got {values[bad[:5]].tolist()} at indices '
      f'{bad[:5].tolist()}' + (' ...' if bad.size > 5 else '')
    )


def group_advantages(
  rewards: jax.Array,
  group_size: int,
  *,
  mode: str = 'grpo',
  eps: float = 1e-4,
) -> jax.Array:
  """Advantages of completions grouped by prompt.

  The rewards of one prompt's `group_size` completions are contiguous:
  `rewards[g * group_size:(g + 1) * group_size]` is group g.

  Modes:
    - 'grpo': (r - mean) / (std + eps), the group std with Bessel's
      correction (ddof=1), as TRL's and the CAPO reference's torch.std.
    - 'dr_grpo': r - mean (Dr.GRPO drops the std normalization).
    - 'rloo': r - mean of the other G - 1 rewards of the group
      (= G / (G - 1) * (r - mean)).
    - 'none': the raw rewards (REINFORCE without a baseline).

  A group whose rewards are all equal gets zero advantages in every baseline
  mode (never NaN). Non-finite rewards raise a ValueError when the rewards are
  concrete; under `jax.jit` a raise is impossible, so every completion of a
  group that holds a non-finite reward gets advantage 0 instead (in mode
  'none' just that completion).

  Args:
    rewards: [N] rewards, N = prompts * group_size.
    group_size: completions per prompt, G (a Python int).
    mode: one of ADVANTAGE_MODES.
    eps: added to the std in mode 'grpo'.

  Returns:
    [N] float32 advantages.
  """
  if mode not in ADVANTAGE_MODES:
    raise ValueError(f'unknown advantage mode {mode!r}; valid: {ADVANTAGE_MODES}')
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
    raise TypeError(f'group_size must be a Python int, got {group_size!r}')
  if group_size < 1:
    raise ValueError(f'group_size must be >= 1, got {group_size}')
  if mode in _BASELINE_MODES and group_size < 2:
    raise ValueError(
      f'mode {mode!r} needs a baseline from the group, so group_size must be >= 2, got {group_size}'
    )
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 1:
    raise ValueError(f'rewards must be 1-D [N], got shape {rewards.shape}')
  n = rewards.shape[0]
  if n % group_size:
    raise ValueError(f'the number of rewards {n} is not divisible by group_size {group_size}')
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  _check_finite_if_concrete(rewards)
  spec = _sharding.spec_of(rewards)
  return _sharding.call_with_auto_axes(
    lambda r: _advantages(r, group_size, mode, eps), (rewards,), lambda: PartitionSpec(*spec)
  )


def _advantages(rewards: jax.Array, group_size: int, mode: str, eps: float) -> jax.Array:
  """group_advantages after validation (explicit mesh axes made auto)."""
  r_GxM = rewards.astype(jnp.float32).reshape(-1, group_size)
  finite_GxM = jnp.isfinite(r_GxM)
  if mode == 'none':
    return jnp.where(finite_GxM, r_GxM, 0.0).reshape(-1)

  group_ok_G = jnp.all(finite_GxM, axis=1, keepdims=True)
  # Zeroed before the statistics so one bad reward cannot poison the gradient
  # of the others through the where (the double-where pattern).
  r_GxM = jnp.where(group_ok_G, r_GxM, 0.0)
  mean_G = jnp.mean(r_GxM, axis=1, keepdims=True)
  centered_GxM = r_GxM - mean_G
  if mode == 'grpo':
    std_G = jnp.sqrt(jnp.sum(centered_GxM**2, axis=1, keepdims=True) / (group_size - 1))
    # All-equal groups have centered == 0; the guard only matters at eps = 0.
    safe_std_G = jnp.where(std_G > 0, std_G + eps, 1.0)
    adv_GxM = centered_GxM / safe_std_G
  elif mode == 'dr_grpo':
    adv_GxM = centered_GxM
  else:  # rloo
    adv_GxM = centered_GxM * (group_size / (group_size - 1))
  return jnp.where(group_ok_G, adv_GxM, 0.0).reshape(-1)
