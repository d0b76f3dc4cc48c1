"""Explicit-sharding glue, so the decoder runs on ``jax.make_mesh`` meshes.

Under explicit mesh axes (the default of ``jax.make_mesh``) array types carry
their sharding and ambiguous ops are errors. The decoder uses parameters
FSDP-style (all-gathered just before use; the transpose reduce-scatters the
gradient) and keeps activations and the KV cache sharded like the tokens.
On a single device or auto axes all of this is a no-op.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _explicit_sharding(x: jax.Array) -> NamedSharding | None:
  """x's sharding when its type names mesh axes (explicit), else None."""
  sharding = jax.typeof(x).sharding
  if isinstance(sharding, NamedSharding) and any(entry is not None for entry in sharding.spec):
    return sharding
  return None


def gather_param(param: jax.Array) -> jax.Array:
  """All-gathers an explicitly sharded parameter (FSDP); else returns it."""
  sharding = _explicit_sharding(param)
  if sharding is None:
    return param
  return jax.sharding.reshard(param, NamedSharding(sharding.mesh, P()))


def like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """x resharded to ref's explicit sharding (e.g. a cache to the batch's)."""
  sharding = _explicit_sharding(ref)
  if sharding is None or jax.typeof(x).sharding.spec == sharding.spec:
    return x
  return jax.sharding.reshard(x, sharding)


def take_rows(table_VxD: jax.Array, ids_BxT: jax.Array) -> jax.Array:
  """table[ids] sharded like ids (NaN rows for ids out of range)."""
  sharding = _explicit_sharding(ids_BxT)
  if sharding is None:
    return jnp.take(table_VxD, ids_BxT, axis=0, mode='fill')
  out = NamedSharding(sharding.mesh, P(*sharding.spec, None))
  return table_VxD.at[ids_BxT].get(mode='fill', out_sharding=out)
