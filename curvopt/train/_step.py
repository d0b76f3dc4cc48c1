"""Pure train and eval steps for next-token prediction, built once and jit'd by the caller."""

from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from curvopt.train import _state

# (params, tokens_BxT) -> logits_BxTxV
LogitsFn = Callable[[Any, jax.Array], jax.Array]


def lm_loss(
  logits_BxTxV: jax.Array, targets_BxT: jax.Array, pad_id: int
) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over non-pad targets, in fp32; returns (loss, token count)."""
  return masked_lm_loss(logits_BxTxV, targets_BxT, (targets_BxT != pad_id).astype(jnp.float32))


def masked_lm_loss(
  logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy averaged over targets with weight 1 (e.g. completion tokens), in fp32."""
  weights_BxT = weights_BxT.astype(jnp.float32)
  losses_BxT = optax.softmax_cross_entropy_with_integer_labels(
    logits_BxTxV.astype(jnp.float32), targets_BxT
  )
  count = weights_BxT.sum()
  return (losses_BxT * weights_BxT).sum() / jnp.maximum(count, 1.0), count


def _batch_loss(logits_fn: LogitsFn, params, batch, pad_id: int):
  """(loss, count) of a batch: tokens_BxTp1, or {'tokens', 'loss_mask'} (both [B, T + 1],
  the mask aligned with the tokens, so targets tokens[:, 1:] are weighted by mask[:, 1:])."""
  if isinstance(batch, Mapping):
    tokens_BxTp1 = batch['tokens']
    return masked_lm_loss(
      logits_fn(params, tokens_BxTp1[:, :-1]), tokens_BxTp1[:, 1:], batch['loss_mask'][:, 1:]
    )
  return lm_loss(logits_fn(params, batch[:, :-1]), batch[:, 1:], pad_id)


def grad_clipped(grad_norm: jax.Array, max_norm: float) -> jax.Array:
  """1.0 where optax.clip_by_global_norm(max_norm) scales a gradient of this norm down."""
  return 1.0 - (grad_norm < max_norm).astype(jnp.float32)


def make_init_state(model, optimizer: optax.GradientTransformation, *, seq_len: int):
  """Returns init(rng) -> TrainState for a flax `model` that maps tokens_BxT to (logits, ...)."""

  def init_state(rng: jax.Array) -> _state.TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    return _state.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=jax.random.key_data(state_rng),
    )

  return init_state


def make_train_step(
  logits_fn: LogitsFn,
  optimizer: optax.GradientTransformation,
  *,
  pad_id: int,
  learning_rate: Callable[[jax.Array], jax.Array],
  optimizer_stats: Optional[Callable[[Any], dict]] = None,
  grad_clip_norm: Optional[float] = None,
):
  """Returns step(state, batch) -> (state, metrics), pure and ready for jax.jit.

  `batch` is tokens_BxTp1 (loss on every non-pad target) or a dict with 'tokens' and a
  'loss_mask' aligned with them (loss on targets tokens[:, 1:] where loss_mask[:, 1:] is 1,
  e.g. completion tokens only; other keys are ignored).
  `optimizer_stats(opt_state)` adds optimizer-specific scalars (e.g. LANTON's per-layer
  learning-rate scales) to the metrics. With `grad_clip_norm` (the global-norm clip inside
  `optimizer`) the metric 'grad_clipped' is 1.0 on steps whose gradient it scales down (global
  norm >= grad_clip_norm, optax's rule), else 0.0: its mean is the fraction of clipped steps.
  """

  def train_step(state: _state.TrainState, batch):

    def loss_fn(params):
      return _batch_loss(logits_fn, params, batch, pad_id)[0]

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      'loss': loss,
      'grad_norm': optax.global_norm(grads),
      'update_norm': optax.global_norm(updates),
      'param_norm': optax.global_norm(params),
      'learning_rate': learning_rate(state.step),
    }
    if grad_clip_norm:
      metrics['grad_clipped'] = grad_clipped(metrics['grad_norm'], grad_clip_norm)
    if optimizer_stats is not None:
      metrics.update(optimizer_stats(opt_state))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(logits_fn: LogitsFn, *, pad_id: int):
  """Returns eval_step(params, batch) -> (summed loss, token count), for exact averaging.

  `batch` as in make_train_step: tokens_BxTp1 or {'tokens', 'loss_mask'}.
  """

  def eval_step(params, batch):
    loss, count = _batch_loss(logits_fn, params, batch, pad_id)
    return loss * count, count

  return eval_step
