"""Views of weight arrays as (batches of) matrices [d_in, d_out].

Convention (pinned by tests/optim/test_optim_lmo.py): a Flax kernel is applied
as `y = x @ kernel`, so a 2-D kernel is [d_in, d_out]: axis 0 is the input
(reduction) side, axis 1 the output side. An n-D weight is described by optax's
`MuonDimensionNumbers(reduction_axis, output_axis)`; every other axis is a
batch axis (independent matrices). Its matrix view is [batch, d_in, d_out].
"""

import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
from optax.contrib import MuonDimensionNumbers

from curvopt.optim import _paths
from curvopt.optim import _sharding

DimSpec = Union[None, MuonDimensionNumbers, Any, Callable[[Any], Any]]


def _is_dims(x: Any) -> bool:
  return isinstance(x, MuonDimensionNumbers)


def default_dimension_numbers(shape: tuple[int, ...]) -> MuonDimensionNumbers:
  """The default matrix view of a weight of rank >= 2.

  2-D: [d_in, d_out]. n-D: the contiguous split axes[:k] | axes[k:] that makes
  the matrix most square, ties to the smaller k. This picks the right view for
  Flax attention kernels (q/k/v [d, heads, head_dim] -> [d, heads*head_dim];
  o [heads, head_dim, d] -> [heads*head_dim, d]) and convolutions
  ([kh, kw, c_in, c_out] -> [kh*kw*c_in, c_out]). Stacked (scanned) layers
  [layers, d_in, d_out] need explicit dimension numbers with a batch axis.

  Args:
    shape: the weight's shape, rank >= 2.

  Returns:
    MuonDimensionNumbers with tuple axes.
  """
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(f'a matrix view needs rank >= 2, got shape {shape}')
  if ndim == 2:
    return MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1,))

  def imbalance(k):
    return abs(math.log(math.prod(shape[:k]) or 1) - math.log(math.prod(shape[k:]) or 1))

  split = min(range(1, ndim), key=imbalance)
  return MuonDimensionNumbers(
    reduction_axis=tuple(range(split)), output_axis=tuple(range(split, ndim))
  )


class MatrixView(NamedTuple):
  """How one leaf maps to a [batch, d_in, d_out] stack of matrices."""

  shape: tuple[int, ...]
  transpose: tuple[int, ...]  # batch axes, then reduction, then output axes
  flat_shape: tuple[int, int, int]  # (batch, d_in, d_out)
  batch_rank: int
  in_rank: int

  @property
  def d_in(self) -> int:
    return self.flat_shape[1]

  @property
  def d_out(self) -> int:
    return self.flat_shape[2]

  @property
  def _groups(self) -> tuple[tuple[int, ...], ...]:
    """Leaf axes that form the batch, d_in and d_out axes of the view."""
    b, r = self.batch_rank, self.in_rank
    return (self.transpose[:b], self.transpose[b : b + r], self.transpose[b + r :])

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """x [*shape] -> [batch, d_in, d_out]."""
    mesh = _sharding.mesh_of(x)
    if mesh is None:
      return x.transpose(self.transpose).reshape(self.flat_shape)
    # A reshape may merge axes only if just the major one is sharded; other
    # sharded axes are gathered first. The view keeps the major axis' spec.
    spec = list(_sharding.spec_of(x))
    gather = [a for g in self._groups for a in g[1:] if spec[a] is not None]
    if gather:
      for a in gather:
        spec[a] = None
      x = _sharding.relayout(x, tuple(spec), mesh)
    out_spec = tuple(spec[g[0]] if g else None for g in self._groups)
    x = x.transpose(self.transpose)
    return jnp.reshape(
      x, self.flat_shape, out_sharding=NamedSharding(mesh, PartitionSpec(*out_spec))
    )

  def from_matrices(self, m: jax.Array, like: jax.Array | None = None) -> jax.Array:
    """[batch, d_in, d_out] -> [*shape], laid out like `like` if given."""
    unflat = tuple(self.shape[a] for a in self.transpose)
    inverse = tuple(int(a) for a in np.argsort(self.transpose))
    mesh = _sharding.mesh_of(m)
    if mesh is None:
      y = m.reshape(unflat).transpose(inverse)
    else:
      m_spec = _sharding.spec_of(m)
      unflat_spec = []
      for g, s in zip(self._groups, m_spec):
        unflat_spec += [s] + [None] * (len(g) - 1) if g else []
      y = jnp.reshape(
        m, unflat, out_sharding=NamedSharding(mesh, PartitionSpec(*unflat_spec))
      ).transpose(inverse)
    if like is not None:
      like_mesh = _sharding.mesh_of(like)
      if like_mesh is not None and _sharding.spec_of(y) != _sharding.spec_of(like):
        y = _sharding.relayout(y, _sharding.spec_of(like), like_mesh)
    return y


