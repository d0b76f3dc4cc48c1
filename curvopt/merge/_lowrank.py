"""Rank-r approximation of a second moment by truncated SVD (the OTA reference's `rank`).

The reference approximates each 2-D preconditioner by its best rank-r fit,
U_r diag(S_r) V_r^T, clipped at 0 (a truncated SVD of a non-negative matrix
can dip below 0), before FFG and OTA use it. Unlike `rank1_compress` this
saves no memory: the SVD needs the dense moment, and the result is dense.
It serves to study how much of the curvature's structure a merge needs.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from curvopt.merge._paths import path_str


@functools.partial(jax.jit, static_argnames=('rank',))
def _lowrank(v_MxN, *, rank):
  u, s, vh = jnp.linalg.svd(v_MxN.astype(jnp.float32), full_matrices=False)
  return jnp.maximum((u[:, :rank] * s[:rank]) @ vh[:rank], 0.0)


def check_rank(rank: Any) -> int:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f'the moment rank must be an integer >= 1, got {rank!r}')
  return rank


def lowrank_moment_leaf(v: Any, rank: int, *, name: str = 'leaf'):
  """The rank-`rank` SVD approximation of one 2-D moment, clipped at 0 (fp32).

  A rank at least min(m, n) returns v itself (in fp32).
  """
  rank = check_rank(rank)
  if jnp.ndim(v) != 2:
    raise ValueError(f'a rank-r moment needs a 2-D moment at leaf {name!r}, got {jnp.shape(v)}')
  if rank >= min(jnp.shape(v)):
    return jnp.asarray(v, jnp.float32)
  return _lowrank(v, rank=rank)


def lowrank_moment(v: Any, rank: int) -> Any:
  """`lowrank_moment_leaf` on every 2-D leaf of a second-moment tree; other
  leaves are kept.

  Args:
    v: a pytree of second moments (e.g. an Adam `nu`).
    rank: r >= 1.

  Returns:
    The same tree with each 2-D leaf replaced by its dense rank-r fit.
  """
  rank = check_rank(rank)
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: (
      lowrank_moment_leaf(leaf, rank, name=path_str(path)) if jnp.ndim(leaf) == 2 else leaf
    ),
    v,
  )
