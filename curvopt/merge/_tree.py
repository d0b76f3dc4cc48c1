"""Pytree plumbing shared by the merge operators: aligned leaves, checks.

Every operator flattens its trees once, checks that they line up leaf by
leaf, and calls a per-leaf core. Errors name the leaf by its key path
('layers_0/attn/q/kernel'), so a mismatch in a model of thousands of tensors
points at the tensor.
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _rank1
from curvopt.merge._paths import is_tracer
from curvopt.merge._paths import path_str


@dataclasses.dataclass(frozen=True)
class Flat:
  """A flattened tree: leaf names in flattening order, leaves, and treedef."""

  names: tuple[str, ...]
  leaves: tuple[Any, ...]
  treedef: Any

  def unflatten(self, leaves: Sequence[Any]) -> Any:
    return self.treedef.unflatten(list(leaves))


def flatten(tree: Any, *, what: str, moments: bool = False) -> Flat:
  """Flattens `tree`; `moments=True` keeps `Rank1` factors as single leaves."""
  is_leaf = _rank1.is_rank1 if moments else None
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  names = tuple(path_str(p) for p, _ in pairs)
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f'{what} has several leaves named {dup}; leaf names must be unique')
  return Flat(names, tuple(leaf for _, leaf in pairs), treedef)


def align(
  reference: Flat, tree: Any, *, what: str, missing: str = 'leaf', moments: bool = False
) -> tuple[Any, ...]:
  """Leaves of `tree` in the order of `reference`'s leaf names.

  Trees are matched by key path, not by treedef, so a dict and a FrozenDict
  (or a list and a tuple) with the same paths line up.

  Args:
    reference: the flattened tree that fixes names and order.
    tree: a tree that must have exactly the same leaf names.
    what: name of `tree` for error messages ('expert 2').
    missing: what a missing leaf is called ('second moment').
    moments: keep `Rank1` factors as leaves.

  Returns:
    The leaves of `tree`, ordered as `reference.names`.

  Raises:
    ValueError: naming the first leaf that `tree` lacks or has in excess.
  """
  flat = flatten(tree, what=what, moments=moments)
  table = dict(zip(flat.names, flat.leaves))
  for name in reference.names:
    if name not in table:
      raise ValueError(
        f'{what} has no {missing} for the leaf {name!r} '
        f'(tree structures differ); it has {len(table)} leaves, '
        f'the reference {len(reference.names)}'
      )
  extra = sorted(set(table) - set(reference.names))
  if extra:
    raise ValueError(
      f'{what} has a leaf {extra[0]!r} that the reference tree '
      f'lacks (tree structures differ); extra leaves: {extra}'
    )
  return tuple(table[name] for name in reference.names)


def check_count(experts: Sequence[Any], *, what: str = 'experts') -> None:
  if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence):
    raise TypeError(
      f'{what} must be a sequence (list or tuple) of pytrees, got {type(experts).__name__}'
    )
  if len(experts) < 1:
    raise ValueError(f'at least one expert is needed, got {len(experts)} {what}')


def check_floating(leaf: Any, *, name: str, what: str) -> None:
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f'{what} at leaf {name!r} must be a floating array, got '
      f'{type(leaf).__name__} of dtype {dtype}'
    )


def check_like(reference: Any, leaf: Any, *, name: str, what: str, reference_what: str) -> None:
  """`leaf` must have the shape and dtype of `reference`."""
  check_floating(leaf, name=name, what=what)
  if tuple(leaf.shape) != tuple(reference.shape):
    raise ValueError(
      f'{what} at leaf {name!r} has shape {tuple(leaf.shape)}, '
      f'{reference_what} has {tuple(reference.shape)}'
    )
  if jnp.dtype(leaf.dtype) != jnp.dtype(reference.dtype):
    raise ValueError(
      f'{what} at leaf {name!r} has dtype {leaf.dtype}, {reference_what} has {reference.dtype}'
    )


def check_moment(moment: Any, shape: tuple[int, ...], *, name: str, what: str) -> None:
  """`moment` is a floating array of `shape` or `Rank1` factors of it."""
  if moment is None:
    raise ValueError(f'{what} is missing for the leaf {name!r}')
  if _rank1.is_rank1(moment):
    _rank1.check_factors(moment, shape, name=name, what=what)
    return
  check_floating(moment, name=name, what=what)
  if tuple(moment.shape) != tuple(shape):
    raise ValueError(
      f'{what} at leaf {name!r} has shape {tuple(moment.shape)}, the weight has {tuple(shape)}'
    )


def check_mask(mask: Any, shape: tuple[int, ...], *, name: str, what: str) -> None:
  if mask is None or not hasattr(mask, 'shape'):
    raise ValueError(f'{what} is missing for the leaf {name!r}')
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(
      f'{what} at leaf {name!r} has shape {tuple(mask.shape)}, the weight has {tuple(shape)}'
    )


class ValueChecks:
  """Collects device-side "values are valid" flags; raises once at the end.

  Kernels compute a flag in the same pass that reads a tensor, so checking
  moments costs no extra read; deferring the host sync to the end keeps the
  dispatch of later leaves asynchronous.
  """

  def __init__(self):
    self._pending: list[tuple[Any, Callable[[int], str], Any]] = []

  def add(
    self, ok: Any, message: Callable[[int], str], recheck: Callable[[], Any] | None = None
  ) -> None:
    """`ok`: bool array; `message(i)`: the error for its i-th False entry.

    `recheck`: where `ok` is only a screen (False may be a false alarm), a
    callable returning the exact flags, called only when the screen fails.
    """
    if not is_tracer(ok):
      self._pending.append((ok, message, recheck))

  def raise_if_failed(self) -> None:
    pending, self._pending = self._pending, []
    for ok, message, recheck in pending:
      flags = np.atleast_1d(np.asarray(jax.device_get(ok)))
      if recheck is not None and not flags.all():
        flags = np.atleast_1d(np.asarray(jax.device_get(recheck())))
      bad = np.flatnonzero(~flags)
      if bad.size:
        raise ValueError(message(int(bad[0])))


def moment_ok(moment: Any):
  """Device flag: every stored entry (or factor) is finite and >= 0.

  The same test as `_rank1.moment_is_valid`, by a min and a max: float
  reductions vectorize where a reduction over bools does not (5x on the
  CPU), and both propagate NaN.
  """
  ok = jnp.asarray(True)
  for part in moment if _rank1.is_rank1(moment) else (moment,):
    part = jnp.asarray(part)
    if part.size:
      ok &= (jnp.min(part) >= 0) & (jnp.max(part) < jnp.inf)
  return ok


@jax.jit
def moments_ok(moments: Sequence[Any]):
  """[T] device flags: `moment_ok` of each expert's moment of one tensor."""
  return jnp.stack([moment_ok(m) for m in moments])


