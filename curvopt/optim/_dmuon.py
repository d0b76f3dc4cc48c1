"""D-Muon: Muon on hidden matrices with AdamW-matched RMS.

From "Muon is Scalable for LLM Training" (Moonlight; Liu et al., arXiv
2502.16982).

Hidden matrices: O = polar(Nesterov momentum) * consistent_rms *
sqrt(max(d_in, d_out)), decoupled weight decay; embeddings, heads and vectors:
AdamW. The update equals `optax.contrib.muon(..., consistent_rms=0.2)` given
the same settings and grouping, but runs one Newton-Schulz call per matrix
shape (not per matrix) and lays each stack out once on a mesh.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt.optim import _batched
from curvopt.optim import _groups
from curvopt.optim import _matrix
from curvopt.optim import _newton_schulz
from curvopt.optim import _paths


class ScaleByDmuonState(NamedTuple):
  """State of `scale_by_dmuon`."""

  count: jax.Array  # int32 scalar
  mu: Any  # momentum, like the params


def scale_by_dmuon(
  *,
  beta: float = 0.95,
  nesterov: bool = True,
  consistent_rms: float | None = 0.2,
  newton_schulz: _newton_schulz.NewtonSchulz = _newton_schulz.NewtonSchulz(),
  mu_dtype: Any = None,
  weight_dimension_numbers: _matrix.DimSpec = None,
) -> optax.GradientTransformationExtraArgs:
  """Orthogonalized momentum for matrix leaves (every leaf it is given).

  Momentum and its bias correction follow `optax.contrib.scale_by_muon`.

  Args:
    beta: momentum decay.
    nesterov: use Nesterov momentum.
    consistent_rms: scale polar factors by consistent_rms *
      sqrt(max(d_in, d_out)) (update RMS ~ consistent_rms, like AdamW);
      None: Keller Jordan's sqrt(max(1, d_out / d_in)).
    newton_schulz: how the polar factors are computed and laid out on a mesh.
    mu_dtype: momentum dtype (None: like the params).
    weight_dimension_numbers: matrix view of n-D leaves: None (default rule,
      see `default_dimension_numbers`), one `MuonDimensionNumbers`, a tree of
      them (None leaves = default) or a callable params -> tree.

  Returns:
    An optax.GradientTransformationExtraArgs.
  """
  mu_dtype = jnp.dtype(mu_dtype) if mu_dtype is not None else None
  _newton_schulz.check_options(newton_schulz)

  def init_fn(params):
    # Resolves every leaf's matrix view now, so a bad leaf fails at init.
    flat = _paths.leaves_with_paths(params)
    paths = [p for p, _ in flat]
    dims = _matrix.resolve_dimension_numbers(params, weight_dimension_numbers, paths)
    for (path, x), d in zip(flat, dims):
      _matrix.matrix_view(x.shape, d, path=_paths.path_str(path))
    return ScaleByDmuonState(
      count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count_inc = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(
        lambda m, g: beta * m + (1 - beta) * g,
        optax.tree.bias_correction(mu, beta, optax.safe_increment(count_inc)),
        optax.tree.bias_correction(updates, beta, count_inc),
      )
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count_inc)
    out = orthogonalized_updates(
      mu_hat,
      weight_dimension_numbers=weight_dimension_numbers,
      newton_schulz=newton_schulz,
      consistent_rms=consistent_rms,
    )
    mu = optax.tree.cast(mu, mu_dtype)
    return out, ScaleByDmuonState(count=count_inc, mu=mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def orthogonalized_updates(tree, *, weight_dimension_numbers, newton_schulz, consistent_rms):
  """Scaled polar factors of every leaf of `tree` (batched by shape)."""
  flat = _paths.leaves_with_paths(tree)
  paths = [p for p, _ in flat]
  dims = _matrix.resolve_dimension_numbers(tree, weight_dimension_numbers, paths)
  views = [
    _matrix.matrix_view(x.shape, d, path=_paths.path_str(p)) for (p, x), d in zip(flat, dims)
  ]
  polars = _batched.orthogonalize_many(
    [v.to_matrices(x) for v, (_, x) in zip(views, flat)], newton_schulz=newton_schulz
  )
  leaves = []
  for view, o, (_, x) in zip(views, polars, flat):
    if consistent_rms is None:
      scale = max(1.0, view.d_out / view.d_in) ** 0.5
    else:
      scale = consistent_rms * max(view.d_in, view.d_out) ** 0.5
    leaves.append(scale * view.from_matrices(o, like=x))
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def dmuon(
  learning_rate: optax.ScalarOrSchedule,
  *,
  beta: float = 0.95,
  nesterov: bool = True,
  consistent_rms: float | None = 0.2,
  weight_decay: float = 0.1,
  weight_decay_mask: Any = None,
  newton_schulz: _newton_schulz.NewtonSchulz = _newton_schulz.NewtonSchulz(),
  mu_dtype: Any = None,
  weight_dimension_numbers: _matrix.DimSpec = None,
  param_labels: _groups.LabelSpec = None,
  others: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The D-Muon baseline: `scale_by_dmuon` on hidden leaves, AdamW elsewhere.

  Args:
    learning_rate: a float or a schedule.
    beta: momentum decay of the hidden leaves.
    nesterov: use Nesterov momentum on the hidden leaves.
    consistent_rms: scale of the hidden leaves' polar factors (see
      `scale_by_dmuon`).
    weight_decay: decoupled weight decay of the hidden leaves (times the
      learning rate, as in optax), and of the default `others`.
    weight_decay_mask: optax mask of that weight decay (a callable or a tree
      over the hidden leaves).
    newton_schulz: how the hidden leaves' polar factors are computed.
    mu_dtype: momentum dtype (None: like the params), also of the default
      `others`.
    weight_dimension_numbers: matrix view of n-D hidden leaves (see
      `scale_by_dmuon`).
    param_labels: group labels (None: `param_groups`), a callable params ->
      labels or a label tree; 'hidden' leaves get D-Muon, 'embed_head' and
      'vector' leaves get `others`.
    others: the transformation of the 'embed_head' and 'vector' leaves; it
      gets their gradients and applies its own learning rate. None:
      `optax.adamw(learning_rate, b2=0.95, weight_decay=weight_decay,
      mu_dtype=mu_dtype)`.

  Returns:
    An optax.GradientTransformationExtraArgs.
  """
  if others is None:
    others = optax.adamw(learning_rate, b2=0.95, weight_decay=weight_decay, mu_dtype=mu_dtype)
  elif not isinstance(others, optax.GradientTransformation):
    raise TypeError(f'others must be an optax.GradientTransformation or None, got {others!r}')
  rename = {_groups.HIDDEN: 'dmuon', _groups.EMBED_HEAD: 'adam', _groups.VECTOR: 'adam'}

  def partition_labels(params):
    return _groups.label_tree(params, param_labels, rename=rename)

  # The partition keys ('dmuon', 'adam') name the optimizer state in
  # checkpoints: they stay as they are whatever `others` is.
  return optax.partition(
    transforms={
      'dmuon': optax.chain(
        scale_by_dmuon(
          beta=beta,
          nesterov=nesterov,
          consistent_rms=consistent_rms,
          newton_schulz=newton_schulz,
          mu_dtype=mu_dtype,
          weight_dimension_numbers=weight_dimension_numbers,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
      ),
      'adam': others,
    },
    param_labels=partition_labels,
  )
