"""Global-norm clipping that also clips the independent noise gradient `noise_grads`.

optax.chain hands every transformation the same extra arguments: a
`clip_by_global_norm` chained before LANTON (or `noise_adaptive`) clips G
while the independent gradient G~ of noise='independent' reaches the noise
estimate unclipped, so on a clipped step D = G - G~ measures the clip factor
rather than the noise. `clip_by_global_norm(max_norm, inner)` clips both and
hands both to `inner`.
"""

from typing import Any

import optax


def _clip(tree: Any, max_norm: float) -> Any:
  return optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())[0]


def clip_by_global_norm(
  max_norm: float, inner: optax.GradientTransformation | None = None
) -> optax.GradientTransformationExtraArgs:
  """Clips the gradient and the extra argument `noise_grads`, each by its own global norm.

  Both go through the same function, `optax.clip_by_global_norm(max_norm)`:
  x -> x * min(1, max_norm / ||x||) with ||x|| the global l2 norm of that
  tree. Each tree by its own norm, not by G's factor: G~ is a gradient
  drawn like G, so it must be the gradient the optimizer would have been
  given had its minibatch been drawn, exactly as the practical estimate's
  G~ = G_{t-1} is the previous step's gradient after that step's own clip.
  D = clip(G) - clip(G~) is then a noise sample of the clipped gradients the
  optimizer steps on (and zero when G~ = G). One factor for both would be
  G's, so a G~ much larger than G would stay larger than the clip allows.

  Args:
    max_norm: the largest global norm let through (> 0).
    inner: the transformation that gets the clipped gradient and the clipped
      `noise_grads` (with the other extra arguments). None: clip only, like
      `optax.clip_by_global_norm`, for use in `optax.chain`; since a chain
      cannot hand a clipped `noise_grads` on, its update then refuses
      `noise_grads`.

  Returns:
    An optax.GradientTransformationExtraArgs. With `inner`, its state is
    `(optax.EmptyState(), inner_state)`, the state of
    `optax.chain(optax.clip_by_global_norm(max_norm), inner)`, so checkpoints
    of one restore into the other.
  """
  if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
    raise ValueError(f'max_norm must be a number > 0, got {max_norm!r}')
  if inner is not None:
    if not isinstance(inner, optax.GradientTransformation):
      raise TypeError(f'inner must be an optax.GradientTransformation or None, got {inner!r}')
    inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if inner is None:
      return optax.EmptyState()
    return (optax.EmptyState(), inner.init(params))

  def update_fn(updates, state, params=None, *, noise_grads=None, **extra_args):
    clipped = _clip(updates, max_norm)
    if inner is None:
      if noise_grads is not None:
        raise ValueError(
          'clip_by_global_norm(max_norm) without `inner` cannot clip noise_grads for the '
          'transformations after it in a chain; use clip_by_global_norm(max_norm, inner)'
        )
      return clipped, state
    if noise_grads is not None:
      extra_args['noise_grads'] = _clip(noise_grads, max_norm)
    out, inner_state = inner.update(clipped, state[1], params, **extra_args)
    return out, (state[0], inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
