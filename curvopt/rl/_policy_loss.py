"""The GRPO-family clipped policy-gradient loss and its token aggregation.

GRPO: DeepSeekMath, Shao et al. 2024 (arXiv 2402.03300). DAPO, Yu et al. 2025
(arXiv 2503.14476): clip-higher (eps_high > eps_low) and the token-level loss ('token-mean').
Dr. GRPO, Liu et al. 2025 (arXiv 2503.20783): the length-unbiased 'seq-mean-token-sum-norm'.
"""

from typing import Optional

import jax
import jax.numpy as jnp

AGG_MODES = ('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum', 'seq-mean-token-sum-norm')
KL_MODES = ('k1', 'k2', 'k3')


def _check_2d(name: str, value, shape: Optional[tuple[int, int]]):
  value = jnp.asarray(value)
  if value.ndim != 2:
    raise ValueError(f'{name} must be [B, T], got shape {value.shape}')
  if shape is not None and value.shape != shape:
    raise ValueError(f'{name} has shape {value.shape}, expected {shape} (the shape of logp)')
  return value


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, kl: str) -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs.

  Args:
    logp: log-probs of the sampled tokens under the policy.
    ref_logp: the same tokens' log-probs under the reference policy.
    kl: 'k1' (logp - ref), 'k2' (0.5 (logp - ref)^2) or 'k3'
      (exp(ref - logp) - (ref - logp) - 1, unbiased and >= 0).

  Returns:
    An array of the broadcast shape.
  """
  if kl not in KL_MODES:
    raise ValueError(f'unknown kl estimator {kl!r}; valid: {KL_MODES}')
  diff = logp - ref_logp
  if kl == 'k1':
    return diff
  if kl == 'k2':
    return 0.5 * diff**2
  return jnp.expm1(-diff) + diff


def aggregate_tokens(
  per_token: jax.Array,
  mask: jax.Array,
  *,
  agg: str = 'seq-mean-token-mean',
  max_len: Optional[int] = None,
) -> jax.Array:
  """Reduces a [B, T] per-token loss to a scalar over the valid tokens.

  - 'token-mean': sum over all valid tokens / their number (at least 1).
  - 'seq-mean-token-mean': the mean over the B sequences of each sequence's
    token mean (a sequence without valid tokens contributes 0, as in TRL).
  - 'seq-mean-token-sum': the mean over sequences of each token sum.
  - 'seq-mean-token-sum-norm': token sums / max_len, averaged over sequences
    (Dr.GRPO: sum / (B * max_len)); max_len defaults to T.

  Args:
    per_token: [B, T] values.
    mask: [B, T] weights; 0 marks an invalid token (bool or float).
    agg: one of AGG_MODES.
    max_len: the normalizer of 'seq-mean-token-sum-norm'.

  Returns:
    A float32 scalar; 0 when no token is valid.
  """
  if agg not in AGG_MODES:
    raise ValueError(f'unknown aggregation {agg!r}; valid: {AGG_MODES}')
  mask = mask.astype(jnp.float32)
  weighted = jnp.where(mask != 0, per_token * mask, 0.0)
  batch = per_token.shape[0]
  if agg == 'token-mean':
    return jnp.sum(weighted) / jnp.maximum(jnp.sum(mask), 1.0)
  seq_sum_B = jnp.sum(weighted, axis=1)
  if agg == 'seq-mean-token-mean':
    seq_B = seq_sum_B / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  elif agg == 'seq-mean-token-sum':
    seq_B = seq_sum_B
  else:
    norm = per_token.shape[1] if max_len is None else max_len
    seq_B = seq_sum_B / norm
  return jnp.sum(seq_B) / batch


def policy_loss(
  logp: jax.Array,
  old_logp: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  eps_low: float = 0.2,
  eps_high: float = 0.2,
  dual_clip: Optional[float] = None,
  agg: str = 'seq-mean-token-mean',
  max_len: Optional[int] = None,
  beta: float = 0.0,
  ref_logp: Optional[jax.Array] = None,
  kl: str = 'k3',
  entropy: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped surrogate policy-gradient loss of GRPO, DAPO and Dr.GRPO.

  Per token, with ratio = exp(logp - old_logp) and A the sequence advantage:
    pg = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high)),
  and with dual_clip = c (> 1), for A < 0: pg = min(pg, -c A).
  With beta > 0 the token loss is pg + beta * KL(ref_logp, logp) (estimator
  `kl`). The token losses are reduced by `aggregate_tokens(agg, max_len)`.
  For the CAPO mask, pass `mask * capo_mask(...)`.

  Masked tokens never reach an exp, so garbage (even -inf) log-probs there give
  neither NaN values nor NaN gradients; an all-masked batch gives loss 0.
  `old_logp`, `ref_logp` and `advantages` are treated as constants.

  Args:
    logp: [B, T] log-probs of the sampled tokens under the current policy.
    old_logp: [B, T] the same under the policy that sampled them.
    advantages: [B] one advantage per sequence.
    mask: [B, T] completion mask (bool or float weights; 0 = ignore).
    eps_low: lower clip range (ratio >= 1 - eps_low).
    eps_high: upper clip range (ratio <= 1 + eps_high); DAPO uses 0.28.
    dual_clip: the dual-clip constant c > 1 for negative advantages, or None.
    agg: token aggregation, one of AGG_MODES.
    max_len: normalizer of 'seq-mean-token-sum-norm' (default T).
    beta: KL coefficient; > 0 needs ref_logp.
    ref_logp: [B, T] reference-policy log-probs, or None.
    kl: KL estimator, one of KL_MODES.
    entropy: [B, T] per-token policy entropy for the metrics, or None.

  Returns:
    (loss, metrics): a float32 scalar and a dict of float32 scalars, all
    valid-token means: 'pg_loss' (the surrogate part, aggregated with `agg`),
    'clip_frac_low' (A < 0 and ratio < 1 - eps_low), 'clip_frac_high'
    (A > 0 and ratio > 1 + eps_high), 'ratio_mean', 'num_tokens'; and, when
    given, 'dual_clip_frac', 'kl', 'entropy'.
  """
  logp = _check_2d('logp', logp, None)
  shape = logp.shape
  old_logp = _check_2d('old_logp', old_logp, shape)
  mask = _check_2d('mask', mask, shape)
  advantages = jnp.asarray(advantages)
  if advantages.shape != shape[:1]:
    raise ValueError(f'advantages must be [B] = {shape[:1]}, got shape {advantages.shape}')
  if agg not in AGG_MODES:
    raise ValueError(f'unknown aggregation {agg!r}; valid: {AGG_MODES}')
  if kl not in KL_MODES:
    raise ValueError(f'unknown kl estimator {kl!r}; valid: {KL_MODES}')
  if eps_low < 0 or eps_high < 0:
    raise ValueError(f'eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}')
  if dual_clip is not None and not dual_clip > 1:
    raise ValueError(f'dual_clip must be > 1 (or None), got {dual_clip}')
  if max_len is not None and not max_len > 0:
    raise ValueError(f'max_len must be > 0, got {max_len}')
  if ref_logp is None and beta != 0:
    raise ValueError(f'beta={beta} needs ref_logp')
  if ref_logp is not None:
    ref_logp = _check_2d('ref_logp', ref_logp, shape)
  if entropy is not None:
    entropy = _check_2d('entropy', entropy, shape)

  valid = mask != 0

  # Double where: masked positions become 0 before any exp, so their values
  # and gradients stay finite whatever the caller left there.
  def zero(x):
    return jnp.where(valid, x.astype(jnp.float32), 0.0)

  logp = zero(logp)
  old_logp = jax.lax.stop_gradient(zero(old_logp))
  adv_Bx1 = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]

  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.maximum(-adv_Bx1 * ratio, -adv_Bx1 * clipped)
  metrics = {}
  if dual_clip is not None:
    capped = jnp.minimum(pg, -adv_Bx1 * dual_clip)
    negative = adv_Bx1 < 0
    metrics['dual_clip_frac'] = negative & (pg > -adv_Bx1 * dual_clip)
    pg = jnp.where(negative, capped, pg)
  per_token = pg
  if ref_logp is not None:
    kl_tok = kl_per_token(logp, jax.lax.stop_gradient(zero(ref_logp)), kl)
    metrics['kl'] = kl_tok
    if beta != 0:
      per_token = per_token + beta * kl_tok

  loss = aggregate_tokens(per_token, mask, agg=agg, max_len=max_len)
  metrics['pg_loss'] = aggregate_tokens(pg, mask, agg=agg, max_len=max_len)
  metrics['clip_frac_low'] = (adv_Bx1 < 0) & (ratio < 1.0 - eps_low)
  metrics['clip_frac_high'] = (adv_Bx1 > 0) & (ratio > 1.0 + eps_high)
  metrics['ratio_mean'] = ratio
  if entropy is not None:
    metrics['entropy'] = entropy

  num_tokens = jnp.sum(valid.astype(jnp.float32))
  denominator = jnp.maximum(num_tokens, 1.0)

  def token_mean(x):
    return jnp.sum(jnp.where(valid, x.astype(jnp.float32), 0.0)) / denominator

  metrics = {
    k: jax.lax.stop_gradient(v if k == 'pg_loss' else token_mean(v)) for k, v in metrics.items()
  }
  metrics['num_tokens'] = num_tokens
  return loss, metrics
