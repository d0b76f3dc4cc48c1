"""OTA+FFG in one call: each expert's global FFG cutoff, then one fused pass per tensor.

OTA and FFG: Mahdavi et al. 2025 (arXiv 2509.11167).

`ota(base, experts, v, masks=[ffg_mask(base, e, v_e, density=d) ...])` writes T bool masks and
reads every input twice. `ota_ffg` computes each expert's cutoff first, then one jit'd pass per
tensor recomputes every expert's saliency, compares it with that expert's cutoff and merges: no
mask is written and the merge reads its inputs once. With quantile='exact' the cutoff is
`ffg_mask`'s (a radix select over all saliencies, two histogram passes); with 'sampled' it is the
matching quantile of a strided sample of ~65k saliencies (a sampled quantile for large
models): one strided pass, and the kept fraction is the density to within a few parts per
thousand of it (binomial spread of the sample's rank, ~1 / sqrt(65k * d)).
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _ffg
from curvopt.merge import _options
from curvopt.merge import _ota
from curvopt.merge import _tree


@functools.partial(jax.jit, static_argnames=('score', 'normalise', 'fallback_to_base', 'combine'))
def _ota_ffg_kernel(
  base,
  experts,
  moments,
  cutoffs_T,
  power,
  eps,
  scales_T,
  corrections_T,
  *,
  score,
  normalise,
  fallback_to_base,
  combine,
):
  def merge(root):
    # The masks are built inside the branch, where they fuse into the merge
    # (operands of the cond would be materialized). A cutoff of +inf keeps
    # nothing, even a saliency that overflowed to inf.
    masks = tuple(
      (_ffg.saliency(base, e, v, score=score) >= cutoffs_T[t]) & (cutoffs_T[t] < jnp.inf)
      for t, (e, v) in enumerate(zip(experts, moments))
    )
    return _ota.ota_merge(
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
    )

  return _ota.by_power(power, merge)


def _cutoffs(bases, experts_T, moments_T, densities, *, quantile, score):
  """Every expert's global cutoff for its density: [T] fp32 (+inf: keep none)."""
  stride = _ffg.sample_stride(bases)
  # Small models and Explicit-sharded leaves (no strided sample): exact.
  if quantile == 'sampled' and stride:
    ranks = np.asarray([_ffg.sampled_rank(bases, float(d), stride) for d in densities], np.int32)
    return _ffg.sampled_cutoffs_kernel(
      bases, experts_T, moments_T, ranks, score=score, stride=stride
    )
  # All experts' histograms in one computation per radix stage.
  return jnp.asarray(_ffg.exact_cutoffs(bases, experts_T, moments_T, densities, score=score))


def ota_ffg_leaf(
  base: Any,
  experts: Sequence[Any],
  second_moments: Sequence[Any],
  *,
  cutoffs: Sequence[float],
  score: str = 'fisher',
  power: float = 0.5,
  eps: float = 1e-8,
  normalise: str = 'none',
  fallback_to_base: bool = True,
  bias_correction: Any = None,
  scales: Any = None,
  combine: str = 'precond',
  name: str = 'leaf',
):
  """`ota_ffg`'s fused pass on one tensor, given each expert's saliency
  cutoff (+inf keeps nothing): what a streaming merge calls once the global
  cutoffs are known. Equals `ota_leaf` over `ffg_mask_leaf(threshold=...)`
  masks, without writing them."""
  if base is None:
    raise ValueError('ota_ffg needs the base: FFG prunes task vectors theta_t - theta0')
  _options.choice(score, _ffg.SCORES, what='score')
  combine = _ota.check_combine(combine, base)
  reference = _tree.check_leaf_group(base, experts, name=name)
  num = len(experts)
  _tree.check_moment_group(
    second_moments, num, tuple(reference.shape), name=name, what='second moment'
  )
  power, eps, normalise, corrections, scales = _ota.options_for(
    num, power, eps, normalise, bias_correction, scales
  )
  out, ok = _ota_ffg_kernel(
    base,
    tuple(experts),
    tuple(second_moments),
    jnp.asarray(np.asarray(cutoffs, np.float32)),
    power,
    eps,
    scales,
    corrections,
    score=score,
    normalise=normalise,
    fallback_to_base=bool(fallback_to_base),
    combine=combine,
  )
  checks = _tree.ValueChecks()
  _ota.add_moment_check(checks, out, ok, second_moments, name)
  checks.raise_if_failed()
  return out