@jax.jit
def finite_screen(out: Any, ok: Any):
  """`ok` and "every entry of `out` is finite", by one float sum.

  A separate call on purpose: on XLA CPU a reduction inside the merge's
  fused pass made it ~1.7x slower, while this pass over the (narrower)
  output costs ~15% of it.
  """
  return ok & jnp.isfinite(jnp.sum(out.astype(jnp.float32) * 0))


def moment_message(name: str, what: str) -> Callable[[int], str]:
  """Error text for a second moment with negative or non-finite entries:
  message(t) for expert t."""
  return lambda t: expert_moment_message(name, what, t)(t)


def expert_moment_message(name: str, what: str, expert: int | None) -> Callable[[int], str]:
  """`moment_message` for one known expert (None: a lone expert, unnamed)."""
  whose = '' if expert is None else f' of expert {expert}'
  return lambda _: (
    f'{what}{whose} at leaf {name!r} has negative or non-finite entries; second moments must be '
    'finite and >= 0'
  )


def check_leaf_group(base: Any, experts: Sequence[Any], *, name: str) -> Any:
  """Checks one leaf's base and expert arrays; returns the reference array."""
  check_count(experts)
  if base is not None:
    check_floating(base, name=name, what='base')
    reference, reference_what = base, 'the base'
  else:
    check_floating(experts[0], name=name, what='expert 0')
    reference, reference_what = experts[0], 'expert 0'
  for t, expert in enumerate(experts):
    check_like(reference, expert, name=name, what=f'expert {t}', reference_what=reference_what)
  return reference


