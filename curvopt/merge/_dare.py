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
from curvopt.merge._ties import l1_rescale

F32 = jnp.float32
COMBINES = ('ties', 'linear')
# 'inverse': divide the kept entries by 1 - p (the DARE paper's); 'l1': scale
# the dropped vector back to the L1 norm of tau (mergekit's `rescale: true`);
# 'none': keep them as they are.
RESCALES = ('inverse', 'l1', 'none')


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


@functools.partial(jax.jit, static_argnames=('combine', 'normalize', 'rescale'))
def _dare_kernel(base, experts, keep_T, drops_T, weights_T, scale, *, combine, normalize, rescale):
  base32 = base.astype(F32)
  taus = []
  for t, expert in enumerate(experts):
    tau = expert.astype(F32) - base32
    if rescale == 'inverse':
      taus.append(jnp.where(keep_T[t], tau / (1.0 - drops_T[t]), 0.0))
      continue
    kept = jnp.where(keep_T[t], tau, 0.0)
    taus.append(l1_rescale(tau, kept) if rescale == 'l1' else kept)
  if combine == 'ties':
    merged = consensus_mean(taus, weights_T, normalize=normalize)
  else:
    merged = sum(weights_T[t] * tau for t, tau in enumerate(taus))
    if normalize:
      # mergekit's guard for weights that cancel.
      total = jnp.sum(weights_T)
      merged = merged / jnp.where(jnp.abs(total) < 1e-8, 1.0, total)
  return (base32 + scale * merged).astype(base.dtype)


def _merge_leaf(base, experts, key, drops_T, weights_T, scale, combine, normalize, rescale):
  keep_T = dare_keep_masks(key, drops_T, shape=tuple(base.shape))
  return _dare_kernel(
    base,
    experts,
    keep_T,
    drops_T,
    weights_T,
    scale,
    combine=combine,
    normalize=normalize,
    rescale=rescale,
  )


def _options_for(num, drop, combine, weights, scale, normalize, rescale):
  if drop is None:
    raise ValueError('drop is required')
  combine = _options.choice(combine, COMBINES, what='combine')
  return (
    _options.per_expert(drop, num, what='drop', low=0.0, high=1.0, high_open=True),
    _options.per_expert(weights, num, what='weights'),
    _options.finite(scale, what='scale'),
    combine,
    combine == 'ties' if normalize is None else bool(normalize),
    _options.choice(rescale, RESCALES, what='rescale'),
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
  normalize: bool | None = None,
  rescale: str = 'inverse',
  name: str = 'leaf',
):
  """`dare` on one tensor; `key` is this leaf's key (see `leaf_key`).

  Expert t keeps the entries set in row t of `dare_keep_masks(key, p, ...)`.
  """
  _tree.check_leaf_group(base, experts, name=name)
  opts = _options_for(len(experts), drop, combine, weights, scale, normalize, rescale)
  return _merge_leaf(base, tuple(experts), key, *opts)


def dare(
  base: Any,
  experts: Sequence[Any],
  *,
  drop: Any,
  key: Any,
  combine: str = 'ties',
  weights: Any = None,
  scale: float = 1.0,
  normalize: bool | None = None,
  rescale: str = 'inverse',
) -> Any:
  """DARE (Yu et al. 2024): drop task-vector entries, rescale, combine.

  Each entry of tau_t is dropped with probability p_t and the survivors are
  divided by (1 - p_t), so E[tau'_t] = tau_t (rescale='inverse'; 'l1'
  scales the survivors to tau_t's L1 norm instead, as mergekit 0.1's
  `rescale: true`). Then `combine='ties'` elects signs and averages the
  agreeing entries (`consensus_mean`, no trimming: DARE-TIES) and
  `combine='linear'` sums sum_t w_t tau'_t (DARE-linear, not normalized,
  like task arithmetic); the result is theta0 + scale * merged.
  `normalize` overrides that default (mergekit's dare_ties sums the
  agreeing entries: normalize=False).

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
    normalize: None (True for 'ties', False for 'linear'), or whether to
      divide by the (agreeing) weights' sum.
    rescale: 'inverse', 'l1' or 'none' (see above).

  Returns:
    A pytree like `base`, each leaf in its input dtype.

  Raises:
    ValueError: fewer than one expert, mismatched trees (naming the leaf), a
      drop outside [0, 1) or an unknown combine (holding the value).
  """
  gathered = _tree.gather(base, experts)
  opts = _options_for(gathered.num_experts, drop, combine, weights, scale, normalize, rescale)
  return gathered.reference.unflatten(
    [
      _merge_leaf(b, leaves, leaf_key(key, name), *opts)
      for name, b, leaves in zip(gathered.names, gathered.base, gathered.experts)
    ]
  )
