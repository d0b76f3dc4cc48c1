"""Key-path helpers shared by the grouping, reshaping and optimizer modules."""

from typing import Any, Callable

import jax

KeyPath = tuple[Any, ...]


def path_str(path: KeyPath) -> str:
  """'layers_0/attn/q/kernel' for a jax key path."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def path_names(path: KeyPath) -> tuple[str, ...]:
  """The components of a key path as strings ('layers_0', 'attn', ...)."""
  return tuple(path_str((key,)) for key in path)


def leaves_with_paths(
  tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[KeyPath, Any]]:
  """Flattens `tree` into (key path, leaf) pairs.

  Empty nodes (e.g. optax's `MaskedNode`) have no leaves and so no entry: a
  masked sub-tree keeps the key paths of the full tree.
  """
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]


def lookup_by_path(
  tree: Any, paths: list[KeyPath], *, what: str, is_leaf: Callable[[Any], bool] | None = None
) -> list[Any]:
  """Values of `tree` at `paths`, for a tree that may be a masked one.

  Args:
    tree: a pytree whose key paths include `paths` (it may have more leaves,
      e.g. the full parameter tree while `paths` come from a masked one).
    paths: key paths to look up.
    what: name of the tree, for the error message.
    is_leaf: passed to the flattening.

  Returns:
    The leaves of `tree` at `paths`, in order.

  Raises:
    ValueError: a path has no leaf in `tree`; the message names the path.
  """
  table = dict(leaves_with_paths(tree, is_leaf=is_leaf))
  out = []
  for path in paths:
    if path not in table:
      raise ValueError(
        f'{what} has no entry for the leaf {path_str(path)!r}; '
        f'its leaves are {sorted(path_str(p) for p in table)}'
      )
    out.append(table[path])
  return out
