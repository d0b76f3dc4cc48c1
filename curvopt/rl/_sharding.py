"""Sharding helpers: the mesh is read from the arrays' own types.

The CAPO computations gather rows of the head per token and run top_k along
the vocabulary; under explicit mesh axes every such op would need a hand-
written output sharding. They run instead with the mesh axes switched to auto
(`jax.sharding.auto_axes`), where XLA's propagation places them, and give
their results back with the caller's explicit shardings. Arrays without a
mesh pass through untouched.
"""

from typing import Any, Callable, Optional

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec


def mesh_of(x: Any) -> Optional[Any]:
  """The mesh `x` is laid out on, or None if it has none."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
    return None
  return sharding.mesh


def spec_of(x: jax.Array) -> tuple[Any, ...]:
  """The partition spec of `x`, padded with None to its rank."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return spec + (None,) * (x.ndim - len(spec))


def explicit_mesh(*arrays: Any) -> Optional[Any]:
  """The first mesh with explicit axes among the arrays' meshes, or None."""
  for x in jax.tree.leaves(arrays):
    mesh = mesh_of(x)
    if mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types):
      return mesh
  return None


def call_with_auto_axes(
  fn: Callable[..., Any], args: tuple[Any, ...], out_specs: Callable[[], Any]
) -> Any:
  """fn(*args), with explicit mesh axes made auto inside `fn`.

  Args:
    fn: the computation.
    args: its arguments (pytrees of arrays).
    out_specs: builds a pytree of PartitionSpecs, one per output leaf, for
      the explicit case (called only then).

  Returns:
    fn's outputs, laid out as `out_specs` on the arguments' explicit mesh.
  """
  mesh = explicit_mesh(*args)
  if mesh is None:
    return fn(*args)
  out_sharding = jax.tree.map(
    lambda s: NamedSharding(mesh, s), out_specs(), is_leaf=lambda s: isinstance(s, PartitionSpec)
  )
  return jax.sharding.auto_axes(fn, out_sharding=out_sharding)(*args)


def varying_axes(*arrays: Any) -> tuple[str, ...]:
  """Manual mesh axes (inside shard_map) along which any of the arrays vary."""
  axes = set()
  for x in jax.tree.leaves(arrays):
    aval = jax.typeof(x)
    manual = getattr(aval, 'manual_axis_type', None)
    axes |= set(getattr(manual, 'varying', None) or getattr(aval, 'vma', ()))
  return tuple(sorted(axes))


def like_varying(x: jax.Array, *arrays: Any) -> jax.Array:
  """`x` marked as varying along the manual axes the arrays vary along.

  A scan carry started from constants inside shard_map must vary like the
  values the loop adds to it.
  """
  axes = varying_axes(*arrays)
  return jax.lax.pcast(x, axes, to='varying') if axes else x
