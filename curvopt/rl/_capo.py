"""CAPO: per-token curvature statistics, the token mask and the shadow Adam.

Melo, Abate, Gal, "Stabilizing Policy Gradients for Sample-Efficient
Reinforcement Learning in LLM Reasoning" (arXiv 2510.00819). The
second-order model covers the output head only: a token's
gradient w.r.t. the head rows of its top-K set S is g = A outer(e_a - pi, h),
its predicted step d is the Adam direction of g under a shadow Adam state, and
m_H / m_F predict the change of the objective / policy if that step is taken.

Position convention: `hidden[b, t]` is the final (normed) hidden state at the
position whose logits PRODUCE `actions[b, t]` (the logits row that
`logp[b, t]` was read from). The reference implementation takes the hidden
state one position later, an off-by-one we do not reproduce.

Memory: the [K, H] per-token tensors (g, the shadow rows, d) are only ever
built for one chunk of about `chunk_size` tokens at a time (lax.map over
chunks of the time axis, vmap over the tokens of a chunk), never for the
whole [B, T, K, H] batch. Chunks run along T and span the whole batch axis,
so a batch sharded over a data-parallel mesh axis stays sharded.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from curvopt.rl import _sharding

_HIGHEST = jax.lax.Precision.HIGHEST


class CapoShadow(NamedTuple):
  """The shadow Adam state (M, V, s) of CAPO over the head's rows.

  Attributes:
    mu: [V, H] float32 first moments (M).
    nu: [V, H] float32 second moments (V).
    count: int32 scalar, the number of shadow updates so far (s).
  """

  mu: jax.Array
  nu: jax.Array
  count: jax.Array


def capo_shadow_init(vocab_size: int, hidden_size: int) -> CapoShadow:
  """A fresh shadow state (zeros, s = 0) for a [vocab, hidden] head."""
  for name, value in (('vocab_size', vocab_size), ('hidden_size', hidden_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f'{name} must be an int, got {value!r}')
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  # Two buffers, not one shared: callers donate the state to jit'd steps.
  shape = (vocab_size, hidden_size)
  return CapoShadow(
    mu=jnp.zeros(shape, jnp.float32),
    nu=jnp.zeros(shape, jnp.float32),
    count=jnp.zeros((), jnp.int32),
  )


def _check_int_option(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {value!r}')


def _check_tokens(hidden, head, actions, top_k, chunk_size):
  """Validates the inputs every CAPO function takes; returns jnp arrays."""
  hidden, head, actions = (jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(actions))
  if hidden.ndim != 3:
    raise ValueError(f'hidden must be [B, T, H], got shape {hidden.shape}')
  batch, length, width = hidden.shape
  if head.ndim != 2 or head.shape[1] != width:
    raise ValueError(
      f'head must be [V, H] = [vocab, {width}] (rows = vocabulary ids; '
      f'pass the transpose of an [H, V] kernel), got shape {head.shape}'
    )
  vocab = head.shape[0]
  if actions.shape != (batch, length):
    raise ValueError(f'actions must be [B, T] = {(batch, length)}, got shape {actions.shape}')
  if not jnp.issubdtype(actions.dtype, jnp.integer):
    raise TypeError(f'actions must be integer ids, got dtype {actions.dtype}')
  _check_int_option('top_k', top_k)
  if not 1 <= top_k <= vocab:
    raise ValueError(f'top_k must be in [1, vocab={vocab}], got {top_k}')
  _check_int_option('chunk_size', chunk_size)
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  return hidden, head, actions


def _check_inputs(
  hidden, head, actions, advantages, shadow, top_k, chunk_size, token_set, mask=None
):
  """Validates the stats' / shadow update's inputs; returns jnp arrays."""
  hidden, head, actions = _check_tokens(hidden, head, actions, top_k, chunk_size)
  batch, length, width = hidden.shape
  vocab = head.shape[0]
  advantages = jnp.asarray(advantages)
  if advantages.shape != (batch,):
    raise ValueError(f'advantages must be [B] = {(batch,)}, got shape {advantages.shape}')
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != (batch, length):
      raise ValueError(f'mask must be [B, T] = {(batch, length)}, got shape {mask.shape}')
  if token_set is not None:
    token_set = jnp.asarray(token_set)
    if token_set.shape != (batch, length, top_k):
      raise ValueError(
        f'token_set must be [B, T, top_k] = '
        f'{(batch, length, top_k)} (capo_token_set with the '
        f'same top_k), got shape {token_set.shape}'
      )
    if not jnp.issubdtype(token_set.dtype, jnp.integer):
      raise TypeError(f'token_set must be integer ids, got dtype {token_set.dtype}')
  if not isinstance(shadow, CapoShadow):
    raise TypeError(f'shadow must be a CapoShadow, got {type(shadow).__name__}')
  for name in ('mu', 'nu'):
    leaf = getattr(shadow, name)
    if leaf.shape != (vocab, width):
      raise ValueError(
        f"shadow.{name} has shape {leaf.shape}, expected the head's [V, H] = {(vocab, width)}"
      )
  return hidden, head, actions, advantages, mask, token_set


def _chunked(x_BxT: jax.Array, steps: int, batch: int, positions: int):
  """[B, T, ...] -> [n, B * positions, ...], T zero-padded to n * positions."""
  pad = steps * positions - x_BxT.shape[1]
  x_BxT = jnp.pad(x_BxT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxT.ndim - 2))
  x = x_BxT.reshape((batch, steps, positions) + x_BxT.shape[2:])
  x = jnp.moveaxis(x, 1, 0)
  return x.reshape((steps, batch * positions) + x_BxT.shape[2:])


def _unchunked(x: jax.Array, batch: int, length: int) -> jax.Array:
  """Inverse of `_chunked` for [n, B * positions, ...] results."""
  steps, rest = x.shape[0], x.shape[2:]
  x = jnp.moveaxis(x.reshape((steps, batch, -1) + rest), 0, 1)
  return x.reshape((batch, -1) + rest)[:, :length]


def _chunk_plan(batch: int, length: int, chunk_size: int) -> tuple[int, int]:
  """(chunks, positions per chunk): a chunk holds B * positions tokens."""
  positions = max(1, min(length, chunk_size // batch))
  return -(-length // positions), positions


def _chunks(batch, length, chunk_size, *arrays):
  """Each [B, T, ...] array (or None) as [n, C, ...] chunks of tokens."""
  steps, positions = _chunk_plan(batch, length, chunk_size)
  return tuple(None if x is None else _chunked(x, steps, batch, positions) for x in arrays)


def _chunk_ids(h_CxH, a_C, ids_CxK, head_VxH, top_k):
  """S of each token of a chunk: the given token set's, or computed."""
  if ids_CxK is not None:
    return ids_CxK.astype(jnp.int32)
  return jax.vmap(_top_k_ids, in_axes=(0, None, 0, None))(h_CxH, head_VxH, a_C, top_k)


