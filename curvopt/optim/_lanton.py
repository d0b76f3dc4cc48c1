"""LANTON: noise-adaptive layerwise learning rates on LMO steps.

From Hao et al., "Noise-Adaptive Layerwise Learning Rates: Accelerating
Geometry-Aware Optimization for Deep Neural Network Training", arXiv
2510.14009. Per step t and leaf l of group g:
  B_t = b1 B_{t-1} + (1 - b1) G_t                       (momentum)
  O_t = LMO_l(B_t)                                      (direction)
  D_t = G_t - G~_t                                      (noise sample)
  H_t = b2 H_{t-1} + (1 - b2) dual_norm_l(D_t)^2        (noise estimate)
  s_t = mapping({H^_t^j : j in g})_l                    (group reduction)
  X_{t+1} = X_t + eta_t s_t O_t - eta_t s_t wd X_t
G~ is the previous step's gradient (noise='previous', default; no sample at
t = 1) or a second, independent minibatch gradient passed to `update` as the
extra argument `noise_grads` (noise='independent'). The mapping sees the
bias-corrected H^ = H / (1 - b2^n), n = number of samples the leaf has had;
until every leaf of a group has a sample, the group's scales are 1. A step
whose gradients (or noise_grads) hold a non-finite value changes no state and
returns zero updates. With relative=True the mapping sees H^ relative to the
squared dual norm of the momentum (a scale-free variant, see
`scale_by_lanton`). The noise estimate is shared with `noise_adaptive`
(`_noise.py`).
`scale_by_lanton` returns s_t (-O_t + wd X_t); `lanton` chains it with the
learning rate and gives vector leaves to AdamW (or to the bias_rms LMO, or to
any optax transformation).
"""

from typing import Any, Mapping, NamedTuple

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
VECTOR_OPTIONS = ('adamw', 'bias_rms')
DEFAULT_GROUP_LMOS = {
  _groups.HIDDEN: 'spectral',
  _groups.EMBED_HEAD: 'sign',
  _groups.VECTOR: 'bias_rms',
}


class ScaleByLantonState(NamedTuple):
  """State of `scale_by_lanton`.

  The per-leaf scalars are vectors with one entry per leaf of `momentum`, in
  its flattening order (`lanton_stats` names them): one small array each
  rather than a scalar per leaf, so that an update launches a few kernels for
  them instead of several per leaf.
  """

  count: jax.Array  # steps taken (int32 scalar)
  momentum: Any  # B, like the params
  prev_grad: Any  # G_{t-1} (noise='previous'); () for noise='independent'
  noise: jax.Array  # [leaves] H: EMA of the squared dual norm of noise samples
  noise_count: jax.Array  # [leaves] noise samples taken (int32)
  lr_scale: jax.Array  # [leaves] s used by the last step
  # {group: [2]} fractions of the group's leaves at the mapping's s_min and
  # s_max on the last step (zeros if the mapping has no `bounds`).
  clip: dict[str, jax.Array]


