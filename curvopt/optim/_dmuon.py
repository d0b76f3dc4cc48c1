"""D-Muon (Moonlight): Muon on hidden matrices with AdamW-matched RMS.

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
    ns_steps: int = 5,
    ns_coeffs: _newton_schulz.Coeffs = _newton_schulz.DEFAULT_NS_COEFFS,
    ns_dtype: Any = 'auto',
    eps: float = 1e-8,
    consistent_rms: float | None = 0.2,
    mu_dtype: Any = None,
    weight_dimension_numbers: _matrix.DimSpec = None,
    ns_sharding: str = 'batch',
    polar: str = 'newton_schulz',
) -> optax.GradientTransformationExtraArgs:
  """Orthogonalized momentum for matrix leaves (every leaf it is given).

  Momentum and its bias correction follow `optax.contrib.scale_by_muon`.

  Args:
    beta: momentum decay.
    nesterov: use Nesterov momentum.
    ns_steps, ns_coeffs, eps: Newton-Schulz options (`newton_schulz`).
    ns_dtype: 'auto' (bf16 on accelerators, fp32 on CPU), 'float32',
      'bfloat16' or a dtype.
    consistent_rms: scale polar factors by consistent_rms *
      sqrt(max(d_in, d_out)) (update RMS ~ consistent_rms, like AdamW);
      None: Keller Jordan's sqrt(max(1, d_out / d_in)).
    mu_dtype: momentum dtype (None: like the params).
    weight_dimension_numbers: matrix view of n-D leaves: None (default rule,
      see `default_dimension_numbers`), one `MuonDimensionNumbers`, a tree of
      them (None leaves = default) or a callable params -> tree.
    ns_sharding: 'batch', 'replicated' or 'none' (see `orthogonalize_many`).
    polar: 'newton_schulz' or 'svd' (exact; slow).

  Returns:
    An optax.GradientTransformationExtraArgs.
  """
  mu_dtype = jnp.dtype(mu_dtype) if mu_dtype is not None else None
  _batched.check_options(polar=polar, ns_sharding=ns_sharding)
  _newton_schulz.resolve_ns_dtype(ns_dtype)

  def init_fn(params):
    # Resolves every leaf's matrix view now, so a bad leaf fails at init.
    flat = _paths.leaves_with_paths(params)
    paths = [p for p, _ in flat]
    dims = _matrix.resolve_dimension_numbers(params, weight_dimension_numbers,
                                             paths)
    for (path, x), d in zip(flat, dims):
      _matrix.matrix_view(x.shape, d, path=_paths.path_str(path))
    return ScaleByDmuonState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count_inc = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(
          lambda m, g: beta * m + (1 - beta) * g,
          optax.tree.bias_correction(
              mu, beta, optax.safe_increment(count_inc)),
          optax.tree.bias_correction(updates, beta, count_inc))
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count_inc)
    out = orthogonalized_updates(
        mu_hat, weight_dimension_numbers=weight_dimension_numbers,
        ns_steps=ns_steps, ns_coeffs=ns_coeffs, ns_dtype=ns_dtype, eps=eps,
        polar=polar, ns_sharding=ns_sharding, consistent_rms=consistent_rms)
    mu = optax.tree.cast(mu, mu_dtype)
    return out, ScaleByDmuonState(count=count_inc, mu=mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def orthogonalized_updates(tree, *, weight_dimension_numbers, ns_steps,
                           ns_coeffs, ns_dtype, eps, polar, ns_sharding,
                           consistent_rms):
  """Scaled polar factors of every leaf of `tree` (batched by shape)."""
  flat = _paths.leaves_with_paths(tree)
  paths = [p for p, _ in flat]
  dims = _matrix.resolve_dimension_numbers(tree, weight_dimension_numbers,
                                           paths)
  views = [_matrix.matrix_view(x.shape, d, path=_paths.path_str(p))
           for (p, x), d in zip(flat, dims)]
  polars = _batched.orthogonalize_many(
      [v.to_matrices(x) for v, (_, x) in zip(views, flat)],
      steps=ns_steps, coeffs=ns_coeffs, dtype=ns_dtype, eps=eps, polar=polar,
      ns_sharding=ns_sharding)
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
    weight_decay: float = 0.1,
    weight_decay_mask: Any = None,
    ns_steps: int = 5,
    ns_coeffs: _newton_schulz.Coeffs = _newton_schulz.DEFAULT_NS_COEFFS,
    ns_dtype: Any = 'auto',
    eps: float = 1e-8,
    consistent_rms: float | None = 0.2,
    mu_dtype: Any = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float | None = None,
    adam_weight_decay_mask: Any = None,
    adam_nesterov: bool = False,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    param_labels: _groups.LabelSpec = None,
    weight_dimension_numbers: _matrix.DimSpec = None,
    ns_sharding: str = 'batch',
    polar: str = 'newton_schulz',
) -> optax.GradientTransformationExtraArgs:
  """The D-Muon baseline: `scale_by_dmuon` on hidden leaves, AdamW elsewhere.

  Args:
    learning_rate: a float or a schedule; the same for both parts unless
      `adam_learning_rate` is given.
    beta, nesterov, ns_steps, ns_coeffs, ns_dtype, eps, consistent_rms,
      mu_dtype, weight_dimension_numbers, ns_sharding, polar: see
      `scale_by_dmuon`.
    weight_decay: decoupled weight decay of hidden matrices (times the
      learning rate, as in optax).
    weight_decay_mask: optax mask (callable or tree over the hidden leaves).
    adam_b1, adam_b2, adam_eps, adam_eps_root, adam_nesterov: AdamW options
      of the other leaves.
    adam_weight_decay: their weight decay (None: `weight_decay`).
    adam_weight_decay_mask: optax mask for it.
    adam_learning_rate: their learning rate (None: `learning_rate`).
    param_labels: group labels (None: `param_groups`), a callable params ->
      labels or a label tree; 'hidden' leaves get D-Muon, 'embed_head' and
      'vector' AdamW.

  Returns:
    An optax.GradientTransformationExtraArgs.
  """
  if adam_learning_rate is None:
    adam_learning_rate = learning_rate
  if adam_weight_decay is None:
    adam_weight_decay = weight_decay
  rename = {_groups.HIDDEN: 'dmuon', _groups.EMBED_HEAD: 'adam',
            _groups.VECTOR: 'adam'}

  def partition_labels(params):
    return _groups.label_tree(params, param_labels, rename=rename)

  return optax.partition(
      transforms={
          'dmuon': optax.chain(
              scale_by_dmuon(
                  beta=beta, nesterov=nesterov, ns_steps=ns_steps,
                  ns_coeffs=ns_coeffs, ns_dtype=ns_dtype, eps=eps,
                  consistent_rms=consistent_rms, mu_dtype=mu_dtype,
                  weight_dimension_numbers=weight_dimension_numbers,
                  ns_sharding=ns_sharding, polar=polar),
              optax.add_decayed_weights(weight_decay, weight_decay_mask),
              optax.scale_by_learning_rate(learning_rate),
          ),
          'adam': optax.adamw(
              learning_rate=adam_learning_rate, b1=adam_b1, b2=adam_b2,
              eps=adam_eps, eps_root=adam_eps_root,
              weight_decay=adam_weight_decay, mask=adam_weight_decay_mask,
              mu_dtype=mu_dtype, nesterov=adam_nesterov),
      },
      param_labels=partition_labels,
  )
