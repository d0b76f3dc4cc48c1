"""TIES merging: trim, elect a sign, average the entries that agree.

TIES-Merging, Yadav et al. 2023 (arXiv 2306.01708).
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from curvopt.merge import _options
from curvopt.merge import _topk
from curvopt.merge import _tree

F32 = jnp.float32


def consensus_mean(taus: Sequence[Any], weights_T: Any):
  """Sign election by the weighted sum, then the mean of the agreeing entries.

  As mergekit does: the elected sign is that of sum_t w_t tau_t; an entry of
  expert t agrees when w_t tau_t is non-zero with that sign; the result is
  sum_t w_t tau_t [agree] / sum_t w_t [agree] (with unit weights: the mean
  over the agreeing experts), 0 where none agrees.

  Args:
    taus: T fp32 task vectors of one tensor (already trimmed or dropped).
    weights_T: fp32 [T] per-expert weights.

  Returns:
    The merged fp32 task vector.
  """
  weighted = [weights_T[t] * tau for t, tau in enumerate(taus)]
  # Summing in sorted order makes the election independent of expert order
  # even where the sum cancels to rounding error (its sign would flip).
  elected = jnp.sign(jnp.sum(jnp.sort(jnp.stack(weighted), axis=0), axis=0))
  numerator = jnp.zeros(taus[0].shape, F32)
  denominator = jnp.zeros(taus[0].shape, F32)
  for t, w_tau in enumerate(weighted):
    agree = (jnp.sign(w_tau) == elected) & (w_tau != 0)
    numerator = numerator + jnp.where(agree, w_tau, 0.0)
    denominator = denominator + jnp.where(agree, weights_T[t], 0.0)
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


@jax.jit
def _ties_kernel(base, experts, kept_T, weights_T, scale):
  base32 = base.astype(F32)
  taus = []
  for t, expert in enumerate(experts):
    tau = expert.astype(F32) - base32
    keep = _topk.top_mask(jnp.abs(tau), k=kept_T[t])
    taus.append(jnp.where(keep, tau, 0.0))
  merged = consensus_mean(taus, weights_T)
  return (base32 + scale * merged).astype(base.dtype)


def _options_for(num, density, weights, scale):
  return (
    _options.density(density, num),
    _options.per_expert(weights, num, what='weights'),
    _options.finite(scale, what='scale'),
  )


def ties_leaf(
  base: Any,
  experts: Sequence[Any],
  *,
  density: Any,
  weights: Any = None,
  scale: float = 1.0,
  name: str = 'leaf',
):
  """`ties` on one tensor."""
  _tree.check_leaf_group(base, experts, name=name)
  d, w, scale = _options_for(len(experts), density, weights, scale)
  kept = _topk.num_kept(d, int(base.size))
  return _ties_kernel(base, tuple(experts), kept, w, scale)


def ties(
  base: Any, experts: Sequence[Any], *, density: Any, weights: Any = None, scale: float = 1.0
) -> Any:
  """TIES merge (Yadav et al. 2023) of the experts' task vectors.

  Per tensor and expert, tau_t = theta_t - theta0 is trimmed to its
  round(density_t * size) entries of largest |tau_t| (at least one when
  density_t > 0); the sign of sum_t w_t tau_t is elected per entry; entries
  that agree with it are averaged (`consensus_mean`); the result is
  theta0 + scale * merged tau.

  Args:
    base: the pytree all experts were fine-tuned from.
    experts: a list of T >= 1 pytrees like `base`.
    density: fraction of entries kept per tensor, in [0, 1]; a scalar or one
      per expert.
    weights: None (all 1), a scalar, or T per-expert scalars.
    scale: lambda applied to the merged task vector.

  Returns:
    A pytree like `base`, each leaf in its input dtype.

  Raises:
    ValueError: fewer than one expert, mismatched trees (naming the leaf), or
      a density outside [0, 1] (holding the value).
  """
  gathered = _tree.gather(base, experts)
  d, w, scale = _options_for(gathered.num_experts, density, weights, scale)
  return gathered.reference.unflatten(
    [
      _ties_kernel(b, leaves, _topk.num_kept(d, int(b.size)), w, scale)
      for b, leaves in zip(gathered.base, gathered.experts)
    ]
  )