def _top_k_ids(h_H, head_VxH, action, top_k):
  """S: the K largest logits' ids (descending), the action forced in."""
  logits_V = jnp.dot(head_VxH, h_H, precision=_HIGHEST)
  # The barrier keeps XLA's TopK: when the indices feed the update below,
  # XLA CPU otherwise lowers top_k to a full sort of the V logits (6x slower).
  _, ids_K = jax.lax.optimization_barrier(jax.lax.top_k(logits_V, top_k))
  in_set = jnp.any(ids_K == action)
  # Sampling uses the same top-K, so the action is in S; otherwise it replaces
  # the lowest member (top_k sorts in descending order).
  return ids_K.at[top_k - 1].set(jnp.where(in_set, ids_K[top_k - 1], action))


def _set_probs(h_H, head_VxH, action, ids_K):
  """pi over S and v = e_a - pi, from S's own K logits (so that a given
  `token_set` and one computed here give the same numbers)."""
  logits_K = jnp.dot(head_VxH[ids_K], h_H, precision=_HIGHEST)
  pi_K = jax.nn.softmax(logits_K)
  onehot_K = (ids_K == action).astype(jnp.float32)
  return pi_K, onehot_K - pi_K


def _token_stats(h_H, action, adv, ids_K, lr, head_VxH, shadow, b1, b2, eps):
  """(m_H, m_F) of one token: CAPO's per-token quantities."""
  pi_K, v_K = _set_probs(h_H, head_VxH, action, ids_K)
  g_KxH = adv * v_K[:, None] * h_H[None, :]
  step = shadow.count.astype(jnp.float32) + 1.0
  m_hat = (b1 * shadow.mu[ids_K] + (1.0 - b1) * g_KxH) / (1.0 - b1**step)
  v_hat = (b2 * shadow.nu[ids_K] + (1.0 - b2) * g_KxH**2) / (1.0 - b2**step)
  adam_KxH = m_hat / (jnp.sqrt(v_hat) + eps)
  # A fresh shadow (s = 0) has no moments: the reference's step model is then
  # the plain gradient (d = g), not Adam's first-step sign(g).
  d_KxH = jnp.where(shadow.count == 0, g_KxH, adam_KxH)
  u_K = jnp.dot(d_KxH, h_H, precision=_HIGHEST)
  vu = jnp.dot(v_K, u_K, precision=_HIGHEST)
  pi_u = jnp.dot(pi_K, u_K, precision=_HIGHEST)
  fisher_quad = jnp.dot(pi_K, u_K**2, precision=_HIGHEST) - pi_u**2
  m_h = lr * adv * vu + 0.5 * lr**2 * adv * (vu**2 - fisher_quad)
  m_f = 0.5 * lr**2 * vu**2
  # A zero-advantage token has a zero gradient and moves nothing; its stats are
  # 0 so that every mask keeps it (CAPO keeps tokens with A = 0).
  zero_adv = adv == 0
  return jnp.where(zero_adv, 0.0, m_h), jnp.where(zero_adv, 0.0, m_f)


