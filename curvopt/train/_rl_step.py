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


def completion_logits(apply_fn: ApplyFn, params, batch):
  """(logits [N, L, V] float32, hidden [N, L, H]) at the positions producing the completion.

  The logits at position i produce token i + 1, so completion token t (at P + t) is read from
  position P + t - 1, and so is the hidden state CAPO needs.
  """
  completion_len = batch['completion_mask'].shape[1]
  prompt_len = batch['tokens'].shape[1] - completion_len
  logits, hidden = apply_fn(
    params, batch['tokens'][:, :-1], batch['positions'][:, :-1], batch['attention_mask'][:, :-1]
  )
  return logits[:, prompt_len - 1 :].astype(jnp.float32), hidden[:, prompt_len - 1 :]


def completion_logprobs(apply_fn: ApplyFn, params, batch):
  """(logp [N, L], (hidden [N, L, H], entropy [N, L])) of the completion tokens."""
  logits, hidden = completion_logits(apply_fn, params, batch)
  logp_all = jax.nn.log_softmax(logits)
  prompt_len = batch['tokens'].shape[1] - logits.shape[1]
  actions = batch['tokens'][:, prompt_len:]
  logp = jnp.take_along_axis(logp_all, actions[..., None], -1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, (hidden, entropy)


def probe_metrics(logits, start_logits, mask) -> dict[str, jax.Array]:
  """How far the policy moved on a fixed probe batch, as means over its valid tokens.

  'probe/entropy': the next-token entropy of `logits` (a flattening distribution raises it
  long before greedy accuracy moves); 'probe/kl_to_start': KL(start || now) of the full
  next-token distributions, `start_logits` being the starting policy's on the same batch.
  """
  weight = (jnp.asarray(mask) > 0).astype(jnp.float32)
  total = jnp.maximum(weight.sum(), 1.0)
  return {
    'probe/entropy': jnp.sum(rl.categorical_entropy(logits) * weight) / total,
    'probe/kl_to_start': jnp.sum(rl.categorical_kl(start_logits, logits) * weight) / total,
  }


# What the step does with the tokens: the plain loss, CAPO's mask, a random mask at a fixed rate,
# or CAPO's stats computed, logged and returned per token without masking (calibration).
MASK_MODES = ('off', 'capo', 'random', 'log')


def make_rl_step(
  apply_fn: ApplyFn,
  head_fn: HeadFn,
  optimizer: optax.GradientTransformation,
  *,
  learning_rate: Callable[[jax.Array], jax.Array],
  loss_options: dict,
  capo_options: Optional[dict] = None,
  grad_clip_norm: Optional[float] = None,
  mask_mode: Optional[str] = None,
  random_rate: Optional[float] = None,
  random_seed: int = 0,
):
  """Returns step(state, batch) -> (state, metrics), pure and ready for jax.jit.

  `batch`: the `rollout_batch` dict plus 'advantages' [N] and, for a KL penalty, 'ref_logp'
  [N, L]. One gradient step per rollout batch, so old_logp is the current policy's (the ratio
  is exactly 1 and the clip fractions 0, as in TRL with one iteration).
  `mask_mode` (None: 'capo' with `capo_options`, else 'off'):
    'capo': with `capo_options` (tau_H, tau_F, symmetric, top_k, b1, b2, eps, chunk_size)
      tokens whose predicted objective / policy change is too large leave the loss, and the
      shadow Adam advances on the kept ones;
    'log': CAPO's stats and shadow as in 'capo', but no token leaves the loss; the metrics
      say what the thresholds would mask, and metrics['capo_tokens'] holds the per-token
      {'m_H', 'm_F'} [N, L] (pop it before averaging metrics);
    'random': `rl.random_mask` drops `random_rate` of the tokens with A != 0, its key
      folded from `random_seed` and the step count (so a resumed run draws the same);
    'off': every completion token enters the loss.
  Every masking mode logs the masked shares over A != 0 tokens by the sign of A. With
  `grad_clip_norm` (the clip inside `optimizer`) the metric 'grad_clipped' is 1.0 on steps
  whose gradient it scales down, else 0.0.
  """
  if mask_mode is None:
    mask_mode = 'capo' if capo_options is not None else 'off'
  if mask_mode not in MASK_MODES:
    raise ValueError(f'unknown mask_mode {mask_mode!r}; valid: {list(MASK_MODES)}')
  use_capo = mask_mode in ('capo', 'log')
  if use_capo and capo_options is None:
    raise ValueError(f'mask_mode {mask_mode!r} needs capo_options (thresholds, top_k, ...)')
  if mask_mode == 'random' and (random_rate is None or not 0.0 <= random_rate <= 1.0):
    raise ValueError(f"mask_mode 'random' needs random_rate in [0, 1], got {random_rate!r}")
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
    loss_mask = mask
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
      metrics.update(rl.capo_metrics(m_h, m_f, keep, mask, advantages=advantages))
      if mask_mode == 'capo':
        loss_mask = keep.astype(jnp.float32)
      else:
        metrics['capo_tokens'] = {'m_H': m_h, 'm_F': m_f}
    elif mask_mode == 'random':
      key = jax.random.fold_in(jax.random.key(random_seed), state.step)
      keep = rl.random_mask(key, mask, advantages, rate=random_rate)
      metrics.update(rl.masked_shares(keep, mask, advantages))
      loss_mask = keep.astype(jnp.float32)
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
