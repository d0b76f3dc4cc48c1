"""The pure, jit-ready policy-gradient update of the RL trainer (GRPO family, optional CAPO)."""

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from curvopt import rl

# (params, tokens_NxS, positions_NxS, attention_mask_NxS) -> (logits_NxSxV, hidden_NxSxH)
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# params -> the output head as [V, H] (rows = vocabulary ids)
HeadFn = Callable[[Any], jax.Array]


@flax.struct.dataclass
class RLState:
  step: jax.Array  # int32 scalar: policy updates so far
  params: Any
  opt_state: Any
  shadow: rl.CapoShadow  # CAPO's shadow Adam over the head rows (zeros when CAPO is off)


def rollout_batch(prompts_NxP, prompt_mask_NxP, completions_NxL, completion_mask_NxL):
  """The update's inputs: [prompt ; completion] tokens, their attention mask and positions.

  Positions count real tokens from 0, as the sampler's did, so the update's forward sees the
  completion exactly where sampling produced it.
  """
  tokens = jnp.concatenate([prompts_NxP, completions_NxL], axis=1)
  mask = jnp.concatenate(
    [prompt_mask_NxP.astype(jnp.int32), (completion_mask_NxL > 0).astype(jnp.int32)], axis=1
  )
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  return {
    'tokens': tokens,
    'attention_mask': mask,
    'positions': positions,
    'completion_mask': completion_mask_NxL.astype(jnp.float32),
  }


def completion_logprobs(apply_fn: ApplyFn, params, batch):
  """(logp [N, L], (hidden [N, L, H], entropy [N, L])) of the completion tokens.

  The logits at position i produce token i + 1, so completion token t (at P + t) is read from
  position P + t - 1, and so is the hidden state CAPO needs.
  """
  completion_len = batch['completion_mask'].shape[1]
  prompt_len = batch['tokens'].shape[1] - completion_len
  logits, hidden = apply_fn(
    params, batch['tokens'][:, :-1], batch['positions'][:, :-1], batch['attention_mask'][:, :-1]
  )
  logits = logits[:, prompt_len - 1 :].astype(jnp.float32)
  hidden = hidden[:, prompt_len - 1 :]
  logp_all = jax.nn.log_softmax(logits)
  actions = batch['tokens'][:, prompt_len:]
  logp = jnp.take_along_axis(logp_all, actions[..., None], -1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, (hidden, entropy)


def make_rl_step(
  apply_fn: ApplyFn,
  head_fn: HeadFn,
  optimizer: optax.GradientTransformation,
  *,
  learning_rate: Callable[[jax.Array], jax.Array],
  loss_options: dict,
  capo_options: Optional[dict] = None,
  grad_clip_norm: Optional[float] = None,
):
  """Returns step(state, batch) -> (state, metrics), pure and ready for jax.jit.

  `batch`: the `rollout_batch` dict plus 'advantages' [N] and, for a KL penalty, 'ref_logp'
  [N, L]. One gradient step per rollout batch, so old_logp is the current policy's (the ratio
  is exactly 1 and the clip fractions 0, as in TRL with one iteration).
  With `capo_options` (tau_H, tau_F, symmetric, top_k, b1, b2, eps, chunk_size) tokens whose
  predicted objective / policy change is too large leave the loss, and the shadow Adam advances
  on the kept ones. With `grad_clip_norm` (the clip inside `optimizer`) the metric
  'grad_clipped' is 1.0 on steps whose gradient it scales down, else 0.0.
  """
  use_capo = capo_options is not None
  stats_options = dict(capo_options or {})
  mask_options = {
    k: stats_options.pop(k) for k in ('tau_H', 'tau_F', 'symmetric') if k in stats_options
  }
  shadow_options = {k: v for k, v in stats_options.items() if k != 'eps'}

  def step(state: RLState, batch):
    (logp, vjp_fn, (hidden, entropy)) = jax.vjp(
      lambda p: completion_logprobs(apply_fn, p, batch), state.params, has_aux=True
    )
    mask = batch['completion_mask']
    advantages = batch['advantages']
    metrics = {}
    shadow = state.shadow
    lr = learning_rate(state.step)
    if use_capo:
      hidden = jax.lax.stop_gradient(hidden).astype(jnp.float32)
      head = jax.lax.stop_gradient(head_fn(state.params)).astype(jnp.float32)
      prompt_len = batch['tokens'].shape[1] - mask.shape[1]
      actions = batch['tokens'][:, prompt_len:]
      set_options = {k: v for k, v in stats_options.items() if k in ('top_k', 'chunk_size')}
      token_set = rl.capo_token_set(hidden, head, actions, **set_options)
      m_h, m_f = rl.capo_token_stats(
        hidden, head, actions, advantages, shadow, lr, token_set=token_set, **stats_options
      )
      keep = rl.capo_mask(m_h, m_f, **mask_options) & (mask > 0)
      metrics.update(rl.capo_metrics(m_h, m_f, keep, mask))
      loss_mask = keep.astype(jnp.float32)
    else:
      loss_mask = mask
    old_logp = jax.lax.stop_gradient(logp)

    def loss_of_logp(lp):
      return rl.policy_loss(
        lp,
        old_logp,
        advantages,
        loss_mask,
        ref_logp=batch.get('ref_logp'),
        entropy=jax.lax.stop_gradient(entropy),
        **loss_options,
      )

    (loss, loss_metrics), dlogp = jax.value_and_grad(loss_of_logp, has_aux=True)(logp)
    (grads,) = vjp_fn(dlogp)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if use_capo:
      shadow = rl.capo_shadow_update(
        shadow,
        hidden,
        head,
        actions,
        advantages,
        loss_mask > 0,
        token_set=token_set,
        **shadow_options,
      )
    metrics.update(loss_metrics)
    metrics.update(
      loss=loss,
      grad_norm=optax.global_norm(grads),
      learning_rate=lr,
      update_norm=optax.global_norm(updates),
    )
    if grad_clip_norm:
      metrics['grad_clipped'] = 1.0 - (metrics['grad_norm'] < grad_clip_norm).astype(jnp.float32)
    return RLState(step=state.step + 1, params=params, opt_state=opt_state, shadow=shadow), metrics

  return step
