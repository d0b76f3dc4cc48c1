"""Parameter groups: which leaves are hidden matrices, embed/head or vectors."""

from typing import Any, Callable, Mapping, Sequence, Union

import jax

from curvopt.optim import _paths

HIDDEN = 'hidden'
EMBED_HEAD = 'embed_head'
VECTOR = 'vector'
GROUPS = (HIDDEN, EMBED_HEAD, VECTOR)

# Key-path components that mark a token embedding or an output head. Flax's
# `nn.Embed` calls its table 'embedding'; HF-style trees use 'lm_head' / 'wte'.
DEFAULT_EMBED_HEAD_NAMES = ('embed', 'head', 'embedding', 'lm_head', 'wte')

LabelSpec = Union[None, Any, Callable[[Any], Any]]


def param_groups(
  params: Any,
  *,
  embed_head_names: Sequence[str] = DEFAULT_EMBED_HEAD_NAMES,
) -> Any:
  """Labels every leaf of `params` 'hidden', 'embed_head' or 'vector'.

  The rule, from key paths and shapes only:
  - a path with a component equal to one of `embed_head_names` (e.g.
    'embed/embedding', 'head/kernel') -> 'embed_head';
  - otherwise rank >= 2 (matrices, and n-D weights that are reshaped to
    matrices) -> 'hidden';
  - otherwise (1-D scales and biases, scalars) -> 'vector'.

  Args:
    params: a pytree of arrays (or anything with `.ndim` / `.shape`).
    embed_head_names: path components that mark an embedding or a head.

  Returns:
    A pytree of strings with the structure of `params`.
  """
  names = frozenset(embed_head_names)

  def label(path, leaf):
    if names.intersection(_paths.path_names(path)):
      return EMBED_HEAD
    return HIDDEN if len(leaf.shape) >= 2 else VECTOR

  return jax.tree_util.tree_map_with_path(label, params)


def resolve_labels(
  params: Any,
  param_labels: LabelSpec,
  *,
  valid: Sequence[str] = GROUPS,
) -> list[tuple[_paths.KeyPath, str]]:
  """(key path, label) for every leaf of `params`, checked against `valid`.

  Args:
    params: the (possibly masked) tree of parameters or updates.
    param_labels: None (use `param_groups`), a callable params -> label tree,
      or a label tree whose key paths cover those of `params` (it may be the
      full tree while `params` is a masked sub-tree).
    valid: the accepted labels.

  Returns:
    A list of (key path, label), in the leaf order of `params`.

  Raises:
    ValueError: a leaf has no label or an unknown one; the message names the
      leaf path and the label.
  """
  if param_labels is None:
    labels = param_groups(params)
  elif callable(param_labels):
    labels = param_labels(params)
  else:
    labels = param_labels
  paths = [p for p, _ in _paths.leaves_with_paths(params)]
  values = _paths.lookup_by_path(labels, paths, what='the label tree')
  for path, value in zip(paths, values):
    if not isinstance(value, str) or value not in valid:
      raise ValueError(
        f'unknown parameter group label {value!r} for the leaf '
        f'{_paths.path_str(path)!r}; valid labels are {sorted(valid)}'
      )
  return list(zip(paths, values))


def label_tree(
  params: Any,
  param_labels: LabelSpec,
  *,
  valid: Sequence[str] = GROUPS,
  rename: Mapping[str, str] | None = None,
) -> Any:
  """A checked label tree with the structure of `params` (labels renamed)."""
  resolved = resolve_labels(params, param_labels, valid=valid)
  rename = rename or {}
  flat = [rename.get(label, label) for _, label in resolved]
  return jax.tree.unflatten(jax.tree.structure(params), flat)
