"""Lazy tensor sources: named leaves read a few at a time.

A streaming merge never holds a whole model; it asks each input for the
specs (shape, dtype) of every leaf up front and for the values of a few
leaves at a time. Readers for safetensors files (`_io_safetensors`), orbax
checkpoints (`_io_orbax`) and in-memory pytrees (`TreeReader`) share this
interface. Leaf names are jax key paths joined by '/' for pytrees and orbax
('layers_0/attn/q/kernel'), tensor names for safetensors
('model.layers.0.self_attn.q_proj.weight').
"""

import abc
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from curvopt.merge import _rank1
from curvopt.merge import _tree


class LeafReader(abc.ABC):
  """Named tensors, read lazily. Subclasses fill `_specs` (name -> spec)."""

  _specs: dict[str, jax.ShapeDtypeStruct]
  description: str = 'reader'

  @property
  def names(self) -> tuple[str, ...]:
    """Leaf names in storage order."""
    return tuple(self._specs)

  def __contains__(self, name: str) -> bool:
    return name in self._specs

  def spec(self, name: str) -> jax.ShapeDtypeStruct:
    """Shape and dtype of `name` without reading it."""
    if name not in self._specs:
      raise ValueError(
        f'{self.description} has no tensor {name!r}; it has '
        f'{len(self._specs)} tensors, e.g. '
        f'{list(self._specs)[:5]}'
      )
    return self._specs[name]

  def nbytes(self, name: str) -> int:
    spec = self.spec(name)
    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize

  def read(self, names: Sequence[str]) -> dict[str, Any]:
    """Host (numpy) arrays of `names`, or `Rank1` factors where stored so."""
    for name in names:
      self.spec(name)
    return self._read(list(names))

  @abc.abstractmethod
  def _read(self, names: list[str]) -> dict[str, Any]: ...

  def read_tree(self, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Every (or the named) leaf as a nested dict split on '/'.

    Holds the whole model: for small models and tests; a streaming merge
    reads a few leaves at a time instead.
    """
    return unflatten_names(self.read(list(self.names if names is None else names)))

  def close(self) -> None:  # noqa: B027 (a no-op for readers that hold no open files)
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class TreeReader(LeafReader):
  """An in-memory pytree (e.g. an `estimate_fisher` result) as a reader.

  Leaves keep their type: jax arrays stay where they are, `Rank1` factors
  stay factors.
  """

  def __init__(self, tree: Any, *, description: str = 'tree'):
    flat = _tree.flatten(tree, what=description, moments=True)
    self.description = description
    self._leaves = dict(zip(flat.names, flat.leaves))
    self._specs = {}
    for name, leaf in self._leaves.items():
      if _rank1.is_rank1(leaf):
        shape = (np.shape(leaf.row_sums)[0], np.shape(leaf.col_sums)[0])
        self._specs[name] = jax.ShapeDtypeStruct(shape, np.float32)
      else:
        dtype = getattr(leaf, 'dtype', None) or np.asarray(leaf).dtype
        self._specs[name] = jax.ShapeDtypeStruct(np.shape(leaf), dtype)

  def _read(self, names):
    return {name: self._leaves[name] for name in names}


def unflatten_names(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x, 'a/c': y} -> {'a': {'b': x, 'c': y}}."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = out
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f'leaf name {name!r} nests under another leaf')
    if leaf in node:
      raise ValueError(f'leaf name {name!r} clashes with a subtree')
    node[leaf] = value
  return out
