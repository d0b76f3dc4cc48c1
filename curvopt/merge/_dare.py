"""DARE: random drop and rescale of task vectors, then TIES or linear.

DARE, Yu et al. 2023 (arXiv 2311.03099).
"""

import functools
from typing import Any, Sequence
import zlib

import jax
import jax.numpy as jnp

from curvopt.merge import _options
from curvopt.merge import _tree
from curvopt.merge._ties import consensus_mean

F32 = jnp.float32
COMBINES = ('ties', 'linear')


def leaf_key(key: Any, name: str):
  """The PRNG key of the leaf `name`: fold_in(key, crc32(name)).

  Keys follow leaf names, not leaf order, so a streaming merge that visits
  leaves in another order (or only some of them) drops the same entries.
  """
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@functools.partial(jax.jit, static_argnames=('shape',))
def dare_keep_masks(key, drops_T, *, shape):
  """Bool [T, *shape]: expert t keeps an entry with probability 1 - p_t.

  Args:
    key: the leaf's PRNG key (`leaf_key`).
    drops_T: fp32 [T] drop probabilities.
    shape: the leaf's shape (static).

  Returns:
    Row t is expert t's keep mask. One draw serves all experts, so the
    random-bit kernel (slow to compile) is compiled once per leaf shape and
    number of experts, whatever the combine.
  """
  num = drops_T.shape[0]
  u = jax.random.uniform(key, (num,) + tuple(shape))
  return u >= drops_T.reshape((num,) + (1,) * len(shape))


@functools.partial(jax.jit, static_argnames=('combine',))
def _dare_kernel(base, experts, keep_T, drops_T, weights_T, scale, *, combine):
  base32 = base.astype(F32)
  taus = []
  for t, expert in enumerate(experts):
    tau = expert.astype(F32) - base32
    taus.append(jnp.where(keep_T[t], tau / (1.0 - drops_T[t]), 0.0))
  if combine == 'ties':
    merged = consensus_mean(taus, weights_T)
  else:
    merged = sum(weights_T[t] * tau for t, tau in enumerate(taus))
  return (base32 + scale * merged).astype(base.dtype)


def _merge_leaf(base, experts, key, drops_T, weights_T, scale, combine):
  keep_T = dare_keep_masks(key, drops_T, shape=tuple(base.shape))
  return _dare_kernel(base, experts, keep_T, drops_T, weights_T, scale, combine=combine)


def _options_for(num, drop, combine, weights, scale):
  if drop is None:
    raise ValueError('drop is required')
  return (
    _options.per_expert(drop, num, what='drop', low=0.0, high=1.0, high_open=True),
    _options.choice(combine, COMBINES, what='combine'),
    _options.per_expert(weights, num, what='weights'),
    _options.finite(scale, what='scale'),
  )


def dare_leaf(
  base: Any,
  experts: Sequence[Any],
  *,
  drop: Any,
  key: Any,
  combine: str = 'ties',
  weights: Any = None,
  scale: float = 1.0,
  name: str = 'leaf',
):
  """`dare` on one tensor; `key` is this leaf's key (see `leaf_key`).

  Expert t keeps the entries set in row t of `dare_keep_masks(key, p, ...)`.
  """
  _tree.check_leaf_group(base, experts, name=name)
  p, combine, w, scale = _options_for(len(experts), drop, combine, weights, scale)
  return _merge_leaf(base, tuple(experts), key, p, w, scale, combine)


def dare(
  base: Any,
  experts: Sequence[Any],
  *,
  drop: Any,
  key: Any,
  combine: str = 'ties',
  weights: Any = None,
  scale: float = 1.0,
) -> Any:
  """DARE (Yu et al. 2024): drop task-vector entries, rescale, combine.

  Each entry of tau_t is dropped with probability p_t and the survivors are
  divided by (1 - p_t), so E[tau'_t] = tau_t. Then `combine='ties'` elects
  signs and averages the agreeing entries (`consensus_mean`, no trimming:
  DARE-TIES) and `combine='linear'` sums sum_t w_t tau'_t (DARE-linear, not
  normalized, like task arithmetic); the result is theta0 + scale * merged.

  Args:
    base: the pytree all experts were fine-tuned from.
    experts: a list of T >= 1 pytrees like `base`.
    drop: drop probability in [0, 1); a scalar or one per expert.
    key: a jax PRNG key; the leaf named n draws
      `dare_keep_masks(leaf_key(key, n), p, shape=...)`, whose row t is
      expert t's keep mask (uniform u >= p_t).
    combine: 'ties' or 'linear'.
    weights: None (all 1), a scalar, or T per-expert scalars.
    scale: lambda applied to the merged task vector.

  Returns:
    A pytree like `base`, each leaf in its input dtype.

  Raises:
    ValueError: fewer than one expert, mismatched trees (naming the leaf), a
      drop outside [0, 1) or an unknown combine (holding the value).
  """
  gathered = _tree.gather(base, experts)
  p, combine, w, scale = _options_for(gathered.num_experts, drop, combine, weights, scale)
  return gathered.reference.unflatten(
    [
      _merge_leaf(b, leaves, leaf_key(key, name), p, w, scale, combine)
      for name, b, leaves in zip(gathered.names, gathered.base, gathered.experts)
    ]
  )
