"""Adafactor-style rank-1 factors of a non-negative second moment.

Adafactor: Shazeer and Stern 2018 (arXiv 1804.04235).

For an m x n moment v: R = row sums (m), C = column sums (n), and
v_hat = outer(R, C) / sum(v) (0 where sum(v) = 0). Storing (R, C, sum) costs
O(m + n) instead of O(m n); v_hat is exact when v is itself rank-1.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvopt.merge._paths import is_tracer
from curvopt.merge._paths import path_str


class Rank1(NamedTuple):
  """Rank-1 factors of an m x n second moment, all fp32."""

  row_sums: Any  # [m]
  col_sums: Any  # [n]
  total: Any  # [] = sum(row_sums) = sum(col_sums)


def is_rank1(x: Any) -> bool:
  return isinstance(x, Rank1)


@jax.jit
def _compress(v_MxN):
  ok = moment_is_valid(v_MxN)
  v_MxN = v_MxN.astype(jnp.float32)
  return Rank1(jnp.sum(v_MxN, axis=1), jnp.sum(v_MxN, axis=0), jnp.sum(v_MxN)), ok


def _compress_checked(v_MxN, name: str, index: int | None = None) -> Rank1:
  # Negative entries can cancel in the sums, so check v itself, not R and C.
  factors, ok = _compress(v_MxN)
  if not is_tracer(ok) and not bool(ok):
    whose = '' if index is None else f' of expert {index}'
    raise ValueError(
      f'second moment{whose} at leaf {name!r} has negative or non-finite entries; second moments '
      'must be finite and >= 0'
    )
  return factors


def expand_factors(factors: Rank1):
  """v_hat = outer(R, C) / total in fp32 (traceable; used inside kernels)."""
  row_M = jnp.asarray(factors.row_sums, jnp.float32)
  col_N = jnp.asarray(factors.col_sums, jnp.float32)
  total = jnp.asarray(factors.total, jnp.float32)
  # Scaling C first keeps the product in range: C / total <= 1 for v >= 0.
  inv_total = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
  return row_M[:, None] * (col_N * inv_total)[None, :]


_expand = jax.jit(expand_factors)


def dense_moment(moment: Any):
  """A second moment as a dense fp32 array, whether full or `Rank1`."""
  if is_rank1(moment):
    return expand_factors(moment)
  return jnp.asarray(moment).astype(jnp.float32)


def moment_is_valid(moment: Any):
  """Device-side flag: every stored entry (or factor) is finite and >= 0."""
  parts = moment if is_rank1(moment) else (moment,)
  ok = jnp.asarray(True)
  for part in parts:
    part = jnp.asarray(part)
    ok &= jnp.all(jnp.isfinite(part) & (part >= 0))
  return ok


def check_factors(factors: Rank1, shape: tuple[int, ...], *, name: str, what: str) -> None:
  """Shapes of `factors` against the m x n weight they stand for."""
  if len(shape) != 2:
    raise ValueError(
      f'{what} at leaf {name!r} is a rank-1 factorization, but '
      f'the weight has shape {tuple(shape)}; only 2-D leaves '
      'can be factored'
    )
  m, n = shape
  got = tuple(tuple(jnp.shape(part)) for part in factors)
  if got != ((m,), (n,), ()):
    raise ValueError(
      f'{what} at leaf {name!r}: rank-1 factors have shapes '
      f'{got}, expected {((m,), (n,), ())} for a weight of '
      f'shape {tuple(shape)}'
    )


def rank1_compress_leaf(v: Any, *, name: str = 'leaf', index: int | None = None) -> Rank1:
  """Rank-1 factors of one 2-D second moment (finite, >= 0); `index` is the
  expert's position in a merge, named by the error for a bad moment."""
  if jnp.ndim(v) != 2:
    raise ValueError(
      f'rank1_compress_leaf needs a 2-D moment at leaf {name!r}, got shape {jnp.shape(v)}'
    )
  return _compress_checked(v, name, index)


def rank1_expand_leaf(factors: Rank1):
  """The dense fp32 m x n v_hat of one set of `Rank1` factors."""
  if not is_rank1(factors):
    raise TypeError(f'rank1_expand_leaf needs Rank1 factors, got {type(factors).__name__}')
  row, col = jnp.shape(factors.row_sums), jnp.shape(factors.col_sums)
  if len(row) != 1 or len(col) != 1 or jnp.shape(factors.total) != ():
    raise ValueError(
      'Rank1 factors need 1-D row and column sums and a scalar '
      f'total, got shapes {row}, {col}, '
      f'{jnp.shape(factors.total)}'
    )
  return _expand(factors)


def rank1_compress(v: Any) -> Any:
  """Factors every 2-D leaf of a second-moment tree; other leaves are kept.

  Args:
    v: a pytree of second moments (e.g. an Adam `nu`). Leaves that are
      already `Rank1` are kept as they are.

  Returns:
    The same tree with each 2-D leaf replaced by its `Rank1` factors (fp32).

  Raises:
    ValueError: a 2-D leaf with negative or non-finite entries (naming it).
  """

  def compress(path, leaf):
    if is_rank1(leaf) or jnp.ndim(leaf) != 2:
      return leaf
    return _compress_checked(leaf, path_str(path))

  return jax.tree_util.tree_map_with_path(compress, v, is_leaf=is_rank1)


def rank1_expand(factors: Any) -> Any:
  """Inverse layout of `rank1_compress`: `Rank1` leaves become dense v_hat.

  Args:
    factors: a pytree whose leaves are arrays or `Rank1` factors.

  Returns:
    The same tree with every `Rank1` leaf replaced by its dense fp32 v_hat
    (0 where the total is 0); other leaves are kept.

  Raises:
    ValueError: a `Rank1` leaf has inconsistent factor shapes (the message
      names the leaf).
  """

  def expand(path, leaf):
    if not is_rank1(leaf):
      return leaf
    try:
      return rank1_expand_leaf(leaf)
    except ValueError as e:
      raise ValueError(f'leaf {path_str(path)!r}: {e}') from e

  return jax.tree_util.tree_map_with_path(expand, factors, is_leaf=is_rank1)
