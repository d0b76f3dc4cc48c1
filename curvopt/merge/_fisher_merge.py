"""Fisher merging: an elementwise mean weighted by diagonal Fisher estimates.

Fisher-weighted averaging, Matena and Raffel 2021 (arXiv 2111.09832).
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from curvopt.merge import _options
from curvopt.merge import _rank1
from curvopt.merge import _tree
from curvopt.merge._linear import linear_weights

F32 = jnp.float32


@jax.jit
def _fisher_kernel(experts, fishers, weights_T, eps):
  numerator = jnp.zeros(experts[0].shape, F32)
  denominator = jnp.zeros(experts[0].shape, F32)
  oks = []
  for t, (expert, fisher_t) in enumerate(zip(experts, fishers)):
    oks.append(_rank1.moment_is_valid(fisher_t))
    w = weights_T[t] * (_rank1.dense_moment(fisher_t) + eps)
    numerator = numerator + w * expert.astype(F32)
    denominator = denominator + w
  return (numerator / denominator).astype(experts[0].dtype), jnp.stack(oks)


def _options_for(num, weights, eps):
  # Non-negative weights with a positive sum keep every denominator > 0.
  _options.per_expert(weights, num, what='weights', low=0.0)
  return linear_weights(weights, num), _options.positive(eps, what='eps')


def fisher_leaf(
  experts: Sequence[Any],
  fishers: Sequence[Any],
  *,
  eps: float = 1e-8,
  weights: Any = None,
  name: str = 'leaf',
):
  """`fisher` on one tensor (a fisher may be `Rank1` factors)."""
  reference = _tree.check_leaf_group(None, experts, name=name)
  _tree.check_moment_group(fishers, len(experts), tuple(reference.shape), name=name, what='fisher')
  w, eps = _options_for(len(experts), weights, eps)
  checks = _tree.ValueChecks()
  out, ok = _fisher_kernel(tuple(experts), tuple(fishers), w, eps)
  checks.add(ok, _tree.moment_message(name, 'fisher'))
  checks.raise_if_failed()
  return out


def fisher(
  experts: Sequence[Any], fishers: Sequence[Any], *, eps: float = 1e-8, weights: Any = None
) -> Any:
  """Fisher merging (Matena & Raffel 2022) with diagonal Fishers.

  theta* = sum_t w_t (F_t + eps) theta_t / sum_t w_t (F_t + eps), per entry.

  Args:
    experts: a list of T >= 1 pytrees with the same paths, shapes and dtypes.
    fishers: T pytrees of diagonal Fisher estimates (e.g. `estimate_fisher`
      or Adam second moments), leaves of the weights' shapes or `Rank1`
      factors for 2-D leaves.
    eps: floor added to every Fisher entry (> 0), so entries where all
      Fishers vanish get the plain weighted mean.
    weights: None (all 1), a scalar, or T non-negative per-expert scalars.

  Returns:
    A pytree like `experts[0]`, each leaf in its input dtype.

  Raises:
    ValueError: fewer than one expert, mismatched trees, a missing, negative
      or non-finite Fisher (naming the leaf), or bad options.
  """
  gathered = _tree.gather(None, experts)
  leaf_fishers = _tree.gather_moments(gathered, fishers, what='fishers')
  w, eps = _options_for(gathered.num_experts, weights, eps)
  checks = _tree.ValueChecks()
  outs = []
  for name, leaves, leaf_f in zip(gathered.names, gathered.experts, leaf_fishers):
    out, ok = _fisher_kernel(leaves, leaf_f, w, eps)
    checks.add(ok, _tree.moment_message(name, 'fisher'))
    outs.append(out)
  checks.raise_if_failed()
  return gathered.reference.unflatten(outs)
