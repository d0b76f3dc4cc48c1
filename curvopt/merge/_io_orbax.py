"""Orbax checkpoints: params and Adam second moments read leaf by leaf.

A trainer's checkpoint (curvopt.train's manager: a Composite whose `state`
item is a StandardSave of a TrainState) stores the optimizer state as nested
dicts and lists: an optax NamedTuple becomes a dict of its fields, a
`MaskedNode` / `EmptyState` becomes None. `scale_by_adam`'s state is the
dict with fields `count`, `mu` and `nu`, wherever the chain put it (chain,
masked, partition / multi_transform, inject_hyperparams, MultiSteps); its
`nu` mirrors the params tree, with None where a mask kept a parameter out
of Adam (e.g. D-Muon's hidden matrices).

Only the requested leaves are restored: the reader builds a restore target
from the checkpoint's metadata tree with `ocp.PLACEHOLDER` at every other
leaf, so neither the train state nor the optimizer state is ever held
whole. Note that AdaBelief's state has the same field names (its `nu` is
the variance of the gradient's prediction error); pass `adam_state=` to pick
a state when a chain holds several.
"""

import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from curvopt.merge import _sources

_ADAM_FIELDS = ('count', 'mu', 'nu')
_NO_MOMENT_HINT = (
  'a model trained without Adam (Muon, LANTON, SGD) keeps no '
  'second moment for these parameters; estimate one with '
  'curvopt.merge.estimate_fisher(loss_fn, params, batches)'
)


def _has_metadata(path: pathlib.Path) -> bool:
  return (path / '_METADATA').exists()


def pytree_directory(
  path: str, *, step: int | None = None, item: str | None = None
) -> pathlib.Path:
  """The pytree checkpoint directory that `path` points at.

  Args:
    path: a pytree checkpoint directory (holding `_METADATA`); a step
      directory of a CheckpointManager (its item `item`, else `state`, else
      `params`, else its only pytree item); a manager root (numbered step
      directories; `step` or the latest); or a trainer's workdir (holding
      `checkpoints/`).
    step: the step to read from a manager root; None: the latest.
    item: the Composite item to read from a step directory.

  Returns:
    The directory to restore from.

  Raises:
    ValueError: nothing resolvable at `path` (the message lists what is
      there).
  """
  root = pathlib.Path(os.fspath(path))
  if not root.exists():
    raise ValueError(f'no orbax checkpoint at {root}: it does not exist')
  if _has_metadata(root):
    return root
  if (root / 'checkpoints').is_dir() and not _has_metadata(root):
    return pytree_directory(root / 'checkpoints', step=step, item=item)
  children = sorted(p.name for p in root.iterdir() if p.is_dir())
  steps = sorted(int(c) for c in children if c.isdigit())
  items = [c for c in children if _has_metadata(root / c)]
  if items:
    for name in [item] if item else ['state', 'params']:
      if name in items:
        return root / name
    if item is None and len(items) == 1:
      return root / items[0]
    raise ValueError(f'{root} has no pytree item {item!r}; items: {items}')
  if steps:
    if step is None:
      step = steps[-1]
    if step not in steps:
      raise ValueError(f'{root} has no step {step}; steps: {steps}')
    return pytree_directory(root / str(step), item=item)
  raise ValueError(
    f'{root} is not an orbax checkpoint: no _METADATA, no '
    f'pytree items and no step directories; it holds '
    f'{children}'
  )


def _key_str(key: Any) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_metadata(tree: Any) -> dict[tuple[str, ...], Any]:
  pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_str(k) for k in path): leaf for path, leaf in pairs}


def _find_adam_states(node: Any, path: tuple[str, ...] = ()):
  """Key paths of the dicts that look like a ScaleByAdamState."""
  if isinstance(node, Mapping):
    if all(field in node for field in _ADAM_FIELDS):
      yield path
      return
    for key, child in node.items():
      yield from _find_adam_states(child, path + (str(key),))
  elif isinstance(node, (list, tuple)):
    for i, child in enumerate(node):
      yield from _find_adam_states(child, path + (str(i),))


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[int(key)] if isinstance(tree, (list, tuple)) else tree[key]
  return tree