def capo_token_set(
  hidden: jax.Array,
  head: jax.Array,
  actions: jax.Array,
  *,
  top_k: int = 50,
  chunk_size: int = 256,
) -> jax.Array:
  """Each token's set S: the top_k ids of head @ h, the action forced in.

  `capo_token_stats` and `capo_shadow_update` compute S themselves (a [V]
  logit product and a top-k per token: most of CAPO's cost on a small
  model); a step that calls both can compute it once and pass it to both as
  `token_set`, with the same results.

  Args:
    hidden: [B, T, H], as in capo_token_stats.
    head: [V, H] output head, rows = vocabulary ids.
    actions: [B, T] token ids in [0, V).
    top_k: K.
    chunk_size: about how many tokens are processed at once.

  Returns:
    int32 [B, T, K]: ids in descending order of their logits, except that an
    action outside the top K takes the last place.
  """
  hidden, head, actions = _check_tokens(hidden, head, actions, top_k, chunk_size)
  batch, length, _ = hidden.shape
  if length == 0:
    return jnp.zeros((batch, 0, top_k), jnp.int32)
  spec_BxT = _sharding.spec_of(hidden)[:2]
  return _sharding.call_with_auto_axes(
    functools.partial(_token_set_chunked, top_k=top_k, chunk_size=chunk_size),
    (hidden, head, actions),
    lambda: PartitionSpec(*spec_BxT, None),
  )


def _token_set_chunked(hidden, head, actions, *, top_k, chunk_size):
  batch, length, _ = hidden.shape
  head_VxH = head.astype(jnp.float32)
  xs = _chunks(batch, length, chunk_size, hidden.astype(jnp.float32), actions.astype(jnp.int32))
  ids = jax.lax.map(lambda chunk: _chunk_ids(*chunk, None, head_VxH, top_k), xs)
  return _unchunked(ids, batch, length)


