"""OTA: merging weighted elementwise by the experts' Adam second moments.

Mahdavi et al. 2025 (arXiv 2509.11167). Per tensor
and expert: P_t = (c_t v_t)^p * scale_t (c_t an optional Adam bias
correction), optionally P_t / (mean(P_t) + eps); w_t = (P_t + eps) * m_t with
m_t an optional (FFG) mask; then

  with a base:    theta* = theta0 + sum_t w_t tau_t / sum_t w_t
  without a base: theta* = sum_t w_t theta_t / sum_t w_t.

Entries where every expert is masked (sum_t w_t <= T * eps * 1.1, the
reference's test) take theta0 (fallback_to_base) or the mean of the theta_t.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _options
from curvopt.merge import _rank1
from curvopt.merge import _ties
from curvopt.merge import _tree

F32 = jnp.float32
NORMALISE = ('none', 'mean')
# How the (masked) task vectors combine: 'precond', weighted by w_t (OTA);
# the reference's alternatives for FFG-masked task vectors: 'linear', their
# plain mean over the T experts; 'ties', the sign election and mean over the
# agreeing experts of `ties` (without trimming: the masks prune).
COMBINES = ('precond', 'linear', 'ties')


def ota_expert_weight(
  moment: Any, *, power, eps, scale=1.0, correction=1.0, normalise: str = 'none', mask: Any = None
):
  """w_t = (P_t + eps) * m_t for one expert and tensor, in fp32 (traceable).

  Args:
    moment: the second moment v_t (array or `Rank1` factors).
    power: p in P = v^p.
    eps: added to P before masking, and to the mean when normalising.
    scale: scale_t multiplying v^p.
    correction: multiplies v before the power (Adam bias correction
      1 / (1 - b2^count); 1 for none).
    normalise: 'none' or 'mean' (P / (mean(P) + eps), per tensor).
    mask: None, or a bool / 0-1 array m_t.

  Returns:
    The fp32 weight tensor w_t.
  """
  return _expert_weight(
    moment,
    power=power,
    eps=eps,
    scale=scale,
    correction=correction,
    normalise=normalise,
    mask=mask,
    root=False,
  )


def _expert_weight(moment, *, power, eps, scale, correction, normalise, mask, root):
  """`ota_expert_weight`; root=True takes sqrt for power 0.5 (the default)
  instead of a pow, which costs an exp and a log per entry."""
  v = _rank1.dense_moment(moment) * correction
  precond = (jnp.sqrt(v) if root else jnp.power(v, power)) * scale
  if normalise == 'mean':
    precond = precond / (jnp.mean(precond) + eps)
  weight = precond + eps
  if mask is not None:
    weight = weight * jnp.asarray(mask).astype(F32)
  return weight


def by_power(power, merge):
  """merge(root) for this p: one compilation for every p (p stays traced); the
  branch taken for p = 0.5 is one whole fused pass with sqrt in place of pow."""
  return jax.lax.cond(power == 0.5, lambda: merge(True), lambda: merge(False))


@functools.partial(jax.jit, static_argnames=('normalise', 'fallback_to_base', 'combine'))
def _ota_kernel(
  base,
  experts,
  moments,
  masks,
  power,
  eps,
  scales_T,
  corrections_T,
  *,
  normalise,
  fallback_to_base,
  combine='precond',
):
  return by_power(
    power,
    lambda root: ota_merge(
      base,
      experts,
      moments,
      masks,
      power,
      eps,
      scales_T,
      corrections_T,
      normalise=normalise,
      fallback_to_base=fallback_to_base,
      root=root,
      combine=combine,
    ),
  )


def ota_merge(
  base,
  experts,
  moments,
  masks,
  power,
  eps,
  scales_T,
  corrections_T,
  *,
  normalise,
  fallback_to_base,
  root,
  combine='precond',
):
  num = len(experts)
  reference = experts[0] if base is None else base
  base32 = None if base is None else base.astype(F32)
  numerator = jnp.zeros(reference.shape, F32)
  denominator = jnp.zeros(reference.shape, F32)
  factors_ok = jnp.asarray(True)
  taus = []
  for t, expert in enumerate(experts):
    rank1 = _rank1.is_rank1(moments[t])
    # Rank1 factors are checked directly (a few small vectors); full moments
    # by the NaN they leave in the output, so they are masked below.
    weight = _expert_weight(
      moments[t],
      power=power,
      eps=eps,
      scale=scales_T[t],
      correction=corrections_T[t],
      normalise=normalise,
      mask=masks[t] if rank1 else None,
      root=root,
    )
    if rank1:
      factors_ok &= _tree.moment_ok(moments[t])
    else:
      weight = _masked_nan_where_invalid(weight, moments[t], masks[t], root)
    theta = expert.astype(F32)
    numerator = numerator + weight * (theta if base is None else theta - base32)
    denominator = denominator + weight
    if combine != 'precond':
      kept = theta - base32 if masks[t] is None else jnp.where(masks[t], theta - base32, 0.0)
      # + weight * 0: NaN where the moment is bad, so the moment check fires.
      taus.append(kept + weight * 0.0)
  if combine != 'precond':
    if combine == 'linear':
      combined = sum(taus) / num
    else:
      combined = _ties.consensus_mean(taus, jnp.ones((num,), F32))
    merged = base32 + combined
    if all(m is not None for m in masks):
      # Entries no mask keeps (whatever their weights, which only mask here).
      fully_masked = ~functools.reduce(jnp.logical_or, [jnp.asarray(m, bool) for m in masks])
      fallback = base32 if fallback_to_base else sum(e.astype(F32) for e in experts) / num
      merged = jnp.where(fully_masked, fallback, merged)
  elif any(m is not None for m in masks):
    fully_masked = denominator <= num * eps * 1.1
    safe = jnp.where(fully_masked, 1.0, denominator)
    merged = numerator / safe
    if base is not None:
      merged = base32 + merged
    if fallback_to_base and base is not None:
      fallback = base32
    else:
      fallback = sum(e.astype(F32) for e in experts) / num
    merged = jnp.where(fully_masked, fallback, merged)
  else:
    merged = numerator / denominator
    if base is not None:
      merged = base32 + merged
  return merged.astype(reference.dtype), factors_ok


def _masked_nan_where_invalid(weight, moment, mask, root):
  """The masked weight, NaN wherever the moment is negative or non-finite.

  Every merged entry that reads a bad moment is then NaN (whatever the mask,
  power or normalisation), which `add_moment_check`'s screen of the output
  finds: no reduction over the moments inside the fused pass. For p = 0.5
  the weight's own sqrt does it: NaN for v < 0 or NaN, and v = inf gives
  inf / inf downstream; masked entries take sqrt(v) * 0 (0 or NaN) in place
  of 0. Other powers (v^1 of v < 0 is finite) need the explicit test, which
  costs ~25% of the pass on the CPU.
  """
  if root:
    if mask is None:
      return weight
    return jnp.where(mask, weight, jnp.sqrt(moment.astype(F32)) * 0.0)
  if mask is not None:
    weight = jnp.where(mask, weight, 0.0)
  return jnp.where((moment >= 0) & (moment < jnp.inf), weight, jnp.nan)


def add_moment_check(
  checks: _tree.ValueChecks, out: Any, factors_ok: Any, moments: Sequence[Any], name: str
) -> None:
  """Queues the check of one tensor's second moments after `ota_merge`: the
  screen (output finite, Rank1 factors valid) on every call, the exact
  per-expert check only where the screen fails (which non-finite experts
  can also cause: then no error)."""
  checks.add(
    _tree.finite_screen(out, factors_ok),
    _tree.moment_message(name, 'second moment'),
    recheck=lambda: _tree.moments_ok(tuple(moments)),
  )


def bias_corrections(bias_correction: Any, num: int) -> np.ndarray:
  """1 / (1 - b2^count) per expert from T (b2, count) pairs; ones for None."""
  if bias_correction is None:
    return np.ones((num,), np.float32)
  try:
    pairs = [tuple(pair) for pair in bias_correction]
  except TypeError as e:
    raise ValueError(
      f'bias_correction must be None or one (b2, count) pair per expert, got {bias_correction!r}'
    ) from e
  if len(pairs) != num or any(len(pair) != 2 for pair in pairs):
    raise ValueError(
      f'bias_correction needs one (b2, count) pair per expert ({num}), got {bias_correction!r}'
    )
  out = []
  for b2, count in pairs:
    if not 0.0 <= float(b2) < 1.0 or int(count) != count or count < 1:
      raise ValueError(
        'bias_correction needs 0 <= b2 < 1 and an integer '
        f'count >= 1, got (b2, count) = ({b2!r}, {count!r})'
      )
    out.append(1.0 / (1.0 - float(b2) ** int(count)))
  return np.asarray(out, np.float32)


def check_combine(combine: str, base: Any) -> str:
  _options.choice(combine, COMBINES, what='combine')
  if combine != 'precond' and base is None:
    raise ValueError(f'combine={combine!r} merges task vectors: it needs the base model')
  return combine


def options_for(num, power, eps, normalise, bias_correction, scales):
  power = _options.positive(power, what='power')
  eps = _options.positive(eps, what='eps')
  normalise = _options.choice(normalise, NORMALISE, what='normalise')
  corrections = bias_corrections(bias_correction, num)
  scales = _options.per_expert(scales, num, what='scales', low=0.0, low_open=True)
  return power, eps, normalise, corrections, scales


def _describe(masks: Any) -> str:
  if isinstance(masks, Sequence):
    return f'a {type(masks).__name__} of {len(masks)}'
  return f'a {type(masks).__name__}'


def _leaf_masks(masks, num, *, name, shape):
  if masks is None:
    return (None,) * num
  if not isinstance(masks, Sequence) or len(masks) != num:
    raise ValueError(f'masks needs one array (or None) per expert ({num}), got {_describe(masks)}')
  for t, mask in enumerate(masks):
    if mask is not None:
      _tree.check_mask(mask, shape, name=name, what=f'mask of expert {t}')
  return tuple(masks)


def _gather_masks(gathered: _tree.Gathered, masks: Any) -> list[tuple]:
  """Per leaf, one mask (or None) per expert, checked against the weights."""
  num, count = gathered.num_experts, len(gathered.names)
  if masks is None:
    return [(None,) * num] * count
  if not isinstance(masks, Sequence) or len(masks) != num:
    raise ValueError(f'masks needs one tree (or None) per expert ({num}), got {_describe(masks)}')
  per_expert = []
  for t, tree in enumerate(masks):
    if tree is None:
      per_expert.append((None,) * count)
      continue
    leaves = _tree.align(gathered.reference, tree, what=f'masks of expert {t}', missing='mask')
    for name, weight, mask in zip(gathered.names, gathered.reference.leaves, leaves):
      _tree.check_mask(mask, tuple(weight.shape), name=name, what=f'mask of expert {t}')
    per_expert.append(leaves)
  return list(zip(*per_expert))


def ota_leaf(
  base: Any,
  experts: Sequence[Any],
  second_moments: Sequence[Any],
  *,
  power: float = 0.5,
  eps: float = 1e-8,
  masks: Sequence[Any] | None = None,
  normalise: str = 'none',
  fallback_to_base: bool = True,
  bias_correction: Any = None,
  scales: Any = None,
  combine: str = 'precond',
  name: str = 'leaf',
):
  """`ota` on one tensor: arrays (base may be None), per-expert moments.

  Moments may be `Rank1` factors for 2-D tensors; `masks` holds one bool
  array (or None) per expert. Values are checked at the end of the call
  unless traced.
  """
  reference = _tree.check_leaf_group(base, experts, name=name)
  shape = tuple(reference.shape)
  num = len(experts)
  _tree.check_moment_group(second_moments, num, shape, name=name, what='second moment')
  leaf_masks = _leaf_masks(masks, num, name=name, shape=shape)
  power, eps, normalise, corrections, scales = options_for(
    num, power, eps, normalise, bias_correction, scales
  )
  out, ok = _ota_kernel(
    base,
    tuple(experts),
    tuple(second_moments),
    leaf_masks,
    power,
    eps,
    scales,
    corrections,
    normalise=normalise,
    fallback_to_base=bool(fallback_to_base),
    combine=check_combine(combine, base),
  )
  checks = _tree.ValueChecks()
  add_moment_check(checks, out, ok, second_moments, name)
  checks.raise_if_failed()
  return out


def ota(
  base: Any,
  experts: Sequence[Any],
  second_moments: Sequence[Any],
  *,
  power: float = 0.5,
  eps: float = 1e-8,
  masks: Sequence[Any] | None = None,
  normalise: str = 'none',
  fallback_to_base: bool = True,
  bias_correction: Any = None,
  scales: Any = None,
  combine: str = 'precond',
) -> Any:
  """OTA merge: an elementwise average weighted by (v_t)^p (module docstring).

  Args:
    base: the pytree all experts were fine-tuned from, or None for the
      no-base form (sum_t w_t theta_t / sum_t w_t).
    experts: a list of T >= 1 pytrees with the same paths, shapes, dtypes.
    second_moments: T pytrees of raw Adam second moments (optax `nu`, torch
      `exp_avg_sq`): per leaf an array of the weight's shape, or `Rank1`
      factors (`rank1_compress`) for 2-D leaves.
    power: p > 0 in P_t = v_t^p (0.5: P = sqrt(v), the Adam preconditioner).
    eps: > 0; added to P before masking (the reference used 1e-26 with a
      base model and 1e-8 as its default).
    masks: None, or T pytrees of bool masks (e.g. `ffg_mask`; None entries
      mean unmasked). With masks, fully masked entries fall back.
    normalise: 'none', or 'mean' for P_t / (mean(P_t) + eps) per tensor
      (which cancels `scales`, as in the reference implementation).
    fallback_to_base: where every expert is masked, use theta0 (True, needs
      a base) or the plain mean of the experts (False, or no base).
    bias_correction: None (default; the raw v, as the reference), or one
      (b2, count) pair per expert: v_t is divided by 1 - b2^count_t.
    scales: None, a scalar, or T per-expert scalars > 0 multiplying v_t^p.
    combine: 'precond' (OTA's weighted average), or the OTA reference's
      alternatives for masked task vectors (`masked_task_vector_merge_method`):
      'linear', theta0 + mean_t m_t tau_t over all T experts, or 'ties', the
      sign election and mean over agreeing experts of `ties` applied to the
      masked task vectors (the reference divides by T there). The second
      moments then only check and mask; fully masked entries fall back as
      above. Both need a base.

  Returns:
    A pytree like `base` (or `experts[0]`), each leaf in its input dtype.

  Raises:
    ValueError: fewer than one expert; trees, shapes or dtypes that differ;
      a missing, negative or non-finite second moment; bad options. The
      message names the leaf or holds the value.
  """
  gathered = _tree.gather(base, experts)
  num = gathered.num_experts
  leaf_moments = _tree.gather_moments(gathered, second_moments, what='second moments')
  leaf_masks = _gather_masks(gathered, masks)
  power, eps, normalise, corrections, scales = options_for(
    num, power, eps, normalise, bias_correction, scales
  )
  combine = check_combine(combine, base)
  bases = gathered.base or (None,) * len(gathered.names)
  checks = _tree.ValueChecks()
  outs = []
  for name, b, leaves, moments, masks_t in zip(
    gathered.names, bases, gathered.experts, leaf_moments, leaf_masks
  ):
    out, ok = _ota_kernel(
      b,
      leaves,
      moments,
      masks_t,
      power,
      eps,
      scales,
      corrections,
      normalise=normalise,
      fallback_to_base=bool(fallback_to_base),
      combine=combine,
    )
    add_moment_check(checks, out, ok, moments, name)
    outs.append(out)
  checks.raise_if_failed()
  return gathered.reference.unflatten(outs)
