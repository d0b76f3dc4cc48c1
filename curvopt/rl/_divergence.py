"""Full-distribution entropy and KL of next-token distributions, per position."""

import jax
import jax.numpy as jnp


def categorical_entropy(logits: jax.Array) -> jax.Array:
  """H(softmax(logits)) over the last axis, in float32 (logits or log-probs alike)."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def categorical_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis, in float32.

  Both arguments are logits (or log-probs) of the same shape [..., V]; the result is [...].
  Tokens p gives zero probability contribute 0, whatever q gives them.
  """
  p_logits, q_logits = jnp.asarray(p_logits), jnp.asarray(q_logits)
  if p_logits.shape != q_logits.shape:
    raise ValueError(
      f'p_logits and q_logits must share a shape, got {p_logits.shape} and {q_logits.shape}'
    )
  logp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
