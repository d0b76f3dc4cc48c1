"""Autoregressive sampling of completions through a KV-cache decode function.

Model-agnostic: the model enters only through `decode_fn`, so any policy that
can prefill a left-padded prompt into a cache and then decode one token at a
time can be sampled (`curvopt.models.decode_fn_for` adapts the reference
decoder).
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from curvopt.rl import _sharding

# (params, cache, tokens [N, S], positions [N, S], attention_mask [N, S])
#   -> (logits [N, S, V] float32, new_cache)
DecodeFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


class Samples(NamedTuple):
  """Sampled completions, N = B * num_samples rows.

  Attributes:
    completions: int32 [N, L] sampled ids; pad_id after EOS and after the end
      of decoding.
    logp: float32 [N, L] log-prob of each sampled id under the policy's
      temperature-scaled softmax before top-k / top-p filtering (temperature
      1 when greedy): the `old_logp` of the RL loss. 0 where `mask` is 0.
    mask: float32 [N, L] 1 for real completion tokens, up to and including
      EOS.
    truncated: bool [N] True when no EOS appeared within L tokens.
    prompt_index: int32 [N] row of `prompts` each completion belongs to; the
      num_samples completions of one prompt are contiguous (the grouping
      `group_advantages` expects).
  """

  completions: jax.Array
  logp: jax.Array
  mask: jax.Array
  truncated: jax.Array
  prompt_index: jax.Array


def _check_int(name: str, value: Any, *, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {value!r}')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}')
  return int(value)


def _check_top_p(top_p: Any) -> float:
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating)):
    raise TypeError(f'top_p must be a number, got {top_p!r}')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  return float(top_p)


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits with -inf outside the top-k / nucleus set (last axis = vocab).

  Top-k keeps the logits >= the k-th largest (ties with it are kept too);
  top_k=0 keeps all. The nucleus is then taken on the softmax of what top-k
  kept: a token is kept iff the total probability of the tokens ranked above
  it is < top_p, so the most likely token always stays and the kept set is
  the smallest prefix of the ranking whose mass reaches top_p; top_p=1 keeps
  all. Apply the temperature before calling this (as the sampler does).

  Args:
    logits: float [..., V].
    top_k: number of most likely ids to keep (0 = no top-k).
    top_p: nucleus mass in (0, 1] (1 = no nucleus filtering).

  Returns:
    float32 [..., V], the kept logits unchanged.
  """
  top_k = _check_int('top_k', top_k, minimum=0)
  top_p = _check_top_p(top_p)
  logits = jnp.asarray(logits, jnp.float32)
  vocab = logits.shape[-1]
  if top_k and top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The kept ranks form a prefix (mass_before only grows), never empty.
    num_kept = jnp.maximum(jnp.sum(mass_before < top_p, -1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return logits


def sample(
  decode_fn: DecodeFn,
  params: Any,
  cache: Any,
  prompts: jax.Array,
  prompt_mask: jax.Array,
  key: jax.Array,
  *,
  max_new_tokens: int,
  num_samples: int = 1,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int,
  pad_id: int,
) -> Samples:
  """Samples num_samples completions of every prompt with a KV cache.

  One prefill call of `decode_fn` over the whole left-padded prompt batch,
  then one call per new token inside a `lax.while_loop` that stops as soon as
  every row has produced EOS (or after max_new_tokens). The whole sampler is
  compiled once per decode_fn, shapes and options (the options are static).

  Positions count real prompt tokens from 0 (padding gets 0), and the
  completion continues from the prompt's length, so a prompt gives the same
  logits whatever padding its batch needed.

  Sampling: logits / temperature, then `filter_logits(top_k, top_p)`, then a
  categorical draw; temperature 0 is greedy (argmax of the raw logits, logp
  under temperature 1). The random draws depend on `key` and the step only,
  not on the device layout: the same key gives the same Samples whether the
  rows are sharded over a mesh or not.

  Sharding: prompts / prompt_mask may be sharded over the data axes of an
  explicit mesh (`jax.make_mesh`) and params over any axes; the outputs come
  back with their rows laid out like the prompts' rows.

  Args:
    decode_fn: `decode_fn(params, cache, tokens [N, S] int32, positions
      [N, S] int32, attention_mask [N, S] bool) -> (logits [N, S, V], cache)`
      appends S tokens to the cache; a hashable callable (it is a static
      argument of the compiled sampler).
    params: the policy parameters, passed through to decode_fn.
    cache: an empty cache for N = B * num_samples rows and at least
      P + max_new_tokens - 1 tokens.
    prompts: int [B, P] left-padded prompt ids.
    prompt_mask: bool or int [B, P], 1 = real prompt token.
    key: PRNG key.
    max_new_tokens: L, the most tokens sampled per completion.
    num_samples: completions per prompt (the GRPO group size).
    temperature: >= 0; 0 is greedy.
    top_k: keep the top_k most likely ids (0 = all).
    top_p: nucleus mass in (0, 1] (1 = all).
    eos_id: id that ends a completion (included in it).
    pad_id: id written after EOS.

  Returns:
    `Samples` with N = B * num_samples rows.
  """
  max_new_tokens = _check_int('max_new_tokens', max_new_tokens, minimum=1)
  num_samples = _check_int('num_samples', num_samples, minimum=1)
  top_k = _check_int('top_k', top_k, minimum=0)
  top_p = _check_top_p(top_p)
  eos_id = _check_int('eos_id', eos_id, minimum=0)
  pad_id = _check_int('pad_id', pad_id, minimum=0)
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)):
    raise TypeError(f'temperature must be a number, got {temperature!r}')
  if not (np.isfinite(temperature) and temperature >= 0):
    raise ValueError(f'temperature must be finite and >= 0, got {temperature}')
  if not callable(decode_fn):
    raise TypeError(f'decode_fn must be callable, got {decode_fn!r}')
  prompts = jnp.asarray(prompts)
  prompt_mask = jnp.asarray(prompt_mask)
  if prompts.ndim != 2:
    raise ValueError(f'prompts must be [B, P], got shape {prompts.shape}')
  if not jnp.issubdtype(prompts.dtype, jnp.integer):
    raise TypeError(f'prompts must have an integer dtype, got {prompts.dtype}')
  if prompt_mask.shape != prompts.shape:
    raise ValueError(
      f"prompt_mask must have the prompts' shape {prompts.shape}, got {prompt_mask.shape}"
    )
  if not (prompt_mask.dtype == jnp.bool_ or jnp.issubdtype(prompt_mask.dtype, jnp.integer)):
    raise TypeError(f'prompt_mask must be boolean or integer, got {prompt_mask.dtype}')
  return _sample_jit(
    decode_fn,
    params,
    cache,
    prompts,
    prompt_mask,
    key,
    max_new_tokens=max_new_tokens,
    num_samples=num_samples,
    temperature=float(temperature),
    top_k=top_k,
    top_p=top_p,
    eos_id=eos_id,
    pad_id=pad_id,
  )


