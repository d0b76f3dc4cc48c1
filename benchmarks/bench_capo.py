r"""Overhead of the CAPO mask on the RL update step of the reference decoder.

  python benchmarks/bench_capo.py                                  # tiny, CPU-sized
  python benchmarks/bench_capo.py --model=small --batch_size=32 --completion_len=512   # GPU

Times, side by side in one process (interleaved repetitions, median), two jit'd
update steps on the same batch of prompt + completion tokens:
  - grpo: forward, policy_loss (seq-mean-token-mean), backward, Adam update;
  - capo: the same forward, then capo_token_set (each token's top-K set, once)
    and capo_token_stats on its final hidden states,
    capo_mask times the completion mask inside the loss, the backward through
    the same forward (jax.vjp, so no second forward), the Adam update, and
    capo_shadow_update on the kept tokens.
and prints their time ratio (target <= 1.03, the paper's overhead being under
3% of the step on a 7B model) and the masked-token fraction.
"""

import functools

import _timing  # benchmarks/_timing.py, beside this script
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvopt import models
from curvopt import rl

_MODEL = flags.DEFINE_string('model', 'tiny', 'Decoder preset (tiny, small, gpt2s).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Completions per update step.')
_PROMPT = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens per sequence.')
_COMPLETION = flags.DEFINE_integer('completion_len', 128, 'Completion tokens per sequence.')
_TOP_K = flags.DEFINE_integer('top_k', 50, 'CAPO top-K.')
_CHUNK = flags.DEFINE_integer('chunk_size', 256, 'CAPO tokens per chunk.')
_LR = flags.DEFINE_float('lr', 1e-5, 'Learning rate (also the lr CAPO models).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per repetition.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved repetitions; the median is reported.')


def _completion_logp_hidden(model, params, tokens, prompt_len):
  """Log-probs of the completion tokens and the hidden states producing them.

  The logits at position i produce token i + 1, so completion token t (at
  prompt_len + t) comes from position prompt_len + t - 1.
  """
  logits, hidden = model.apply({'params': params}, tokens[:, :-1])
  logits, hidden = logits[:, prompt_len - 1 :], hidden[:, prompt_len - 1 :]
  targets = tokens[:, prompt_len:]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  return logp, hidden


def make_steps(model, cfg, optimizer, prompt_len):
  """(grpo_step, capo_step), each (params, opt_state[, shadow], batch) -> new state."""
  forward = functools.partial(_completion_logp_hidden, model, prompt_len=prompt_len)
  loss_kwargs = dict(agg='seq-mean-token-mean')

  def grpo_step(params, opt_state, batch):
    def loss_fn(p):
      logp, _ = forward(p, batch['tokens'])
      return rl.policy_loss(
        logp, batch['old_logp'], batch['advantages'], batch['mask'], **loss_kwargs
      )

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def capo_step(params, opt_state, shadow, batch):
    (logp, hidden), vjp_fn = jax.vjp(lambda p: forward(p, batch['tokens']), params)
    actions = batch['tokens'][:, prompt_len:]
    head = jax.lax.stop_gradient(models.output_head(params, cfg))
    hidden = jax.lax.stop_gradient(hidden)
    options = dict(top_k=_TOP_K.value, chunk_size=_CHUNK.value)
    token_set = rl.capo_token_set(hidden, head, actions, **options)
    m_h, m_f = rl.capo_token_stats(
      hidden, head, actions, batch['advantages'], shadow, _LR.value, token_set=token_set, **options
    )
    keep = rl.capo_mask(m_h, m_f) & batch['mask']

    def loss_of_logp(lp):
      return rl.policy_loss(lp, batch['old_logp'], batch['advantages'], keep, **loss_kwargs)

    (loss, _), dlogp = jax.value_and_grad(loss_of_logp, has_aux=True)(logp)
    (grads,) = vjp_fn((dlogp, jnp.zeros_like(hidden)))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    shadow = rl.capo_shadow_update(
      shadow, hidden, head, actions, batch['advantages'], keep, token_set=token_set, **options
    )
    masked = 1.0 - jnp.sum(keep) / jnp.maximum(jnp.sum(batch['mask']), 1)
    return optax.apply_updates(params, updates), opt_state, shadow, (loss, masked)

  return (jax.jit(grpo_step, donate_argnums=(0, 1)), jax.jit(capo_step, donate_argnums=(0, 1, 2)))


def main(argv):
  del argv
  batch, prompt_len, completion_len = _BATCH.value, _PROMPT.value, _COMPLETION.value
  seq_len = prompt_len + completion_len
  dtype = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  cfg = models.model_config(_MODEL.value, dtype=dtype, max_len=seq_len)
  model = models.Decoder(cfg)
  optimizer = optax.adam(_LR.value)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len)), jnp.int32)

  def init():
    return model.init(jax.random.key(0), tokens[:, :-1])['params']

  params = jax.jit(init)()
  n_params = models.count_params(params)
  old_logp, hidden = jax.jit(
    functools.partial(_completion_logp_hidden, model, prompt_len=prompt_len)
  )(params, tokens)
  lengths = rng.integers(completion_len // 4, completion_len + 1, batch)
  batch_data = {
    'tokens': tokens,
    'old_logp': old_logp,
    'advantages': rl.group_advantages(
      jnp.asarray(rng.integers(0, 2, batch), jnp.float32), min(8, batch)
    ),
    'mask': jnp.asarray(np.arange(completion_len)[None] < lengths[:, None]),
  }
  grpo_step, capo_step = make_steps(model, cfg, optimizer, prompt_len)
  holders = {
    'grpo': [params, optimizer.init(params)],
    'capo': [
      jax.tree.map(jnp.copy, params),
      optimizer.init(params),
      rl.capo_shadow_init(cfg.vocab_size, cfg.d_model),
    ],
  }
  masked = []

  def run_grpo():
    state = holders['grpo']
    state[0], state[1], loss = grpo_step(state[0], state[1], batch_data)
    return loss

  def run_capo():
    state = holders['capo']
    state[0], state[1], state[2], (loss, frac) = capo_step(*state, batch_data)
    masked.append(frac)
    return loss

  jax.block_until_ready((run_grpo(), run_capo()))  # compile
  times = {'grpo': [], 'capo': []}
  for _ in range(_REPEATS.value):
    times['grpo'].append(_timing.seconds_per_call(run_grpo, _STEPS.value))
    times['capo'].append(_timing.seconds_per_call(run_capo, _STEPS.value))
  t_grpo, t_capo = np.median(times['grpo']), np.median(times['capo'])
  print(
    f'backend {jax.default_backend()}, device {jax.devices()[0].device_kind}; model '
    f'{_MODEL.value} ({n_params / 1e6:.2f}M params, vocab {cfg.vocab_size}, '
    f'{dtype}), batch {batch} x ({prompt_len} prompt + {completion_len} completion), '
    f'top_k {_TOP_K.value}, chunk {_CHUNK.value}; median of {_REPEATS.value} x '
    f'{_STEPS.value} steps'
  )
  print(
    f'update step  grpo {1e3 * t_grpo:8.2f} ms   capo {1e3 * t_capo:8.2f} ms   '
    f'capo/grpo time ratio {t_capo / t_grpo:.3f}   masked tokens '
    f'{100 * float(np.mean(masked)):.2f}%',
    flush=True,
  )


if __name__ == '__main__':
  app.run(main)