class OrbaxReader(_sources.LeafReader):
  """Leaves of one pytree checkpoint, restored a few at a time.

  Use `orbax_params_reader` or `orbax_moments_reader`; `_stored` maps each
  leaf name to its key path in the checkpoint.
  """

  def __init__(
    self,
    directory: pathlib.Path,
    tree: Any,
    stored: Mapping[str, tuple[str, ...]],
    *,
    description: str,
  ):
    self.directory = directory
    self.description = description
    self._tree = tree
    self._stored = dict(stored)
    flat = _flat_metadata(tree)
    self._specs = {}
    for name, keys in self._stored.items():
      meta = flat[keys]
      self._specs[name] = jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(meta.dtype))
    self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

  def restore_paths(self, paths: list[tuple[str, ...]]) -> dict:
    """Restores the leaves at `paths` (key paths) as numpy arrays."""
    wanted = set(paths)

    def target(path, meta):
      keys = tuple(_key_str(k) for k in path)
      if keys in wanted:
        return jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(meta.dtype))
      return ocp.PLACEHOLDER

    item = jax.tree_util.tree_map_with_path(target, self._tree)
    args = jax.tree.map(
      lambda x: (
        ocp.RestoreArgs(restore_type=np.ndarray) if isinstance(x, jax.ShapeDtypeStruct) else x
      ),
      item,
    )
    restored = self._checkpointer.restore(
      self.directory, args=ocp.args.PyTreeRestore(item, restore_args=args)
    )
    return {keys: _subtree(restored, keys) for keys in paths}

  def _read(self, names):
    values = self.restore_paths([self._stored[n] for n in names])
    return {n: values[self._stored[n]] for n in names}

  def close(self) -> None:
    self._checkpointer.close()


def _params_prefix(tree: Any) -> tuple[str, ...]:
  # A TrainState has params beside opt_state; a merged model is the params.
  if isinstance(tree, Mapping) and 'params' in tree and len(tree) > 1:
    return ('params',)
  return ()


