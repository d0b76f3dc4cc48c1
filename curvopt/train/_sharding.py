"""Device mesh and FSDP-style shardings for parameters, optimizer state and batches."""

from typing import Any, Optional

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

DATA_AXES = ('data', 'fsdp')  # a batch is split over both axes: FSDP is data parallel too


def make_mesh(*, data: int = -1, fsdp: int = 1, num_devices: Optional[int] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over the first `num_devices` devices (all by default).

  One of `data` / `fsdp` may be -1: it takes whatever the other leaves.
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f'mesh.num_devices={num_devices} but {len(devices)} devices are visible')
    devices = devices[:num_devices]
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError('at most one of mesh.data / mesh.fsdp may be -1')
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  elif fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} does not cover the {n} devices')
  return Mesh(np.asarray(devices).reshape(data, fsdp), ('data', 'fsdp'))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
  """Shards the largest dimension that `fsdp_size` divides; replicates the rest.

  The rule looks only at shapes, so it serves parameters and any optimizer state alike.
  """
  if fsdp_size == 1 or not shape:
    return PartitionSpec()
  candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return PartitionSpec()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return PartitionSpec(*spec)


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a tree of arrays or ShapeDtypeStructs."""
  size = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def put_global_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places a global batch that every process holds in full; each keeps only its own shards."""
  n = sharding.mesh.shape['data'] * sharding.mesh.shape['fsdp']
  if batch.shape[0] % n:
    raise ValueError(f'global batch size {batch.shape[0]} is not divisible by the {n} data shards')
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