@functools.partial(
  jax.jit,
  static_argnums=0,
  static_argnames=(
    'max_new_tokens',
    'num_samples',
    'temperature',
    'top_k',
    'top_p',
    'eos_id',
    'pad_id',
  ),
)
def _sample_jit(decode_fn, params, cache, prompts, prompt_mask, key, **opts):
  row_spec = _sharding.spec_of(prompts)[0]

  def out_specs():
    return Samples(
      completions=PartitionSpec(row_spec, None),
      logp=PartitionSpec(row_spec, None),
      mask=PartitionSpec(row_spec, None),
      truncated=PartitionSpec(row_spec),
      prompt_index=PartitionSpec(row_spec),
    )

  # Inside, explicit mesh axes are auto: the buffers, the repeat and the
  # column writes need no hand-written shardings, and XLA keeps the rows
  # where the prompts put them.
  return _sharding.call_with_auto_axes(
    lambda *args: _sample(decode_fn, *args, **opts),
    (params, cache, prompts, prompt_mask, key),
    out_specs,
  )


def _sample(
  decode_fn,
  params,
  cache,
  prompts,
  prompt_mask,
  key,
  *,
  max_new_tokens,
  num_samples,
  temperature,
  top_k,
  top_p,
  eos_id,
  pad_id,
):
  """`sample` after validation."""
  batch, prompt_len = prompts.shape
  rows, steps = batch * num_samples, max_new_tokens
  prompt_index_N = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_samples)
  tokens_NxP = jnp.repeat(prompts.astype(jnp.int32), num_samples, axis=0)
  mask_NxP = jnp.repeat(prompt_mask.astype(bool), num_samples, axis=0)
  positions_NxP = jnp.maximum(jnp.cumsum(mask_NxP.astype(jnp.int32), axis=1) - 1, 0)
  # The first completion token sits right after the last real prompt token.
  start_pos_N = jnp.sum(mask_NxP, axis=1, dtype=jnp.int32)

  def choose(logits_NxV, step):
    logits_NxV = logits_NxV.astype(jnp.float32)
    if temperature == 0.0:
      token_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
      logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
    else:
      scaled_NxV = logits_NxV / temperature
      kept_NxV = filter_logits(scaled_NxV, top_k=top_k, top_p=top_p)
      token_N = jax.random.categorical(jax.random.fold_in(key, step), kept_NxV, axis=-1).astype(
        jnp.int32
      )
      logp_NxV = jax.nn.log_softmax(scaled_NxV, axis=-1)
    logp_N = jnp.take_along_axis(logp_NxV, token_N[:, None], axis=-1)[:, 0]
    return token_N, logp_N

  def record(state, step, logits_NxV):
    """Samples token `step` and writes it into the buffers."""
    token_N, logp_N = choose(logits_NxV, step)
    done_N = state['done']
    live_N = ~done_N
    token_N = jnp.where(live_N, token_N, pad_id)
    state = dict(state)
    state['tokens'] = state['tokens'].at[:, step].set(token_N)
    state['logp'] = state['logp'].at[:, step].set(jnp.where(live_N, logp_N, 0))
    state['mask'] = state['mask'].at[:, step].set(live_N)
    state['done'] = done_N | (live_N & (token_N == eos_id))
    return state

  logits, cache = decode_fn(params, cache, tokens_NxP, positions_NxP, mask_NxP)
  state = dict(
    tokens=jnp.full((rows, steps), pad_id, jnp.int32),
    logp=jnp.zeros((rows, steps), jnp.float32),
    mask=jnp.zeros((rows, steps), bool),
    done=jnp.zeros((rows,), bool),
  )
  state = record(state, 0, logits[:, -1])

  def cond(carry):
    step, state, _ = carry
    return (step < steps) & ~jnp.all(state['done'])

  def body(carry):
    step, state, cache = carry
    prev = step - 1
    fed_N = state['tokens'][:, prev]
    logits, cache = decode_fn(
      params, cache, fed_N[:, None], (start_pos_N + prev)[:, None], state['mask'][:, prev][:, None]
    )
    return step + 1, record(state, step, logits[:, -1]), cache

  _, state, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache))
  return Samples(
    completions=state['tokens'],
    logp=state['logp'],
    mask=state['mask'].astype(jnp.float32),
    truncated=~state['done'],
    prompt_index=prompt_index_N,
  )