def matrix_view(
  shape: tuple[int, ...], dims: MuonDimensionNumbers | None, *, path: str = ''
) -> MatrixView:
  """The [batch, d_in, d_out] view of a leaf of `shape` under `dims`.

  Args:
    shape: the leaf's shape.
    dims: its dimension numbers, None for `default_dimension_numbers`.
    path: the leaf's key path, for error messages.

  Returns:
    A MatrixView.

  Raises:
    ValueError: rank < 2, or axes that overlap or fall outside the shape; the
      message names the leaf path.
  """
  where = f' for the leaf {path!r}' if path else ''
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
      f'unsupported rank {ndim} (shape {shape}){where}: a '
      'matrix LMO needs rank >= 2; label the leaf "vector" '
      'or give it another LMO'
    )
  if dims is None:
    dims = default_dimension_numbers(shape)
  red = dims.reduction_axis
  out = dims.output_axis
  red = (red,) if isinstance(red, int) else tuple(red)
  out = (out,) if isinstance(out, int) else tuple(out)
  for ax in red + out:
    if not -ndim <= ax < ndim:
      raise ValueError(f'axis {ax} out of range for shape {shape}{where} ({dims})')
  red = tuple(a % ndim for a in red)
  out = tuple(a % ndim for a in out)
  if not red or not out or set(red) & set(out) or len(set(red + out)) != len(red + out):
    raise ValueError(
      f'reduction and output axes must be non-empty and '
      f'disjoint, got {dims} for shape {shape}{where}'
    )
  batch = tuple(a for a in range(ndim) if a not in red + out)
  flat = (
    math.prod(shape[a] for a in batch),
    math.prod(shape[a] for a in red),
    math.prod(shape[a] for a in out),
  )
  return MatrixView(tuple(shape), batch + red + out, flat, len(batch), len(red))


def resolve_dimension_numbers(params: Any, spec: DimSpec, paths: list[_paths.KeyPath]) -> list[Any]:
  """Dimension numbers (or None = default rule) for the leaves at `paths`.

  Args:
    params: the (possibly masked) tree the paths come from.
    spec: None (default rule everywhere), one MuonDimensionNumbers for every
      matrix leaf, a tree (full or masked; None leaves = default rule), or a
      callable params -> such a tree.
    paths: key paths of the matrix leaves.

  Returns:
    A list aligned with `paths`.
  """
  if spec is None:
    return [None] * len(paths)
  if _is_dims(spec):
    return [spec] * len(paths)
  tree = spec(params) if callable(spec) else spec
  table = dict(_paths.leaves_with_paths(tree, is_leaf=lambda x: x is None or _is_dims(x)))
  out = []
  for path in paths:
    value = table.get(path)
    if value is not None and not _is_dims(value):
      raise ValueError(
        f'dimension numbers for {_paths.path_str(path)!r} must '
        f'be MuonDimensionNumbers or None, got {value!r}'
      )
    out.append(value)
  return out
