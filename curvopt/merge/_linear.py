"""Linear (weighted mean) and task-arithmetic merges.

Task arithmetic: Ilharco et al. 2022 (arXiv 2212.04089).
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _options
from curvopt.merge import _tree

F32 = jnp.float32


def linear_weights(weights: Any, num: int):
  """Per-expert weights for a normalized mean: finite, with a non-zero sum."""
  w = _options.per_expert(weights, num, what='weights')
  if isinstance(w, np.ndarray) and abs(float(np.sum(w, dtype=np.float64))) == 0:
    raise ValueError(f'weights must not sum to 0, got {weights!r}')
  return w


@functools.partial(jax.jit, static_argnames=('normalize',))
def _linear_kernel(experts, weights_T, *, normalize):
  acc = jnp.zeros(experts[0].shape, F32)
  for t, expert in enumerate(experts):
    acc = acc + weights_T[t] * expert.astype(F32)
  if normalize:
    acc = acc / jnp.sum(weights_T)
  return acc.astype(experts[0].dtype)


@functools.partial(jax.jit, static_argnames=('normalize',))
def _task_arithmetic_kernel(base, experts, weights_T, scale, *, normalize):
  base32 = base.astype(F32)
  acc = jnp.zeros(base.shape, F32)
  for t, expert in enumerate(experts):
    acc = acc + weights_T[t] * (expert.astype(F32) - base32)
  if normalize:
    # mergekit's guard for weights that cancel.
    total = jnp.sum(weights_T)
    acc = acc / jnp.where(jnp.abs(total) < 1e-8, 1.0, total)
  return (base32 + scale * acc).astype(base.dtype)


def _weights(weights, num, normalize):
  if normalize:
    return linear_weights(weights, num)
  return _options.per_expert(weights, num, what='weights')


def linear_leaf(
  experts: Sequence[Any], *, weights: Any = None, normalize: bool = True, name: str = 'leaf'
):
  """`linear` on one tensor: sum_t w_t theta_t / sum_t w_t."""
  _tree.check_leaf_group(None, experts, name=name)
  w = _weights(weights, len(experts), normalize)
  return _linear_kernel(tuple(experts), w, normalize=bool(normalize))


def linear(experts: Sequence[Any], *, weights: Any = None, normalize: bool = True) -> Any:
  """Weighted mean of the experts: sum_t w_t theta_t / sum_t w_t.

  Args:
    experts: a list of T >= 1 pytrees with the same paths, shapes and dtypes.
    weights: None (equal weights), a scalar, or T scalars; their sum must not
      be 0 (negative weights are allowed, as in mergekit).
    normalize: divide by sum_t w_t (mergekit's default); False: the weighted
      sum.

  Returns:
    A pytree like `experts[0]`, each leaf in its input dtype (computed in
    fp32).

  Raises:
    ValueError: fewer than one expert, mismatched trees (naming the leaf),
      or bad weights (holding the value).
  """
  gathered = _tree.gather(None, experts)
  w = _weights(weights, gathered.num_experts, normalize)
  return gathered.reference.unflatten(
    [_linear_kernel(leaves, w, normalize=bool(normalize)) for leaves in gathered.experts]
  )


def task_arithmetic_leaf(
  base: Any,
  experts: Sequence[Any],
  *,
  scale: float = 1.0,
  weights: Any = None,
  normalize: bool = False,
  name: str = 'leaf',
):
  """`task_arithmetic` on one tensor."""
  _tree.check_leaf_group(base, experts, name=name)
  w = _options.per_expert(weights, len(experts), what='weights')
  scale = _options.finite(scale, what='scale')
  return _task_arithmetic_kernel(base, tuple(experts), w, scale, normalize=bool(normalize))


def task_arithmetic(
  base: Any,
  experts: Sequence[Any],
  *,
  scale: float = 1.0,
  weights: Any = None,
  normalize: bool = False,
) -> Any:
  """theta0 + scale * sum_t w_t (theta_t - theta0), the sum not normalized.

  Args:
    base: the pytree all experts were fine-tuned from.
    experts: a list of T >= 1 pytrees like `base`.
    scale: lambda, the global scale of the summed task vectors.
    weights: None (all 1), a scalar, or T per-expert scalars.
    normalize: divide the sum by sum_t w_t (mergekit's `normalize: true`;
      a sum within 1e-8 of 0 is taken as 1, as mergekit does).

  Returns:
    A pytree like `base`, each leaf in its input dtype.

  Raises:
    ValueError: see `linear`.
  """
  gathered = _tree.gather(base, experts)
  w = _options.per_expert(weights, gathered.num_experts, what='weights')
  scale = _options.finite(scale, what='scale')
  return gathered.reference.unflatten(
    [
      _task_arithmetic_kernel(b, leaves, w, scale, normalize=bool(normalize))
      for b, leaves in zip(gathered.base, gathered.experts)
    ]
  )
