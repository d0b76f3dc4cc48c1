"""TIES merging: trim, elect a sign, average the entries that agree.

TIES-Merging, Yadav et al. 2023 (arXiv 2306.01708).
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _options
from curvopt.merge import _topk
from curvopt.merge import _tree

F32 = jnp.float32
RESCALES = ('none', 'l1')
# mergekit's guard: a task vector (or its trimmed part) with an L1 norm below
# this is not rescaled.
_RESCALE_EPS = 1e-7


def kept_count(density: float, n: int) -> int:
  """int(density * n) entries (all for density >= 1), as mergekit keeps:
  truncated, so a small tensor can keep none (mergekit then stops; here the
  tensor keeps no task-vector entry)."""
  return n if density >= 1 else int(float(density) * n)


def l1_rescale(tau, kept):
  """`kept` (a trimmed or dropped `tau`) scaled to tau's L1 norm: mergekit's
  `rescale` (norm l1); unscaled where either norm is below 1e-7."""
  before = jnp.sum(jnp.abs(tau))
  after = jnp.sum(jnp.abs(kept))
  ok = (before >= _RESCALE_EPS) & (after >= _RESCALE_EPS)
  return jnp.where(ok, kept * (before / jnp.where(ok, after, 1.0)), kept)


def consensus_mean(taus: Sequence[Any], weights_T: Any, *, normalize: bool = True):
  """Sign election by the weighted sum, then the mean of the agreeing entries.

  mergekit's rule (its `get_mask(method='sum')` and TIES mixing): the elected
  sign is that of sum_t w_t tau_t, '+' where the sum is exactly 0; an entry
  of expert t agrees when w_t tau_t is non-zero with that sign; the result is
  sum_t w_t tau_t [agree] / sum_t w_t [agree] (with unit weights: the mean
  over the agreeing experts), the divisor taken as 1 where it is 0. With
  normalize=False the agreeing entries are summed, not averaged (mergekit's
  `normalize: false`, the default of its dare_ties).

  Args:
    taus: T fp32 task vectors of one tensor (already trimmed or dropped).
    weights_T: fp32 [T] per-expert weights.
    normalize: divide by the agreeing weights' sum.

  Returns:
    The merged fp32 task vector.
  """
  weighted = [weights_T[t] * tau for t, tau in enumerate(taus)]
  # Summing in sorted order makes the election independent of expert order
  # even where the sum cancels to rounding error (its sign would flip); it
  # differs from mergekit's in-order sum only there.
  total = jnp.sum(jnp.sort(jnp.stack(weighted), axis=0), axis=0)
  elected = jnp.where(total >= 0, 1.0, -1.0)
  numerator = jnp.zeros(taus[0].shape, F32)
  denominator = jnp.zeros(taus[0].shape, F32)
  for t, w_tau in enumerate(weighted):
    agree = jnp.sign(w_tau) == elected
    numerator = numerator + jnp.where(agree, w_tau, 0.0)
    denominator = denominator + jnp.where(agree, weights_T[t], 0.0)
  if not normalize:
    return numerator
  return numerator / jnp.where(denominator == 0, 1.0, denominator)


@functools.partial(jax.jit, static_argnames=('normalize', 'rescale'))
def _ties_kernel(base, experts, kept_T, weights_T, scale, *, normalize, rescale):
  base32 = base.astype(F32)
  taus = []
  for t, expert in enumerate(experts):
    tau = expert.astype(F32) - base32
    keep = _topk.top_mask(jnp.abs(tau), k=kept_T[t])
    trimmed = jnp.where(keep, tau, 0.0)
    taus.append(l1_rescale(tau, trimmed) if rescale == 'l1' else trimmed)
  merged = consensus_mean(taus, weights_T, normalize=normalize)
  return (base32 + scale * merged).astype(base.dtype)


def _options_for(num, density, weights, scale, rescale):
  return (
    _options.density(density, num),
    _options.per_expert(weights, num, what='weights'),
    _options.finite(scale, what='scale'),
    _options.choice(rescale, RESCALES, what='rescale'),
  )


def _kept(densities, n):
  return np.asarray([kept_count(d, n) for d in densities], np.int32)


def ties_leaf(
  base: Any,
  experts: Sequence[Any],
  *,
  density: Any,
  weights: Any = None,
  scale: float = 1.0,
  normalize: bool = True,
  rescale: str = 'none',
  name: str = 'leaf',
):
  """`ties` on one tensor."""
  _tree.check_leaf_group(base, experts, name=name)
  d, w, scale, rescale = _options_for(len(experts), density, weights, scale, rescale)
  return _ties_kernel(
    base,
    tuple(experts),
    _kept(d, int(base.size)),
    w,
    scale,
    normalize=bool(normalize),
    rescale=rescale,
  )


def ties(
  base: Any,
  experts: Sequence[Any],
  *,
  density: Any,
  weights: Any = None,
  scale: float = 1.0,
  normalize: bool = True,
  rescale: str = 'none',
) -> Any:
  """TIES merge (Yadav et al. 2023) of the experts' task vectors, with
  mergekit's conventions, so that a mergekit config's numbers give its tensors.

  Per tensor and expert, tau_t = theta_t - theta0 is trimmed to its
  int(density_t * size) entries of largest |tau_t| (mergekit truncates; a
  tensor too small for one entry keeps none; among equal magnitudes the
  lower flat index wins); with rescale='l1' the trimmed vector is scaled
  back to tau_t's L1 norm (mergekit's `rescale: true`). The sign of
  sum_t w_t tau_t is elected per entry, '+' where it is exactly 0, and the
  entries that agree are averaged (`consensus_mean`; summed with
  normalize=False); the result is theta0 + scale * merged tau (scale is
  mergekit's `lambda`). Everything is computed in fp32 (mergekit computes
  in the base's dtype).

  Args:
    base: the pytree all experts were fine-tuned from.
    experts: a list of T >= 1 pytrees like `base`.
    density: fraction of entries kept per tensor, in [0, 1]; a scalar or one
      per expert.
    weights: None (all 1), a scalar, or T per-expert scalars.
    scale: lambda applied to the merged task vector.
    normalize: average the agreeing entries (True, mergekit's TIES default)
      or sum them.
    rescale: 'none' or 'l1' (see above).

  Returns:
    A pytree like `base`, each leaf in its input dtype.

  Raises:
    ValueError: fewer than one expert, mismatched trees (naming the leaf), or
      a density outside [0, 1] (holding the value).
  """
  gathered = _tree.gather(base, experts)
  d, w, scale, rescale = _options_for(gathered.num_experts, density, weights, scale, rescale)
  return gathered.reference.unflatten(
    [
      _ties_kernel(
        b, leaves, _kept(d, int(b.size)), w, scale, normalize=bool(normalize), rescale=rescale
      )
      for b, leaves in zip(gathered.base, gathered.experts)
    ]
  )
