"""Layout changes for sharded matrices (explicit or auto mesh axes).

The optimizers read the mesh from the arrays' own types (`jax.typeof`), so
they need no mesh argument: unsharded arrays pass through untouched.
"""

from typing import Any

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

# How stacks of same-shape matrices are laid out for Newton-Schulz.
NS_SHARDINGS = ('batch', 'replicated', 'none')


def mesh_of(x: jax.Array) -> Any | None:
  """The (abstract) mesh `x` is laid out on, or None if it has no mesh."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  if not isinstance(sharding, NamedSharding):
    return None
  mesh = sharding.mesh
  if mesh.empty or mesh.size <= 1:
    return None
  return mesh


def spec_of(x: jax.Array) -> tuple[Any, ...]:
  """The partition spec of `x`, padded with None to its rank."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return spec + (None,) * (x.ndim - len(spec))


def relayout(x: jax.Array, spec: tuple[Any, ...], mesh: Any) -> jax.Array:
  """`x` laid out as `spec` on `mesh` (explicit axes: reshard; auto: hint)."""
  target = NamedSharding(mesh, PartitionSpec(*spec))
  if any(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, target)
  return jax.lax.with_sharding_constraint(x, target)


def is_sharded(spec: tuple[Any, ...]) -> bool:
  return any(s is not None for s in spec)
