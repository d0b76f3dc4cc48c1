"""The per-leaf noise estimate shared by LANTON and `noise_adaptive`.

Per leaf l (of a group with a dual norm) and step t:
  D_t = G_t - G~_t                                      (noise sample)
  H_t = b2 H_{t-1} + (1 - b2) dual_norm_l(D_t)^2        (noise estimate)
  s_t = mapping({H^_t^j : j in g})_l                    (group reduction)
with H^ the bias-corrected estimate. The spectral dual norm (sqrt(d_out/d_in)
times the nuclear norm <D, NS(D)>) is computed per shape stack, optionally on
a round-robin share of the spectral leaves per step.
"""

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.optim import _batched
from curvopt.optim import _groups
from curvopt.optim import _lmo
from curvopt.optim import _mapping
from curvopt.optim import _matrix
from curvopt.optim import _newton_schulz
from curvopt.optim import _paths

# Scale-free variant: the mapping sees H^ / (dual_norm(momentum)^2 + RELATIVE_EPS).
RELATIVE_EPS = 1e-12


class Leaf(NamedTuple):
  path: tuple[Any, ...]
  group: str
  lmo: _lmo.LMO
  view: _matrix.MatrixView | None  # matrix LMOs only


def plan(tree, labeled, lmos, weight_dimension_numbers) -> list[Leaf]:
  """A `Leaf` per (path, group) of `labeled` (leaves of `tree` in order) with an LMO."""
  leaves = dict(_paths.leaves_with_paths(tree))
  matrix_paths = [p for (p, g) in labeled if lmos[g].matrix]
  dims = dict(
    zip(
      matrix_paths,
      _matrix.resolve_dimension_numbers(tree, weight_dimension_numbers, matrix_paths),
    )
  )
  out = []
  for path, group in labeled:
    lmo = lmos[group]
    view = None
    if lmo.matrix:
      view = _matrix.matrix_view(leaves[path].shape, dims[path], path=_paths.path_str(path))
    out.append(Leaf(path, group, lmo, view))
  return out


def is_spectral(leaf: Leaf) -> bool:
  """Whether the leaf's dual norm is the batched Newton-Schulz (or SVD) nuclear norm."""
  return leaf.lmo.name == 'spectral' and isinstance(
    leaf.lmo.options.get('newton_schulz'), _newton_schulz.NewtonSchulz
  )


def all_finite(arrays: list[jax.Array]) -> jax.Array:
  """Whether every entry of every array is finite, as one bool.

  x * 0 is 0 for finite x and NaN for inf or NaN, so a float sum of it is
  exact (no overflow) and XLA reduces it in one fused pass per array, where
  jnp.all(jnp.isfinite(x)) took three on XLA CPU (a bool mask, a partial and
  a final reduction).
  """
  total = sum(jnp.sum(x * jnp.zeros([], x.dtype), dtype=jnp.float32) for x in arrays)
  return jnp.isfinite(total)


def bucket_of(leaves: list[Leaf], spectral: list[int], k: int) -> dict[int, int]:
  """Round-robin buckets: a 1/k share of every oriented shape per bucket."""
  seen = collections.Counter()
  bucket = {}
  for i in spectral:
    v = leaves[i].view
    key = (v.batch_rank, tuple(sorted((v.d_in, v.d_out))), v.flat_shape[0])
    bucket[i] = seen[key] % k
    seen[key] += 1
  return bucket


def polars(leaves, items, *, steps_override, ns_sharding, nuclear=False):
  """Polar factors of (leaf index, matrix) items, batched per LMO options.

  With `nuclear`, their nuclear norms <X, polar(X)> instead (fp32 scalars).
  The stacks are laid out by the optimizer's `ns_sharding`, whatever the
  LMO's own.
  """
  many = _batched.nuclear_norms_many if nuclear else _batched.orthogonalize_many
  by_options = collections.defaultdict(list)
  for pos, (i, _) in enumerate(items):
    by_options[id(leaves[i].lmo)].append(pos)
  out = [None] * len(items)
  for positions in by_options.values():
    ns = leaves[items[positions[0]][0]].lmo.options['newton_schulz']
    ns = ns._replace(sharding=ns_sharding)
    if steps_override is not None:
      ns = ns._replace(steps=steps_override)
    results = many([items[p][1] for p in positions], newton_schulz=ns)
    for p, r in zip(positions, results):
      out[p] = r
  return out


def noise_sample(g, t):
  """D = G - G~ in fp32."""
  return g.astype(jnp.float32) - t.astype(jnp.float32)


def round_robin_duals(
  leaves, spectral, grads, tilde, count, *, noise_ns_steps, noise_every, ns_sharding
):
  """Nuclear norms of one round-robin bucket of noise samples per step.

  The samples are formed inside each branch, so a step only computes its
  bucket's (the switch's operands are the gradients as they are).
  """
  bucket = bucket_of(leaves, spectral, noise_every)

  def branch(b):
    members = [j for j, i in enumerate(spectral) if bucket[i] == b]

    def run(operands):
      gs, ts = operands
      mats = [
        (spectral[j], leaves[spectral[j]].view.to_matrices(noise_sample(gs[j], ts[j])))
        for j in members
      ]
      norms = polars(
        leaves, mats, steps_override=noise_ns_steps, ns_sharding=ns_sharding, nuclear=True
      )
      values = [jnp.zeros([], jnp.float32)] * len(spectral)
      for j, norm in zip(members, norms):
        values[j] = norm
      hit = [jnp.array(j in members) for j in range(len(spectral))]
      return values, hit

    return run

  if noise_every == 1:
    return branch(0)((grads, tilde))
  return jax.lax.switch(
    count % noise_every, [branch(b) for b in range(noise_every)], (grads, tilde)
  )