def _named(tree: Any, prefix: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
  flat = _flat_metadata(_subtree(tree, prefix))
  return {'/'.join(keys): prefix + keys for keys in flat}


def _metadata_tree(directory: pathlib.Path) -> Any:
  return ocp.StandardCheckpointHandler().metadata(directory).tree


def orbax_params_reader(
  path: str, *, step: int | None = None, item: str | None = None
) -> OrbaxReader:
  """The params of a train-state checkpoint, or a params-only checkpoint.

  Args:
    path: see `pytree_directory` (a trainer workdir, a manager root, a step
      directory, or a pytree directory such as `save_orbax` writes).
    step: the step of a manager root (None: the latest).
    item: the Composite item ('state' by default, then 'params').

  Returns:
    A reader whose leaf names are the params' key paths joined by '/'.
  """
  directory = pytree_directory(path, step=step, item=item)
  tree = _metadata_tree(directory)
  prefix = _params_prefix(tree)
  return OrbaxReader(
    directory, tree, _named(tree, prefix), description=f'orbax params at {directory}'
  )


class OrbaxMomentsReader(OrbaxReader):
  """The `nu` of a checkpoint's Adam state(s), named like the params.

  Attributes:
    states: key paths ('opt_state/1/inner_states/adam/inner_state/0') of
      the Adam states used.
    missing: params (by name) that no Adam state covers, e.g. the hidden
      matrices of a D-Muon or Muon run; a merge that needs their second
      moment fails naming them.
  """

  def __init__(self, directory, tree, stored, *, description, states, missing):
    super().__init__(directory, tree, stored, description=description)
    self.states = tuple('/'.join(s) for s in states)
    self._state_paths = tuple(states)
    self.missing = tuple(missing)

  def spec(self, name: str) -> jax.ShapeDtypeStruct:
    if name in self.missing:
      raise ValueError(
        f'the optimizer state at {self.directory} has no Adam second '
        f'moment for the parameter {name!r} (it was masked out of Adam; '
        f'{len(self.missing)} such parameters: {list(self.missing)[:8]}); ' + _NO_MOMENT_HINT
      )
    return super().spec(name)

  def counts(self) -> dict[str, int]:
    """Each Adam state's step count (for `ota(..., bias_correction=)`)."""
    paths = [s + ('count',) for s in self._state_paths]
    values = self.restore_paths(paths)
    return {'/'.join(s): int(np.asarray(values[p])) for s, p in zip(self._state_paths, paths)}


def orbax_moments_reader(
  path: str,
  *,
  step: int | None = None,
  item: str | None = None,
  adam_state: int | str | None = None,
) -> OrbaxMomentsReader:
  """Adam second moments (`nu`) out of a train-state checkpoint.

  Finds every `scale_by_adam` state in the stored optimizer state, whatever
  chain produced it, and maps each `nu` leaf to its parameter's name.

  Args:
    path: see `pytree_directory`.
    step: the step of a manager root (None: the latest).
    item: the Composite item ('state' by default).
    adam_state: which Adam state to use when several cover the same
      parameter: its index among the states found (in tree order) or its
      key path joined by '/'. None: all states, which must not overlap.

  Returns:
    A reader of `nu` keyed by parameter names; `.missing` lists the params
    no Adam state covers.

  Raises:
    ValueError: no Adam state in the checkpoint (pointing to
      `estimate_fisher`), overlapping states, or an unknown `adam_state`.
  """
  directory = pytree_directory(path, step=step, item=item)
  tree = _metadata_tree(directory)
  prefix = _params_prefix(tree)
  search = ('opt_state',) if prefix and 'opt_state' in tree else ()
  states = list(_find_adam_states(_subtree(tree, search), search))
  if not states:
    raise ValueError(
      f'the checkpoint at {directory} holds no Adam second moment: no '
      'optimizer-state entry with the fields count, mu and nu '
      '(optax.ScaleByAdamState) was found; ' + _NO_MOMENT_HINT
    )
  if adam_state is not None:
    labels = ['/'.join(s) for s in states]
    if isinstance(adam_state, int) and 0 <= adam_state < len(states):
      states = [states[adam_state]]
    elif isinstance(adam_state, str) and adam_state in labels:
      states = [states[labels.index(adam_state)]]
    else:
      raise ValueError(
        f'unknown adam_state {adam_state!r}; the checkpoint has {len(states)} Adam states: {labels}'
      )
  stored: dict[str, tuple[str, ...]] = {}
  owner: dict[str, str] = {}
  for state in states:
    for name, keys in _named(tree, state + ('nu',)).items():
      if name in stored:
        raise ValueError(
          f'the parameter {name!r} has a second moment in two Adam states, '
          f'{owner[name]!r} and {"/".join(state)!r}; pick one with '
          'adam_state='
        )
      owner[name] = '/'.join(state)
      stored[name] = keys
  params = list(_named(tree, prefix)) if prefix else list(stored)
  extra = sorted(set(stored) - set(params))
  if extra:
    raise ValueError(
      f'Adam nu leaves {extra[:5]} match no parameter of the checkpoint at {directory}'
    )
  stored = {name: stored[name] for name in params if name in stored}
  missing = [name for name in params if name not in stored]
  return OrbaxMomentsReader(
    directory,
    tree,
    stored,
    description=f'orbax Adam nu at {directory}',
    states=states,
    missing=missing,
  )


def save_orbax(path: str, tree: Any) -> None:
  """Writes a pytree (or a {'a/b': array} dict) as a StandardSave checkpoint.

  `path` must not exist; orbax writes to a temporary directory and renames
  it, so a crash leaves no complete-looking checkpoint.
  """
  if isinstance(tree, Mapping) and any('/' in str(k) for k in tree):
    tree = _sources.unflatten_names(tree)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(pathlib.Path(os.fspath(path)).absolute(), tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


class OrbaxWriter:
  """Collects named output tensors on the host and saves them on `close`.

  Orbax writes a checkpoint in one go, so this writer holds the merged model
  (in its output dtypes) in host memory; a bounded-memory merge writes
  safetensors (`SafetensorsWriter`) instead.
  """

  def __init__(self, path: str, specs: Mapping[str, Any] | None = None):
    self.path = os.fspath(path)
    self._specs = dict(specs) if specs is not None else None
    self._values: dict[str, np.ndarray] = {}

  def write(self, name: str, value: Any) -> None:
    if self._specs is not None and name not in self._specs:
      raise ValueError(f"tensor {name!r} is not among the writer's planned tensors")
    self._values[name] = np.asarray(jax.device_get(value))

  def close(self) -> None:
    if self._specs is not None:
      missing = [n for n in self._specs if n not in self._values]
      if missing:
        raise ValueError(f'{len(missing)} planned tensors were never written, e.g. {missing[:5]}')
    save_orbax(self.path, _sources.unflatten_names(self._values))
    self._values = {}

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