def capo_token_stats(
  hidden: jax.Array,
  head: jax.Array,
  actions: jax.Array,
  advantages: jax.Array,
  shadow: CapoShadow,
  lr: jax.Array,
  *,
  top_k: int = 50,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  chunk_size: int = 256,
  token_set: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """CAPO's predicted objective change m_H and policy change m_F per token.

  For token a at hidden state h (see the module docstring for the position),
  with S the top_k ids of the logits head @ h (a forced in), pi = softmax over
  S, v = e_a - pi, g = A outer(v, h), d the shadow-Adam direction of g (d = g
  while shadow.count == 0), u = d h:
    m_H = lr A (v.u) + 0.5 lr^2 A [(v.u)^2 - u^T (diag(pi) - pi pi^T) u]
    m_F = 0.5 lr^2 (v.u)^2
  Both are 0 for tokens with advantage 0. Everything is computed in float32
  (matmuls at HIGHEST precision) whatever the input dtypes. Padding tokens get
  stats like any other; the caller masks them.

  Args:
    hidden: [B, T, H] final normed hidden states; hidden[b, t] produces
      actions[b, t].
    head: [V, H] output head, rows = vocabulary ids (a tied embedding table
      as is; an untied Flax Dense kernel [H, V] must be passed transposed).
    actions: [B, T] sampled token ids in [0, V).
    advantages: [B] per-sequence advantages.
    shadow: the CapoShadow of `capo_shadow_init` / `capo_shadow_update`.
    lr: the real optimizer's current learning rate (scalar, may be traced).
    top_k: K, the size of the token set S.
    b1: shadow Adam's first-moment decay.
    b2: shadow Adam's second-moment decay.
    eps: shadow Adam's epsilon.
    chunk_size: about how many tokens are processed at once (at least B: a
      chunk spans the whole batch).
    token_set: None, or S of every token from `capo_token_set` (same
      hidden, head, actions and top_k), which is then not computed again.

  Returns:
    (m_H, m_F): float32 [B, T] each.
  """
  hidden, head, actions, advantages, _, token_set = _check_inputs(
    hidden, head, actions, advantages, shadow, top_k, chunk_size, token_set
  )
  batch, length, _ = hidden.shape
  if length == 0:
    empty = jnp.zeros((batch, 0), jnp.float32)
    return empty, empty
  spec_BxT = _sharding.spec_of(hidden)[:2]
  return _sharding.call_with_auto_axes(
    functools.partial(
      _token_stats_chunked, top_k=top_k, b1=b1, b2=b2, eps=eps, chunk_size=chunk_size
    ),
    (hidden, head, actions, advantages, shadow, jnp.asarray(lr), token_set),
    lambda: (PartitionSpec(*spec_BxT),) * 2,
  )


def _token_stats_chunked(
  hidden, head, actions, advantages, shadow, lr, token_set, *, top_k, b1, b2, eps, chunk_size
):
  """capo_token_stats after validation: lax.map over chunks of tokens."""
  batch, length, _ = hidden.shape
  head_VxH = head.astype(jnp.float32)
  shadow = CapoShadow(
    jnp.asarray(shadow.mu, jnp.float32),
    jnp.asarray(shadow.nu, jnp.float32),
    jnp.asarray(shadow.count, jnp.int32),
  )
  lr = jnp.asarray(lr, jnp.float32)
  adv_BxT = jnp.broadcast_to(advantages.astype(jnp.float32)[:, None], (batch, length))
  xs = _chunks(
    batch,
    length,
    chunk_size,
    hidden.astype(jnp.float32),
    actions.astype(jnp.int32),
    adv_BxT,
    token_set,
  )
  per_token = jax.vmap(_token_stats, in_axes=(0, 0, 0, 0, None, None, None, None, None, None))

  def chunk_fn(chunk):
    h_CxH, a_C, adv_C, ids_CxK = chunk
    ids_CxK = _chunk_ids(h_CxH, a_C, ids_CxK, head_VxH, top_k)
    return per_token(h_CxH, a_C, adv_C, ids_CxK, lr, head_VxH, shadow, b1, b2, eps)

  m_h, m_f = jax.lax.map(chunk_fn, xs)
  return _unchunked(m_h, batch, length), _unchunked(m_f, batch, length)


def capo_mask(
  m_H: jax.Array,  # pylint: disable=invalid-name
  m_F: jax.Array,  # pylint: disable=invalid-name
  *,
  tau_H: float = 0.01,  # pylint: disable=invalid-name
  tau_F: float = 1e-4,  # pylint: disable=invalid-name
  symmetric: bool = True,
) -> jax.Array:
  """Which tokens CAPO keeps: a bool array of the shape of m_H.

  Symmetric (default): -tau_H < m_H < tau_H and m_F < tau_F. Otherwise
  0 <= m_H < tau_H and m_F < tau_F. Non-finite stats are masked. Recipes:
  CAPO tau_H=0.01, tau_F=1e-4; Dr.CAPO 5e-4, 1e-3; ReinCAPO 0.1, 1e-5.
  Multiply the completion mask by it before the loss.

  Args:
    m_H: predicted objective change per token.
    m_F: predicted policy (KL) change per token.
    tau_H: threshold on |m_H| (> 0).
    tau_F: threshold on m_F (> 0).
    symmetric: the two-sided test on m_H, or the one-sided one.

  Returns:
    bool array, True = keep.
  """
  if not tau_H > 0 or not tau_F > 0:
    raise ValueError(f'tau_H and tau_F must be > 0, got {tau_H}, {tau_F}')
  m_H, m_F = jnp.asarray(m_H), jnp.asarray(m_F)  # pylint: disable=invalid-name
  if m_H.shape != m_F.shape:
    raise ValueError(f'm_H and m_F must have the same shape, got {m_H.shape} and {m_F.shape}')
  lower = (m_H > -tau_H) if symmetric else (m_H >= 0)
  return lower & (m_H < tau_H) & (m_F < tau_F)


def _token_coefficients(h_H, action, adv, keep, ids_K, head_VxH):
  """The coefficients c with g = outer(c, h) over S (0 if masked)."""
  _, v_K = _set_probs(h_H, head_VxH, action, ids_K)
  return keep * adv * v_K


def capo_shadow_update(
  shadow: CapoShadow,
  hidden: jax.Array,
  head: jax.Array,
  actions: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  top_k: int = 50,
  b1: float = 0.9,
  b2: float = 0.999,
  chunk_size: int = 256,
  axis_name: Optional[str] = None,
  token_set: Optional[jax.Array] = None,
) -> CapoShadow:
  """Advances the shadow Adam state by the batch's kept token gradients.

  For every vocabulary row r, g_bar[r] is the mean of g[r] (the token gradient
  row of `capo_token_stats`) over all occurrences of r in the S sets of the
  kept tokens of the whole batch; then M = b1 M + (1 - b1) g_bar and
  V = b2 V + (1 - b2) g_bar^2 for the rows that occurred, other rows stay as
  they are, and count += 1.

  Under `jax.jit` with the batch sharded over a mesh, the sums and counts are
  global reductions, so the result equals the unsharded one. Inside
  `shard_map` / `pmap` over per-device batch shards, pass the batch axis as
  `axis_name` so that the sums and counts are psum'd over it.

  Args:
    shadow: the current CapoShadow.
    hidden: [B, T, H] hidden states (same convention as capo_token_stats).
    head: [V, H] output head, rows = vocabulary ids.
    actions: [B, T] token ids.
    advantages: [B] per-sequence advantages.
    mask: [B, T] the tokens that entered the loss (completion mask times
      capo_mask); bool or 0/1.
    top_k: K, as in capo_token_stats.
    b1: shadow Adam's first-moment decay.
    b2: shadow Adam's second-moment decay.
    chunk_size: about how many tokens are processed at once.
    axis_name: a mapped axis to sum over, or None.
    token_set: None, or S of every token from `capo_token_set`, as in
      capo_token_stats.

  Returns:
    The new CapoShadow.
  """
  hidden, head, actions, advantages, mask, token_set = _check_inputs(
    hidden, head, actions, advantages, shadow, top_k, chunk_size, token_set, mask
  )
  mu = jnp.asarray(shadow.mu, jnp.float32)
  nu = jnp.asarray(shadow.nu, jnp.float32)
  spec_VxH = _sharding.spec_of(mu)
  sum_VxH, count_V = _sharding.call_with_auto_axes(
    functools.partial(_row_sums, top_k=top_k, chunk_size=chunk_size),
    (hidden, head, actions, advantages, mask, token_set),
    lambda: (PartitionSpec(*spec_VxH), PartitionSpec(spec_VxH[0])),
  )
  if axis_name is not None:
    sum_VxH, count_V = jax.lax.psum((sum_VxH, count_V), axis_name)
  seen_Vx1 = (count_V > 0)[:, None]
  g_bar = sum_VxH / jnp.maximum(count_V, 1.0)[:, None]
  mu = jnp.where(seen_Vx1, b1 * mu + (1.0 - b1) * g_bar, mu)
  nu = jnp.where(seen_Vx1, b2 * nu + (1.0 - b2) * g_bar**2, nu)
  return CapoShadow(mu=mu, nu=nu, count=jnp.asarray(shadow.count, jnp.int32) + 1)


def _row_sums(hidden, head, actions, advantages, mask, token_set, *, top_k, chunk_size):
  """Per vocabulary row: the sum of the kept tokens' g rows, and their count.

  A scan over chunks of tokens scatter-adds each chunk's [C, K, H] rows into
  the [V, H] sum, so no more than one chunk of g exists at a time.
  """
  batch, length, width = hidden.shape
  vocab = head.shape[0]
  sum_VxH = jnp.zeros((vocab, width), jnp.float32)
  count_V = jnp.zeros((vocab,), jnp.float32)
  if not length:
    return sum_VxH, count_V
  head_VxH = head.astype(jnp.float32)
  adv_BxT = jnp.broadcast_to(advantages.astype(jnp.float32)[:, None], (batch, length))
  keep_BxT = (mask != 0).astype(jnp.float32)
  xs = _chunks(
    batch,
    length,
    chunk_size,
    hidden.astype(jnp.float32),
    actions.astype(jnp.int32),
    adv_BxT,
    keep_BxT,
    token_set,
  )
  coefficients = jax.vmap(_token_coefficients, in_axes=(0, 0, 0, 0, 0, None))

  def accumulate(carry, chunk):
    sum_VxH, count_V = carry
    h_CxH, a_C, adv_C, keep_C, ids_CxK = chunk
    ids_CxK = _chunk_ids(h_CxH, a_C, ids_CxK, head_VxH, top_k)
    coef_CxK = coefficients(h_CxH, a_C, adv_C, keep_C, ids_CxK, head_VxH)
    g_CxKxH = coef_CxK[:, :, None] * h_CxH[:, None, :]
    flat_ids = ids_CxK.reshape(-1)
    sum_VxH = sum_VxH.at[flat_ids].add(g_CxKxH.reshape(-1, width))
    keep_CxK = jnp.broadcast_to(keep_C[:, None], ids_CxK.shape)
    count_V = count_V.at[flat_ids].add(keep_CxK.reshape(-1))
    return (sum_VxH, count_V), None

  carry = _sharding.like_varying((sum_VxH, count_V), hidden, head, actions, advantages, mask)
  (sum_VxH, count_V), _ = jax.lax.scan(accumulate, carry, xs)
  return sum_VxH, count_V