def scale_by_lanton(
  *,
  b1: float = 0.95,
  b2: float = 0.95,
  nesterov: bool = False,
  noise: str = 'previous',
  mapping: str | _mapping.Mapping = 'mean_ratio',
  relative: bool = False,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  group_lmos: Mapping[str, str | _lmo.LMO] | None = None,
  group_lr_scales: Mapping[str, float] | None = None,
  param_labels: _groups.LabelSpec = None,
  weight_dimension_numbers: _matrix.DimSpec = None,
  newton_schulz: _newton_schulz.NewtonSchulz = _newton_schulz.NewtonSchulz(),
  noise_ns_steps: int | None = None,
  noise_every: int | None = None,
  mu_dtype: Any = None,
  noise_buffer_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """The LANTON direction, scaled per layer by its group's noise mapping.

  Every leaf it receives must have a group label (see `param_groups`) whose
  LMO is in `group_lmos`. Its output, multiplied by -learning_rate (e.g. by
  `optax.scale_by_learning_rate`), is the paper's update.

  Args:
    b1: momentum decay.
    b2: decay of the noise estimate H.
    nesterov: step along b1 B_t + (1 - b1) G_t instead of B_t.
    noise: 'previous' (G~ = previous gradient; one extra buffer) or
      'independent' (G~ passed as `update(..., noise_grads=tree)`, a gradient
      at the same parameters from an independent minibatch).
    mapping: 'mean_ratio' (default), 'min_ratio', 'ones' (s = 1: the
      ablation), a mapping built with options (`mean_ratio(exponent=0.25,
      normaliser='geometric')`, ...) or a callable h_N -> s_N applied to each
      group's bias-corrected H on every step (see docs/lm_experiments.md for
      how the default was chosen).
    relative: the scale-free variant: the mapping sees each leaf's noise
      relative to its momentum, H^_l / (dual_norm_l(B_l)^2 + 1e-12), with B_l
      the momentum the LMO steps along (Nesterov's look-ahead with nesterov)
      on this step, instead of H^_l. The dual norm measures gradient size,
      so H^ alone gives more rate to layers with small gradients; the ratio
      compares noise-to-signal across layers. It costs no extra
      Newton-Schulz: a spectral momentum's nuclear norm is <B, polar(B)>.
    weight_decay: decoupled weight decay, scaled by the layer's s (and by the
      learning rate downstream).
    weight_decay_mask: None (all leaves), or a bool tree / callable
      params -> bool tree (full or masked tree).
    group_lmos: LMO (name or `LMO`) per group; defaults: hidden 'spectral',
      embed_head 'sign', vector 'bias_rms'. 'spectral' given by name uses
      `newton_schulz`.
    group_lr_scales: constant learning-rate multiplier per group (default 1
      everywhere).
    param_labels: None (`param_groups`), a callable params -> labels or a
      label tree (full or masked).
    weight_dimension_numbers: matrix view of n-D leaves for matrix LMOs (see
      `scale_by_dmuon`).
    newton_schulz: how the spectral LMO's polar factors are computed (when it
      is given by name) and how every spectral leaf's stack is laid out on a
      mesh.
    noise_ns_steps: Newton-Schulz steps of the nuclear-norm estimate
      <D, NS(D)> of the spectral leaves' noise samples (None: the LMO's
      steps). The estimate costs a second Newton-Schulz per spectral leaf;
      fewer steps, or noise_every > 1, make it cheaper.
    noise_every: take each spectral leaf's noise sample every k steps (None:
      every step; a Python int, never traced). The spectral leaves are split
      into k round-robin buckets (a 1/k share of every shape) so that each
      step costs the same. Cheap LMOs' samples are taken on every step.
    mu_dtype: momentum dtype (None: like the params).
    noise_buffer_dtype: dtype of the previous-gradient buffer (None: like
      the params).

  Returns:
    An optax.GradientTransformationExtraArgs; its update accepts the extra
    keyword argument `noise_grads`.
  """
  if noise not in NOISE_OPTIONS:
    raise ValueError(f'unknown noise option {noise!r}; valid: {NOISE_OPTIONS}')
  if noise_every is None:
    noise_every = 1
  if not isinstance(noise_every, int) or isinstance(noise_every, bool) or noise_every < 1:
    raise ValueError(
      f'noise_every must be a Python int >= 1 (None: 1), got '
      f'{noise_every!r}; under optax.inject_hyperparams list '
      'it in static_args'
    )
  map_fn = _mapping.as_mapping(mapping)
  _newton_schulz.check_options(newton_schulz)
  lmos = _resolve_lmos(group_lmos, newton_schulz)
  lr_scales = dict(group_lr_scales or {})
  unknown = set(lr_scales) - set(_groups.GROUPS)
  if unknown:
    raise ValueError(
      f'group_lr_scales has unknown groups {sorted(unknown)}; valid: {list(_groups.GROUPS)}'
    )
  mu_dtype = jnp.dtype(mu_dtype) if mu_dtype is not None else None
  noise_buffer_dtype = jnp.dtype(noise_buffer_dtype) if noise_buffer_dtype is not None else None

  def plan(tree) -> list[_noise.Leaf]:
    labeled = _groups.resolve_labels(tree, param_labels)
    return _noise.plan(tree, labeled, lmos, weight_dimension_numbers)

  def init_fn(params):
    leaves = plan(params)  # Checks labels and ranks early, naming the leaf.
    num = len(jax.tree.leaves(params))
    return ScaleByLantonState(
      count=jnp.zeros([], jnp.int32),
      momentum=optax.tree.zeros_like(params, dtype=mu_dtype),
      prev_grad=(
        optax.tree.zeros_like(params, dtype=noise_buffer_dtype) if noise == 'previous' else ()
      ),
      noise=jnp.zeros([num], jnp.float32),
      noise_count=jnp.zeros([num], jnp.int32),
      lr_scale=jnp.ones([num], jnp.float32),
      clip=_noise.init_clip([(leaf.path, leaf.group) for leaf in leaves]),
    )

  def update_fn(updates, state, params=None, *, noise_grads=None, **extra_args):
    del extra_args
    leaves = plan(updates)
    if not leaves:  # Every leaf is masked out (e.g. all on AdamW).
      return updates, state._replace(count=optax.safe_increment(state.count))
    paths = [leaf.path for leaf in leaves]
    treedef = jax.tree.structure(updates)
    flat = lambda tree: jax.tree.leaves(tree)  # noqa: E731
    grads = flat(updates)
    if noise == 'independent':
      if noise_grads is None:
        raise ValueError(
          "noise='independent' needs update(..., "
          'noise_grads=<gradient of an independent minibatch>)'
        )
      tilde = _paths.lookup_by_path(noise_grads, paths, what='noise_grads')
      has_prev = jnp.array(True)
    else:
      if noise_grads is not None:
        raise ValueError(
          "noise_grads was given but noise='previous'; use "
          "noise='independent' to pass G~ explicitly"
        )
      tilde = flat(state.prev_grad)
      has_prev = state.count > 0
    decay = _weight_decay_terms(updates, params, paths, weight_decay, weight_decay_mask)

    finite = _noise.all_finite(grads + (tilde if noise == 'independent' else []))

    momentum = [
      ((1 - b1) * g + b1 * b).astype(b.dtype) for g, b in zip(grads, flat(state.momentum))
    ]
    if nesterov:
      ahead = [b1 * b + (1 - b1) * g for g, b in zip(grads, momentum)]
    else:
      ahead = momentum
    directions, duals, sampled, ahead_duals = _directions_and_duals(
      leaves,
      ahead,
      grads,
      tilde,
      state.count,
      noise_ns_steps=noise_ns_steps,
      noise_every=noise_every,
      ns_sharding=newton_schulz.sharding,
      relative=relative,
    )

    square = jnp.square(jnp.stack([jnp.asarray(d, jnp.float32) for d in duals]))
    # A finite but huge sample can overflow the square: skip it too.
    take = has_prev & jnp.stack(sampled) & jnp.isfinite(square)
    noise_new = jnp.where(take, b2 * state.noise + (1 - b2) * square, state.noise)
    count_new = state.noise_count + take.astype(jnp.int32)
    relative_to = None
    if relative:
      relative_to = jnp.square(jnp.stack([jnp.asarray(d, jnp.float32) for d in ahead_duals]))
    scales, clip = _noise.group_scales(
      leaves, noise_new, count_new, b2, map_fn, lr_scales, relative_to=relative_to
    )
    out = []
    for i, (g, d, wd_x) in enumerate(zip(grads, directions, decay)):
      step = -d if wd_x is None else wd_x - d
      out.append(jnp.where(finite, scales[i] * step, 0.0).astype(g.dtype))

    def keep(new, old):
      return [jnp.where(finite, a, b) for a, b in zip(new, old)]

    new_state = ScaleByLantonState(
      count=optax.safe_increment(state.count),
      momentum=jax.tree.unflatten(treedef, keep(momentum, flat(state.momentum))),
      prev_grad=(
        jax.tree.unflatten(
          treedef,
          keep(
            [g.astype(p.dtype) for g, p in zip(grads, flat(state.prev_grad))], flat(state.prev_grad)
          ),
        )
        if noise == 'previous'
        else ()
      ),
      noise=jnp.where(finite, noise_new, state.noise),
      noise_count=jnp.where(finite, count_new, state.noise_count),
      lr_scale=jnp.where(finite, scales, state.lr_scale),
      clip={g: jnp.where(finite, c, state.clip[g]) for g, c in clip.items()},
    )
    new_state = new_state._replace(count=jnp.where(finite, new_state.count, state.count))
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _resolve_lmos(group_lmos, newton_schulz) -> dict[str, _lmo.LMO]:
  """LMO objects per group; 'spectral' by name gets `newton_schulz`."""
  spec = dict(DEFAULT_GROUP_LMOS)
  if group_lmos is not None:
    unknown = set(group_lmos) - set(_groups.GROUPS)
    if unknown:
      raise ValueError(
        f'group_lmos has unknown groups {sorted(unknown)}; valid: {list(_groups.GROUPS)}'
      )
    spec.update(group_lmos)
  out = {}
  for group, value in spec.items():
    if isinstance(value, str) and value == 'spectral':
      out[group] = _lmo.spectral(newton_schulz=newton_schulz)
    else:
      out[group] = _lmo.as_lmo(value)
  return out


def _weight_decay_terms(updates, params, paths, weight_decay, mask):
  """wd * X per leaf, or None where the leaf is not decayed."""
  static_zero = isinstance(weight_decay, (int, float)) and weight_decay == 0
  if static_zero:
    return [None] * len(paths)
  if params is None:
    raise ValueError('weight decay needs the params: call update(grads, state, params)')
  xs = _paths.lookup_by_path(params, paths, what='params')
  if mask is None:
    decayed = [True] * len(paths)
  else:
    tree = mask(updates) if callable(mask) else mask
    decayed = _paths.lookup_by_path(tree, paths, what='weight_decay_mask')
  return [weight_decay * x if m else None for x, m in zip(xs, decayed)]


def _directions_and_duals(
  leaves, ahead, grads, tilde, count, *, noise_ns_steps, noise_every, ns_sharding, relative
):
  """LMO directions O, dual norms of the noise samples, which are fresh, and
  (with `relative`) the dual norms of the stepped momenta `ahead` (else None).

  A spectral momentum's nuclear norm is <B, polar(B)>, from the polar factor
  its direction needs anyway.
  """
  n = len(leaves)
  directions: list[Any] = [None] * n
  duals: list[Any] = [None] * n
  sampled: list[Any] = [jnp.array(True)] * n
  ahead_duals: list[Any] | None = [None] * n if relative else None
  spectral = [i for i, leaf in enumerate(leaves) if _noise.is_spectral(leaf)]

  for i, leaf in enumerate(leaves):
    if i in spectral:
      continue
    sample = _noise.noise_sample(grads[i], tilde[i])
    if leaf.view is None:
      directions[i] = leaf.lmo.direction(ahead[i])
      duals[i] = leaf.lmo.dual_norm(sample)
    else:
      directions[i] = leaf.view.from_matrices(
        leaf.lmo.direction(leaf.view.to_matrices(ahead[i])), like=ahead[i]
      )
      duals[i] = leaf.lmo.dual_norm(leaf.view.to_matrices(sample))
    if relative:
      ahead_duals[i] = _noise.dual_of(leaf, ahead[i])

  if not spectral:
    return directions, duals, sampled, ahead_duals

  b_mats = [(i, leaves[i].view.to_matrices(ahead[i])) for i in spectral]
  # Separate calls for momenta and noise samples: stacking both into one
  # call measured ~15% slower on CPU (twice the working set per matmul).
  b_polars = _noise.polars(leaves, b_mats, steps_override=None, ns_sharding=ns_sharding)
  noise_duals, fresh = _noise.round_robin_duals(
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
    scale = _lmo.spectral_scale(view.d_in, view.d_out)
    directions[i] = -scale * view.from_matrices(b_polars[j], like=ahead[i])
    duals[i] = scale * noise_duals[j]
    sampled[i] = fresh[j]
    if relative:
      b = b_mats[j][1].astype(jnp.float32)
      ahead_duals[i] = scale * jnp.sum(b * b_polars[j].astype(jnp.float32))
  return directions, duals, sampled, ahead_duals


def lanton(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: float = 0.95,
  b2: float = 0.95,
  nesterov: bool = False,
  noise: str = 'previous',
  mapping: str | _mapping.Mapping = 'mean_ratio',
  relative: bool = False,
  weight_decay: float = 0.1,
  weight_decay_mask: Any = None,
  hidden_lmo: str | _lmo.LMO = 'spectral',
  embed_head_lmo: str | _lmo.LMO = 'sign',
  vector: str | optax.GradientTransformation = 'adamw',
  group_lr_scales: Mapping[str, float] | None = None,
  param_labels: _groups.LabelSpec = None,
  weight_dimension_numbers: _matrix.DimSpec = None,
  newton_schulz: _newton_schulz.NewtonSchulz = _newton_schulz.NewtonSchulz(),
  noise_ns_steps: int | None = None,
  noise_every: int | None = None,
  mu_dtype: Any = None,
  noise_buffer_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """LANTON: `scale_by_lanton` times the learning rate; AdamW for vectors.

  Args:
    learning_rate: a float or a schedule (eta_t).
    b1: momentum decay (`scale_by_lanton`).
    b2: decay of the noise estimate (`scale_by_lanton`).
    nesterov: Nesterov momentum (`scale_by_lanton`).
    noise: 'previous' or 'independent' (`scale_by_lanton`).
    mapping: the group's H -> scales mapping (`scale_by_lanton`).
    relative: noise relative to the momentum's squared dual norm
      (`scale_by_lanton`).
    weight_decay: decoupled weight decay of LANTON's leaves, and of the
      default AdamW of the vector leaves.
    weight_decay_mask: mask of LANTON's weight decay (`scale_by_lanton`).
    hidden_lmo: LMO (name or `LMO`) of the 'hidden' group.
    embed_head_lmo: LMO (name or `LMO`) of the 'embed_head' group.
    vector: what steps the 'vector' leaves: 'adamw' (default):
      `optax.adamw(learning_rate, b2=0.95, weight_decay=weight_decay,
      mu_dtype=mu_dtype)`; 'bias_rms': LANTON with the bias-RMS LMO (a third
      noise-adaptive group; give it its own share of the rate with
      group_lr_scales['vector']); or an optax.GradientTransformation, which
      gets their gradients and applies its own learning rate.
    group_lr_scales: constant learning-rate multiplier per LANTON group
      (`scale_by_lanton`); 'vector' only with vector='bias_rms'.
    param_labels: group labels (`scale_by_lanton`).
    weight_dimension_numbers: matrix view of n-D leaves (`scale_by_lanton`).
    newton_schulz: polar factors of the spectral LMO (`scale_by_lanton`).
    noise_ns_steps: Newton-Schulz steps of the noise estimate
      (`scale_by_lanton`).
    noise_every: noise sample every k steps (`scale_by_lanton`).
    mu_dtype: momentum dtype, also of the default AdamW (None: like the
      params).
    noise_buffer_dtype: dtype of the previous-gradient buffer
      (`scale_by_lanton`).

  Returns:
    An optax.GradientTransformationExtraArgs (an `optax.partition`); pass
    `noise_grads=` to `update` with noise='independent'.

  Under `optax.inject_hyperparams(lanton)(learning_rate=schedule)` every
  numeric option becomes a traced hyperparameter (noise_ns_steps then runs in
  a fori_loop); `newton_schulz` and a `vector` transformation stay static, and
  callable options (a mapping, param_labels, masks) must be listed in
  `static_args`, since optax takes callables for schedules.
  """
  if isinstance(vector, str):
    if vector not in VECTOR_OPTIONS:
      raise ValueError(
        f'unknown vector option {vector!r}; valid: '
        f'{VECTOR_OPTIONS} or an optax.GradientTransformation'
      )
  elif not isinstance(vector, optax.GradientTransformation):
    raise TypeError(f'vector must be a name or an optax.GradientTransformation, got {vector!r}')
  on_lanton = isinstance(vector, str) and vector == 'bias_rms'
  if not on_lanton and _groups.VECTOR in (group_lr_scales or {}):
    given = f'vector={vector!r}' if isinstance(vector, str) else 'a vector transformation'
    raise ValueError(
      "group_lr_scales['vector'] scales vector leaves on "
      f"LANTON (vector='bias_rms'); with {given} their rate is "
      "that transformation's own"
    )
  rename = {
    _groups.HIDDEN: 'lanton',
    _groups.EMBED_HEAD: 'lanton',
    _groups.VECTOR: 'lanton' if on_lanton else 'adam',
  }

  def partition_labels(params):
    return _groups.label_tree(params, param_labels, rename=rename)

  core = scale_by_lanton(
    b1=b1,
    b2=b2,
    nesterov=nesterov,
    noise=noise,
    mapping=mapping,
    relative=relative,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    group_lmos={
      _groups.HIDDEN: hidden_lmo,
      _groups.EMBED_HEAD: embed_head_lmo,
      _groups.VECTOR: 'bias_rms',
    },
    group_lr_scales=group_lr_scales,
    param_labels=param_labels,
    weight_dimension_numbers=weight_dimension_numbers,
    newton_schulz=newton_schulz,
    noise_ns_steps=noise_ns_steps,
    noise_every=noise_every,
    mu_dtype=mu_dtype,
    noise_buffer_dtype=noise_buffer_dtype,
  )
  transforms = {
    'lanton': optax.chain(core, optax.scale_by_learning_rate(learning_rate)),
  }
  # The partition keys ('lanton', 'adam') name the optimizer state in
  # checkpoints: they stay as they are whatever `vector` is.
  if not on_lanton:
    transforms['adam'] = (
      vector
      if not isinstance(vector, str)
      else optax.adamw(learning_rate, b2=0.95, weight_decay=weight_decay, mu_dtype=mu_dtype)
    )
  return optax.partition(transforms, partition_labels, mask_compatible_extra_args=True)


def _find_states(tree: Any, kind: type = ScaleByLantonState) -> list[Any]:
  def is_state(x):
    return isinstance(x, kind)

  return [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]


def stats_of(states: list[Any], paths_of) -> dict[str, dict[str, jax.Array]]:
  """The stats dict of `lanton_stats` / `noise_adaptive_stats` from their states."""
  out: dict[str, dict[str, jax.Array]] = {'h': {}, 'lr_scale': {}, 'clip_low': {}, 'clip_high': {}}
  for state in states:
    for i, path in enumerate(paths_of(state)):
      out['h'][_paths.path_str(path)] = state.noise[i]
      out['lr_scale'][_paths.path_str(path)] = state.lr_scale[i]
    for group, fractions in state.clip.items():
      out['clip_low'][group] = fractions[0]
      out['clip_high'][group] = fractions[1]
  return out


def lanton_stats(opt_state: Any) -> dict[str, dict[str, jax.Array]]:
  """Per-leaf noise estimate H and learning-rate scale s, and clip telemetry, for logging.

  Finds every `ScaleByLantonState` inside `opt_state` (through chains,
  partitions, inject_hyperparams, MultiSteps, ...).

  Args:
    opt_state: an optimizer state.

  Returns:
    {'h': {leaf path: H}, 'lr_scale': {leaf path: s}, 'clip_low': {group:
    fraction of its leaves at the mapping's s_min}, 'clip_high': {group:
    fraction at s_max}}, leaf paths like 'layers_0/attn/q/kernel', groups
    like 'hidden'; the fractions are those of the last step (0 when the
    mapping does not clip). Jit-able.

  Raises:
    ValueError: opt_state holds no LANTON state.
  """
  states = _find_states(opt_state)
  if not states:
    raise ValueError(
      f'no ScaleByLantonState found in the optimizer state (of type {type(opt_state).__name__})'
    )
  return stats_of(states, lambda state: [p for p, _ in _paths.leaves_with_paths(state.momentum)])
