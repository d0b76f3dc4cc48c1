"""`noise_adaptive`: LANTON's noise-adaptive layerwise rates on any optax transformation.

LANTON (arXiv 2510.14009) differs from D-Muon in more than its noise
adaptation (step sizes per matrix, Nesterov, Signum on the embedding, weight
decay scaled per layer). This wrapper adds only the adaptation: it keeps
LANTON's per-leaf noise estimate H of the incoming gradients,
  D_t = G_t - G~_t,  H_t = b2 H_{t-1} + (1 - b2) dual_norm_l(D_t)^2,
maps each group's bias-corrected H to per-leaf factors s (the same mappings
and the same estimate as `scale_by_lanton`, `_noise.py`), and multiplies
`inner`'s update of each leaf by its s. With `mapping=ones()` the updates are
exactly `inner`'s.
"""

from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from curvopt.optim import _groups
from curvopt.optim import _lmo
from curvopt.optim import _mapping
from curvopt.optim import _matrix
from curvopt.optim import _newton_schulz
from curvopt.optim import _noise
from curvopt.optim import _paths

NOISE_OPTIONS = ('previous', 'independent')
# LANTON's geometry: the spectral LMO's dual on hidden matrices, the sign LMO's
# (entrywise l1) on the embedding and head; vector leaves are not adapted.
DEFAULT_DUAL_NORMS = {_groups.HIDDEN: 'spectral', _groups.EMBED_HEAD: 'sign'}

# A group's dual norm: an LMO name, an LMO, a callable array -> scalar, or None (not adapted).
DualNormSpec = Union[None, str, _lmo.LMO, Callable[[jax.Array], jax.Array]]


class NoiseAdaptiveState(NamedTuple):
  """State of `noise_adaptive`.

  The per-leaf trees hold a scalar for each adapted leaf and optax's
  `MaskedNode` elsewhere, so their key paths name the leaves
  (`noise_adaptive_stats`).
  """

  count: jax.Array  # steps taken with finite gradients (int32 scalar)
  inner: Any  # the inner transformation's state
  noise: Any  # per adapted leaf: H, EMA of the squared dual norm of noise samples
  noise_count: Any  # per adapted leaf: noise samples taken (int32)
  lr_scale: Any  # per adapted leaf: s applied on the last step
  prev_grad: Any  # adapted leaves' G_{t-1} (noise='previous'); () otherwise
  momentum: Any  # adapted leaves' gradient EMA (relative=True); () otherwise
  clip: dict[str, jax.Array]  # {group: [2] fractions at the mapping's s_min, s_max}


def _masked_like(tree, values: dict) -> Any:
  """`tree` with the values at their key paths and MaskedNode at every other leaf."""

  def pick(path, _):
    return values[path] if path in values else optax.MaskedNode()

  return jax.tree_util.tree_map_with_path(pick, tree)