def check_moment_group(
  moments: Sequence[Any], num: int, shape: tuple[int, ...], *, name: str, what: str
) -> None:
  if isinstance(moments, (str, bytes)) or not isinstance(moments, Sequence):
    raise TypeError(
      f'{what} must be a sequence with one entry per expert, got {type(moments).__name__}'
    )
  if len(moments) != num:
    raise ValueError(f'{what} has {len(moments)} entries for {num} experts')
  for t, moment in enumerate(moments):
    check_moment(moment, shape, name=name, what=f'{what} of expert {t}')


@dataclasses.dataclass(frozen=True)
class Gathered:
  """Trees lined up by leaf: `experts[i][t]` is expert t's i-th leaf."""

  reference: Flat
  base: tuple[Any, ...] | None
  experts: tuple[tuple[Any, ...], ...]
  num_experts: int

  @property
  def names(self) -> tuple[str, ...]:
    return self.reference.names


def gather(base: Any, experts: Sequence[Any]) -> Gathered:
  """Flattens and checks a base (or None) and a list of expert trees.

  Raises:
    ValueError: fewer than one expert, or a leaf whose path, shape or dtype
      differs between the trees (the message names the leaf).
    TypeError: a non-floating leaf.
  """
  check_count(experts)
  if base is not None:
    reference = flatten(base, what='base')
    reference_what = 'the base'
  else:
    reference = flatten(experts[0], what='expert 0')
    reference_what = 'expert 0'
  for name, ref_leaf in zip(reference.names, reference.leaves):
    check_floating(ref_leaf, name=name, what='base' if base is not None else 'expert 0')
  per_expert = []
  for t, expert in enumerate(experts):
    what = f'expert {t}'
    leaves = align(reference, expert, what=what)
    for name, ref_leaf, leaf in zip(reference.names, reference.leaves, leaves):
      check_like(ref_leaf, leaf, name=name, what=what, reference_what=reference_what)
    per_expert.append(leaves)
  by_leaf = tuple(zip(*per_expert)) if reference.names else ()
  return Gathered(reference, reference.leaves if base is not None else None, by_leaf, len(experts))


def gather_moments(
  gathered: Gathered, moments: Sequence[Any], *, what: str
) -> tuple[tuple[Any, ...], ...]:
  """Second-moment trees (arrays or `Rank1` leaves) lined up by leaf.

  Raises:
    ValueError: a count that differs from the experts', a missing moment, or
      a shape that does not fit the weight (the message names the leaf).
  """
  num = gathered.num_experts
  if isinstance(moments, (str, bytes)) or not isinstance(moments, Sequence):
    raise TypeError(
      f'{what} must be a sequence with one tree per expert, got {type(moments).__name__}'
    )
  if len(moments) != num:
    raise ValueError(f'{what} has {len(moments)} trees for {num} experts')
  per_expert = []
  for t, tree in enumerate(moments):
    if tree is None:
      raise ValueError(f'{what} of expert {t} is missing (None)')
    leaves = align(
      gathered.reference, tree, what=f'{what} of expert {t}', missing='second moment', moments=True
    )
    for name, weight, moment in zip(gathered.names, gathered.reference.leaves, leaves):
      check_moment(moment, tuple(weight.shape), name=name, what=f'{what} of expert {t}')
    per_expert.append(leaves)
  return tuple(zip(*per_expert)) if gathered.names else ()