def ota_ffg(
  base: Any,
  experts: Sequence[Any],
  second_moments: Sequence[Any],
  *,
  density: Any = None,
  threshold: Any = None,
  quantile: str = 'exact',
  score: str = 'fisher',
  power: float = 0.5,
  eps: float = 1e-8,
  normalise: str = 'none',
  fallback_to_base: bool = True,
  bias_correction: Any = None,
  scales: Any = None,
  combine: str = 'precond',
) -> Any:
  """OTA over FFG-pruned task vectors, in one fused pass (module docstring).

  With quantile='exact' the result equals `ota(base, experts,
  second_moments, masks=[ffg_mask(base, e, v, density=d_t) ...])` with the
  same options; the FFG saliency is computed from the same second moments
  that weight OTA (arrays or `Rank1` factors).

  Args:
    base: the pytree the experts were fine-tuned from (FFG needs it).
    experts: T >= 1 pytrees like `base`.
    second_moments: T pytrees of raw second moments (arrays or `Rank1`).
    density: the fraction of entries each expert keeps (global scope): a
      scalar or one per expert, in [0, 1]. Give exactly one of density and
      threshold.
    threshold: saliency cutoffs, a scalar or one per expert.
    quantile: 'exact' (the k-th largest saliency) or 'sampled' (as
      `ffg_threshold`'s: one strided pass instead of two histogram passes).
    score: 'fisher' (v tau^2) or 'magnitude' (|tau|).
    power, eps, normalise, fallback_to_base, bias_correction, scales,
      combine: as in `ota`.

  Returns:
    A pytree like `base`, each leaf in its input dtype.

  Raises:
    ValueError: no base; not exactly one of density and threshold; a density
      outside [0, 1]; an unknown quantile or score; anything `ota` rejects.
  """
  if base is None:
    raise ValueError('ota_ffg needs the base: FFG prunes task vectors theta_t - theta0')
  _options.choice(quantile, _ffg.QUANTILES, what='quantile')
  _options.choice(score, _ffg.SCORES, what='score')
  if (density is None) == (threshold is None):
    raise ValueError(
      f'give exactly one of density and threshold; got density={density!r}, threshold={threshold!r}'
    )
  combine = _ota.check_combine(combine, base)
  gathered = _tree.gather(base, experts)
  num = gathered.num_experts
  leaf_moments = _tree.gather_moments(gathered, second_moments, what='second moments')
  power, eps, normalise, corrections, scales = _ota.options_for(
    num, power, eps, normalise, bias_correction, scales
  )
  if threshold is not None:
    cutoffs = jnp.asarray(_options.per_expert(threshold, num, what='threshold'))
  else:
    cutoffs = _cutoffs(
      tuple(gathered.base),
      tuple(tuple(leaves[t] for leaves in gathered.experts) for t in range(num)),
      tuple(tuple(m[t] for m in leaf_moments) for t in range(num)),
      _options.density(density, num),
      quantile=quantile,
      score=score,
    )
  checks = _tree.ValueChecks()
  outs = []
  for name, b, leaves, moments in zip(
    gathered.names, gathered.base, gathered.experts, leaf_moments
  ):
    out, ok = _ota_ffg_kernel(
      b,
      leaves,
      moments,
      cutoffs,
      power,
      eps,
      scales,
      corrections,
      score=score,
      normalise=normalise,
      fallback_to_base=bool(fallback_to_base),
      combine=combine,
    )
    _ota.add_moment_check(checks, out, ok, moments, name)
    outs.append(out)
  checks.raise_if_failed()
  return gathered.reference.unflatten(outs)
