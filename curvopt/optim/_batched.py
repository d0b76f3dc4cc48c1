"""One Newton-Schulz (or SVD) call per matrix shape, for many matrices.

GPT-2-small's 72 hidden matrices come in two shapes once oriented short side
first ([768, 768] and [768, 3072]); stacking them gives two large batched
matmul chains instead of 72 small ones, and on a mesh one layout change per
stack instead of collectives inside every Newton-Schulz step.
"""

import collections
from typing import Sequence

import jax
import jax.numpy as jnp

from curvopt.optim import _newton_schulz
from curvopt.optim import _sharding


def svd_polar(x: jax.Array) -> jax.Array:
  """The exact polar factor U V^T of each matrix in x [..., m, n] (slow).

  Matrices with non-finite entries give NaN (LAPACK's SVD may not return on
  them, so they are zeroed before it).
  """
  x32 = x.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(x32), axis=(-2, -1), keepdims=True)
  u, _, vh = jnp.linalg.svd(jnp.where(finite, x32, 0.0), full_matrices=False)
  return jnp.where(finite, u @ vh, jnp.nan).astype(x.dtype)


def orthogonalize_many(
  matrices: Sequence[jax.Array],
  *,
  newton_schulz: _newton_schulz.NewtonSchulz = _newton_schulz.NewtonSchulz(),
) -> list[jax.Array]:
  """Polar factors of many [batch, m, n] stacks, one call per oriented shape.

  Args:
    matrices: arrays [b_i, m_i, n_i].
    newton_schulz: how the polar factors are computed. Its `sharding` is the
      layout of each stack on a mesh (ignored without one): 'batch' splits
      the stack's matrices over all devices (padded to a multiple of the mesh
      size) so each device orthogonalizes its share; 'replicated' gathers
      every matrix once and orthogonalizes the whole stack on every device;
      'none' leaves the layout to XLA (auto axes) and gathers the matrix axes
      if they are explicitly sharded.

  Returns:
    The polar factors, aligned with `matrices`, each like its input.
  """
  return _per_shape(matrices, newton_schulz, nuclear=False)


def nuclear_norms_many(
  matrices: Sequence[jax.Array],
  *,
  newton_schulz: _newton_schulz.NewtonSchulz = _newton_schulz.NewtonSchulz(),
) -> list[jax.Array]:
  """<X, polar(X)> per [batch, m, n] stack: its nuclear norm, summed over batch.

  Same arguments and batching as `orthogonalize_many`, but each shape's stack
  is reduced to one fp32 value per matrix where it was orthogonalized (on
  'batch', before any gather): the polar factors are never split out or
  moved, only [batch] sums are.

  Args:
    matrices: arrays [b_i, m_i, n_i].
    newton_schulz: how the polar factors are computed and laid out.

  Returns:
    fp32 scalars, aligned with `matrices`.
  """
  return _per_shape(matrices, newton_schulz, nuclear=True)


def _per_shape(matrices, ns, *, nuclear):
  _newton_schulz.check_options(ns)
  schedule = _newton_schulz.coeff_schedule(ns.coeffs, ns.steps)
  ns_dtype = _newton_schulz.resolve_ns_dtype(ns.dtype)

  oriented = []
  groups = collections.defaultdict(list)
  for i, x in enumerate(matrices):
    if x.ndim != 3:
      raise ValueError(f'expected [batch, m, n] stacks, got shape {x.shape}')
    flip = x.shape[1] > x.shape[2]
    y = jnp.swapaxes(x, 1, 2) if flip else x
    spec = _sharding.spec_of(y)
    oriented.append((y, flip, spec))
    groups[(y.shape[1:], y.dtype, spec)].append(i)

  def run(x):
    if ns.polar == 'svd':
      y = svd_polar(x)
    else:
      y = _newton_schulz.iterate(x, schedule, ns_dtype, ns.eps)
    if nuclear:
      return _inner_products(x, y)
    return y.astype(x.dtype)

  out: list[jax.Array | None] = [None] * len(matrices)
  for (_, _, spec), members in groups.items():
    stacks = [oriented[i][0] for i in members]
    results = _run_per_stack(stacks, spec, run, ns.sharding, reduced=nuclear)
    for i, r in zip(members, results):
      if nuclear:
        out[i] = jnp.sum(r)
      else:
        out[i] = jnp.swapaxes(r, 1, 2) if oriented[i][1] else r
  return out


def _inner_products(x: jax.Array, y: jax.Array) -> jax.Array:
  """sum(x * y) over each matrix of [B, m, n] stacks, in fp32: [B]."""
  # Summed as two column halves: with a reduction as the only consumer, XLA
  # CPU's YNNPACK fusion pulls the whole Newton-Schulz chain into the
  # reduction's fusion and runs its matmuls ~5x slower (GPT-2-small shapes:
  # the update took 67 s instead of 23 s); a static slice in between stops it.
  half = max(x.shape[-1] // 2, 1)
  return sum(
    jnp.sum(x[..., cols].astype(jnp.float32) * y[..., cols].astype(jnp.float32), axis=(-2, -1))
    for cols in (slice(None, half), slice(half, None))
  )


def _run_per_stack(stacks, spec, run, ns_sharding, *, reduced):
  """`run` on same-shape, same-layout stacks in one call.

  `run` maps [B, m, n] to [B, m, n] or, when `reduced`, to [B] values, which
  then keep only the batch axis's layout.
  """
  mesh = _sharding.mesh_of(stacks[0])
  sizes = [s.shape[0] for s in stacks]
  out_spec = spec[:1] if reduced else spec

  def concat(parts):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

  if mesh is None or ns_sharding == 'none':
    x = concat(stacks)
    if mesh is not None and _sharding.is_sharded(spec[1:]):
      x = _sharding.relayout(x, (spec[0], None, None), mesh)
      y = _sharding.relayout(run(x), out_spec, mesh)
    else:
      y = run(x)
    return _split(y, sizes)

  if ns_sharding == 'replicated':
    x = concat([_sharding.relayout(s, (None, None, None), mesh) for s in stacks])
    return [_sharding.relayout(part, out_spec, mesh) for part in _split(run(x), sizes)]

  # 'batch': every device orthogonalizes total / mesh.size matrices.
  x = concat(stacks)
  total = x.shape[0]
  padded = -(-total // mesh.size) * mesh.size
  if padded != total:
    x = jnp.concatenate([x, jnp.zeros((padded - total,) + x.shape[1:], x.dtype)], axis=0)
  x = _sharding.relayout(x, (tuple(mesh.axis_names), None, None), mesh)
  y = run(x)
  # One all-gather of the results; re-slicing them to `spec` is local.
  y = _sharding.relayout(y, (None,) * y.ndim, mesh)[:total]
  return [_sharding.relayout(part, out_spec, mesh) for part in _split(y, sizes)]


def _split(y: jax.Array, sizes: list[int]) -> list[jax.Array]:
  if len(sizes) == 1:
    return [y]
  bounds = []
  acc = 0
  for s in sizes[:-1]:
    acc += s
    bounds.append(acc)
  return jnp.split(y, bounds, axis=0)
