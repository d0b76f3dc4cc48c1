"""Per-tensor "keep the top entries" masks with a traced count or mass.

`lax.top_k` needs a static k; a density sweep would then recompile for every
density. Ranking by one stable sort keeps k traced.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from curvopt.merge._paths import is_tracer


def num_kept(density: Any, n: int) -> Any:
  """k = round(density * n), at least 1 when density > 0, at most n.

  Matches the reference FFG implementation (`max(1, round(d * numel))`), so
  a positive density never empties a small tensor such as a bias. Computed
  on the host in float64 (Python's round: half to even) for concrete
  densities, so that it agrees with the global threshold's count; traced
  densities are rounded on device in fp32.

  Args:
    density: a scalar or an array of densities in [0, 1].
    n: the number of entries.

  Returns:
    An int32 array shaped like `density`.
  """
  if is_tracer(density):
    k = jnp.round(density.astype(jnp.float32) * n).astype(jnp.int32)
    return jnp.minimum(jnp.where(density > 0, jnp.maximum(k, 1), 0), n)
  d = np.asarray(density, np.float64)
  k = np.vectorize(lambda x: 0 if x == 0 else min(n, max(1, round(x * n))), otypes=[np.int64])(d)
  return k.astype(np.int32)


def explicit_spec(x):
  """x's PartitionSpec when it is sharded over Explicit mesh axes, else None.

  Under explicit sharding (the default of `jax.make_mesh`) shardings are
  part of the type, and sort / scatter refuse a sharded axis.
  """
  spec = jax.typeof(x).sharding.spec
  return spec if any(axis is not None for axis in spec) else None


def top_mask(score, *, k=None, mass=None):
  """Bool mask of the top entries of `score`: the k largest, or the fewest
  largest whose sum reaches mass * sum(score).

  Entries are ranked by one stable sort (among equal scores the lower flat
  index wins), so exactly k entries are kept and the result is
  deterministic. Traceable; k and mass may be traced.

  Args:
    score: an array of finite, non-negative scores, any shape.
    k: the number of entries to keep (`num_kept`).
    mass: instead of k, a fraction in [0, 1] of the total score to keep; a
      zero total keeps nothing.

  Returns:
    A bool array of `score`'s shape.
  """
  sharding = jax.typeof(score).sharding
  spec = explicit_spec(score)
  if spec is not None:
    # Sorting needs the whole tensor: gather this one tensor, then re-shard
    # the mask like the input.
    score = jax.sharding.reshard(score, sharding.update(spec=P()))
  flat = jnp.ravel(score).astype(jnp.float32)
  n = flat.size
  order = jnp.argsort(-flat, stable=True)
  if mass is not None:
    cumulative = jnp.cumsum(flat[order])
    target = mass * cumulative[-1] if n else jnp.float32(0)
    k = jnp.where(target > 0, jnp.sum(cumulative < target) + 1, 0)
    k = jnp.minimum(k, n)
  keep_sorted = jnp.arange(n) < k
  mask = jnp.zeros((n,), bool).at[order].set(keep_sorted)
  mask = mask.reshape(jnp.shape(score))
  if spec is not None:
    mask = jax.sharding.reshard(mask, sharding)
  return mask