def sample_duals(leaves, grads, tilde, count, *, noise_ns_steps, noise_every, ns_sharding):
  """Dual norms of the noise samples G - G~ of every leaf, and which are fresh this step."""
  n = len(leaves)
  duals: list[Any] = [None] * n
  sampled: list[Any] = [jnp.array(True)] * n
  spectral = [i for i, leaf in enumerate(leaves) if is_spectral(leaf)]
  for i, leaf in enumerate(leaves):
    if i not in spectral:
      duals[i] = dual_of(leaf, noise_sample(grads[i], tilde[i]))
  if spectral:
    norms, fresh = round_robin_duals(
      leaves,
      spectral,
      [grads[i] for i in spectral],
      [tilde[i] for i in spectral],
      count,
      noise_ns_steps=noise_ns_steps,
      noise_every=noise_every,
      ns_sharding=ns_sharding,
    )
    for j, i in enumerate(spectral):
      view = leaves[i].view
      duals[i] = _lmo.spectral_scale(view.d_in, view.d_out) * norms[j]
      sampled[i] = fresh[j]
  return duals, sampled


def dual_of(leaf: Leaf, x: jax.Array) -> jax.Array:
  """The leaf's dual norm of x (through its matrix view for matrix LMOs), unbatched."""
  if leaf.view is None:
    return leaf.lmo.dual_norm(x)
  return leaf.lmo.dual_norm(leaf.view.to_matrices(x))


def duals_every_leaf(leaves, arrays, *, ns_steps, ns_sharding):
  """Dual norms of `arrays` (one per leaf), the spectral ones batched per shape."""
  spectral = [i for i, leaf in enumerate(leaves) if is_spectral(leaf)]
  out: list[Any] = [None] * len(leaves)
  for i, leaf in enumerate(leaves):
    if i not in spectral:
      out[i] = dual_of(leaf, arrays[i])
  mats = [(i, leaves[i].view.to_matrices(arrays[i].astype(jnp.float32))) for i in spectral]
  norms = polars(leaves, mats, steps_override=ns_steps, ns_sharding=ns_sharding, nuclear=True)
  for i, norm in zip(spectral, norms):
    view = leaves[i].view
    out[i] = _lmo.spectral_scale(view.d_in, view.d_out) * norm
  return out


def group_scales(leaves, noise, counts, b2, map_fn, lr_scales, *, relative_to=None):
  """[leaves] scales: the mapping of each group's bias-corrected H; and its clip telemetry.

  Args:
    leaves: the `Leaf` plan.
    noise: [leaves] H.
    counts: [leaves] samples taken.
    b2: the decay of H.
    map_fn: the mapping.
    lr_scales: constant multiplier per group.
    relative_to: None, or [leaves] squared dual norms of the momenta: the
      mapping then sees H^ / (that + RELATIVE_EPS) (the scale-free variant).

  Returns:
    (scales [leaves] fp32, {group: [2] fp32 fractions of its leaves at the
    mapping's s_min and s_max}; zeros without `bounds` or before every leaf
    of the group has a sample).
  """
  members = collections.defaultdict(list)
  for i, leaf in enumerate(leaves):
    members[leaf.group].append(i)
  bounds = _mapping.bounds_of(map_fn)
  scales = jnp.ones(noise.shape, jnp.float32)
  clip = {}
  for group, idx in members.items():
    idx = np.asarray(idx)
    h, n = noise[idx], counts[idx]
    correction = jnp.where(n > 0, 1 - b2 ** n.astype(jnp.float32), 1.0)
    h_hat = jnp.where(n > 0, h / correction, 0.0)
    if relative_to is not None:
      h_hat = h_hat / (relative_to[idx] + RELATIVE_EPS)
    s = jnp.asarray(map_fn(h_hat), jnp.float32)
    if s.shape != h_hat.shape:
      raise ValueError(
        f'the learning-rate mapping returned shape {s.shape} '
        f'for the {len(idx)} leaves of group {group!r}; it '
        f'must return one scale per leaf {h_hat.shape}'
      )
    ready = jnp.all(n > 0)
    scales = scales.at[idx].set(jnp.where(ready, s, 1.0) * lr_scales.get(group, 1.0))
    if bounds is None:
      clip[group] = jnp.zeros([2], jnp.float32)
    else:
      low = jnp.mean((s <= bounds[0]).astype(jnp.float32))
      high = jnp.mean((s >= bounds[1]).astype(jnp.float32))
      clip[group] = jnp.where(ready, jnp.stack([low, high]), 0.0)
  return scales, clip


def init_clip(labeled) -> dict[str, jax.Array]:
  """The clip telemetry before any step: zeros for each group present."""
  return {g: jnp.zeros([2], jnp.float32) for g in sorted({g for _, g in labeled})}


def resolve_lmos(
  spec, defaults, newton_schulz, *, what: str, valid=_groups.GROUPS
) -> dict[str, _lmo.LMO]:
  """LMO objects per group from names / LMOs / callables; 'spectral' by name gets `newton_schulz`.

  A callable array -> scalar stands for a dual norm (an LMO without a direction).
  """
  merged = dict(defaults)
  if spec is not None:
    unknown = set(spec) - set(valid)
    if unknown:
      raise ValueError(f'{what} has unknown groups {sorted(unknown)}; valid: {list(valid)}')
    merged.update(spec)
  out = {}
  for group, value in merged.items():
    if value is None:
      continue
    if isinstance(value, str) and value == 'spectral':
      out[group] = _lmo.spectral(newton_schulz=newton_schulz)
    elif callable(value) and not isinstance(value, (str, _lmo.LMO)):
      out[group] = _lmo.LMO('custom', None, value, False, {})
    else:
      out[group] = _lmo.as_lmo(value)
  return out