def noise_adaptive(
  inner: optax.GradientTransformation,
  *,
  mapping: Union[None, str, _mapping.Mapping] = None,
  b2: float = 0.95,
  groups: _groups.LabelSpec = None,
  dual_norm: Union[None, Mapping[str, DualNormSpec], Callable[[str], DualNormSpec]] = None,
  relative: bool = False,
  b1: float = 0.95,
  noise: str = 'previous',
  newton_schulz: _newton_schulz.NewtonSchulz = _newton_schulz.NewtonSchulz(),
  weight_dimension_numbers: _matrix.DimSpec = None,
  noise_ns_steps: int | None = None,
  noise_every: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """`inner`, with each leaf's update multiplied by its group's noise factor s(H).

  Per step and adapted leaf l of group g: the noise sample D = G - G~ of the
  incoming gradient G (G~ = the previous step's G, no sample on the first
  step; or the extra argument `noise_grads`), H = b2 H + (1 - b2)
  dual_norm_g(D)^2, and s_l = mapping(the group's bias-corrected H)_l, as in
  `scale_by_lanton`. Until every leaf of a group has a sample its factors
  are 1. A step whose gradients (or noise_grads) hold a non-finite value
  leaves the noise state as it was and applies the last factors.

  Args:
    inner: any optax transformation; it gets the gradients (and the extra
      arguments but `noise_grads`) unchanged.
    mapping: None (`default_noise_mapping()`: the geometric-mean fourth
      root, the recipe of docs/lm_experiments.md's best result), 'min_ratio',
      'mean_ratio', 'ones' (s = 1: exactly `inner`'s updates), a mapping with
      options (`min_ratio(exponent=0.25)`, ...) or a callable h_N -> s_N over
      one group's leaves.
    b2: decay of H.
    groups: group labels: None (`param_groups`: 'hidden', 'embed_head',
      'vector'), a callable params -> label tree, or a label tree (full or
      masked). With a callable `dual_norm` the labels may be any strings.
    dual_norm: which groups are adapted and in which dual norm: None (LANTON's
      geometry: 'hidden' -> the spectral LMO's dual sqrt(d_out/d_in) x nuclear
      norm, estimated as <D, NS(D)> with `newton_schulz`; 'embed_head' -> the
      sign LMO's dual, the entrywise l1 norm; 'vector' not adapted, s = 1); a
      dict group -> spec that updates those defaults (e.g. {'vector':
      'bias_rms'} adapts the vectors too, {'embed_head': None} stops adapting
      the embedding); or a callable group -> spec. A spec is an LMO name
      (matrix LMOs see the leaf's matrix view), an `LMO`, a callable array ->
      scalar, or None (the group is not adapted). Each group's members are
      compared with each other: an untied embedding and head form a group of
      two, a tied one a group of one (s = 1 with the ratio mappings).
    relative: the scale-free variant: the mapping sees H^_l / (dual_norm_l(
      M_l)^2 + 1e-12), with M_l = b1 M_l + (1 - b1) G_l an EMA of the
      gradient (the wrapper's own: `inner`'s momentum is not visible to it),
      instead of H^_l: the noise relative to the signal of its layer. Costs a
      buffer like the adapted params and a second nuclear norm per matrix.
    b1: the decay of M (relative=True only).
    noise: 'previous' (G~ = G_{t-1}; one buffer like the adapted params) or
      'independent' (G~ passed as `update(..., noise_grads=tree)`).
    newton_schulz: the Newton-Schulz options of the nuclear norms of the
      spectral dual norm given by name (and their layout on a mesh).
    weight_dimension_numbers: matrix view of n-D leaves for matrix dual norms
      (see `scale_by_dmuon`).
    noise_ns_steps: Newton-Schulz steps of the nuclear-norm estimates (None:
      those of `newton_schulz`).
    noise_every: sample the spectral leaves' noise every k steps in
      round-robin buckets (None: every step), as in `scale_by_lanton`.

  Returns:
    An optax.GradientTransformationExtraArgs whose state is a
    `NoiseAdaptiveState`; `noise_adaptive_stats` reads H, s and the clip
    telemetry out of it.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f'inner must be an optax.GradientTransformation, got {inner!r}')
  if noise not in NOISE_OPTIONS:
    raise ValueError(f'unknown noise option {noise!r}; valid: {NOISE_OPTIONS}')
  if noise_every is None:
    noise_every = 1
  if not isinstance(noise_every, int) or isinstance(noise_every, bool) or noise_every < 1:
    raise ValueError(f'noise_every must be a Python int >= 1 (None: 1), got {noise_every!r}')
  map_fn = _mapping.default_noise_mapping() if mapping is None else _mapping.as_mapping(mapping)
  _newton_schulz.check_options(newton_schulz)
  inner = optax.with_extra_args_support(inner)

  if dual_norm is None or isinstance(dual_norm, Mapping):
    spec = dict(DEFAULT_DUAL_NORMS)
    spec.update(dual_norm or {})
    if groups is None:
      unknown = set(spec) - set(_groups.GROUPS)
      if unknown:
        raise ValueError(
          f'dual_norm has unknown groups {sorted(unknown)}; valid (with the default '
          f'groups): {list(_groups.GROUPS)}'
        )

    def spec_of(group):
      return spec.get(group)

    def valid_labels(labels):
      del labels
      return tuple(sorted(set(_groups.GROUPS) | set(spec)))

  elif callable(dual_norm):
    spec_of = dual_norm

    def valid_labels(labels):
      return tuple(sorted({v for v in jax.tree.leaves(labels) if isinstance(v, str)}))

  else:
    raise TypeError(
      f'dual_norm must be None, a dict group -> dual norm or a callable, got {dual_norm!r}'
    )

  lmo_cache: dict[str, Any] = {}

  def lmo_of(group):
    if group not in lmo_cache:
      value = spec_of(group)
      if value is None:
        lmo_cache[group] = None
      else:
        lmo_cache[group] = _noise.resolve_lmos(
          {group: value}, {}, newton_schulz, what='dual_norm', valid=(group,)
        )[group]
    return lmo_cache[group]

  def plan(tree) -> list[_noise.Leaf]:
    if groups is None:
      labels = _groups.param_groups(tree)
    elif callable(groups):
      labels = groups(tree)
    else:
      labels = groups
    labeled = _groups.resolve_labels(tree, labels, valid=valid_labels(labels))
    adapted = [(p, g) for p, g in labeled if lmo_of(g) is not None]
    lmos = {g: lmo_of(g) for _, g in adapted}
    return _noise.plan(tree, adapted, lmos, weight_dimension_numbers)

  def init_fn(params):
    leaves = plan(params)
    values = dict(_paths.leaves_with_paths(params))

    def per_leaf(make):
      return _masked_like(params, {leaf.path: make(values[leaf.path]) for leaf in leaves})

    return NoiseAdaptiveState(
      count=jnp.zeros([], jnp.int32),
      inner=inner.init(params),
      noise=per_leaf(lambda _: jnp.zeros([], jnp.float32)),
      noise_count=per_leaf(lambda _: jnp.zeros([], jnp.int32)),
      lr_scale=per_leaf(lambda _: jnp.ones([], jnp.float32)),
      prev_grad=per_leaf(jnp.zeros_like) if noise == 'previous' else (),
      momentum=per_leaf(jnp.zeros_like) if relative else (),
      clip=_noise.init_clip([(leaf.path, leaf.group) for leaf in leaves]),
    )

  def update_fn(updates, state, params=None, *, noise_grads=None, **extra_args):
    inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    leaves = plan(updates)
    if not leaves:
      return inner_updates, state._replace(
        count=optax.safe_increment(state.count), inner=inner_state
      )
    paths = [leaf.path for leaf in leaves]
    grads = _paths.lookup_by_path(updates, paths, what='updates')
    if noise == 'independent':
      if noise_grads is None:
        raise ValueError(
          "noise='independent' needs update(..., "
          'noise_grads=<gradient of an independent minibatch>)'
        )
      tilde = _paths.lookup_by_path(noise_grads, paths, what='noise_grads')
      has_prev = jnp.array(True)
      finite = _noise.all_finite(grads + tilde)
    else:
      if noise_grads is not None:
        raise ValueError(
          "noise_grads was given but noise='previous'; use "
          "noise='independent' to pass G~ explicitly"
        )
      tilde = jax.tree.leaves(state.prev_grad)
      has_prev = state.count > 0
      finite = _noise.all_finite(grads)

    duals, sampled = _noise.sample_duals(
      leaves,
      grads,
      tilde,
      state.count,
      noise_ns_steps=noise_ns_steps,
      noise_every=noise_every,
      ns_sharding=newton_schulz.sharding,
    )
    old_noise = jnp.stack(jax.tree.leaves(state.noise))
    old_count = jnp.stack(jax.tree.leaves(state.noise_count))
    old_scale = jnp.stack(jax.tree.leaves(state.lr_scale))
    square = jnp.square(jnp.stack([jnp.asarray(d, jnp.float32) for d in duals]))
    take = has_prev & jnp.stack(sampled) & jnp.isfinite(square)
    noise_new = jnp.where(take, b2 * old_noise + (1 - b2) * square, old_noise)
    count_new = old_count + take.astype(jnp.int32)

    relative_to = None
    momentum = None
    if relative:
      momentum = [
        ((1 - b1) * g + b1 * m).astype(m.dtype)
        for g, m in zip(grads, jax.tree.leaves(state.momentum))
      ]
      m_duals = _noise.duals_every_leaf(
        leaves, momentum, ns_steps=noise_ns_steps, ns_sharding=newton_schulz.sharding
      )
      relative_to = jnp.square(jnp.stack([jnp.asarray(d, jnp.float32) for d in m_duals]))
    scales, clip = _noise.group_scales(
      leaves, noise_new, count_new, b2, map_fn, {}, relative_to=relative_to
    )
    noise_new = jnp.where(finite, noise_new, old_noise)
    count_new = jnp.where(finite, count_new, old_count)
    scales = jnp.where(finite, scales, old_scale)

    index = {path: i for i, path in enumerate(paths)}

    def scaled(path, u):
      if path not in index:
        return u
      return scales[index[path]].astype(u.dtype) * u

    out = jax.tree_util.tree_map_with_path(scaled, inner_updates)

    def per_leaf(vector):
      return _masked_like(updates, {p: vector[i] for p, i in index.items()})

    def kept(new, old_tree):
      old = jax.tree.leaves(old_tree)
      return _masked_like(
        updates, {p: jnp.where(finite, n.astype(o.dtype), o) for p, n, o in zip(paths, new, old)}
      )

    new_state = NoiseAdaptiveState(
      count=jnp.where(finite, optax.safe_increment(state.count), state.count),
      inner=inner_state,
      noise=per_leaf(noise_new),
      noise_count=per_leaf(count_new),
      lr_scale=per_leaf(scales),
      prev_grad=kept(grads, state.prev_grad) if noise == 'previous' else (),
      momentum=kept(momentum, state.momentum) if relative else (),
      clip={g: jnp.where(finite, c, state.clip[g]) for g, c in clip.items()},
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def noise_adaptive_stats(opt_state: Any) -> dict[str, dict[str, jax.Array]]:
  """Per-leaf noise estimate H and factor s, and clip telemetry, of `noise_adaptive` states.

  Finds every `NoiseAdaptiveState` inside `opt_state` (through chains,
  partitions, inject_hyperparams, MultiSteps, ...).

  Args:
    opt_state: an optimizer state.

  Returns:
    Like `lanton_stats`: {'h': {leaf path: H}, 'lr_scale': {leaf path: s},
    'clip_low': {group: fraction at s_min}, 'clip_high': {group: fraction at
    s_max}} over the adapted leaves. Jit-able.

  Raises:
    ValueError: opt_state holds no `noise_adaptive` state.
  """

  def is_state(x):
    return isinstance(x, NoiseAdaptiveState)

  states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if not states:
    raise ValueError(
      f'no NoiseAdaptiveState found in the optimizer state (of type {type(opt_state).__name__})'
    )
  out: dict[str, dict[str, jax.Array]] = {'h': {}, 'lr_scale': {}, 'clip_low': {}, 'clip_high': {}}
  for state in states:
    for kind, tree in (('h', state.noise), ('lr_scale', state.lr_scale)):
      for path, value in _paths.leaves_with_paths(tree):
        out[kind][_paths.path_str(path)] = value
    for group, fractions in state.clip.items():
      out['clip_low'][group] = fractions[0]
      out['clip_high'][group] = fractions[1]
  return out
