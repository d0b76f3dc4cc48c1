"""The LLaMA-style decoder: embedding, pre-norm blocks, final norm, LM head."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from curvopt.models import _attention
from curvopt.models import _config
from curvopt.models import _layers
from curvopt.models import _rope
from curvopt.models import _sharding


class Block(nn.Module):
  """Pre-norm block: x + attn(attn_norm(x)), then + mlp(mlp_norm(x))."""

  cfg: _config.DecoderConfig
  decode: bool = False

  @nn.compact
  def __call__(
    self,
    x_BxTxD: jax.Array,
    cos_BxTxF: jax.Array,
    sin_BxTxF: jax.Array,
    mask_BxTxS: Optional[jax.Array],
    cache_index: Optional[jax.Array],
  ) -> jax.Array:
    attn = _attention.Attention(self.cfg, decode=self.decode, name='attn')
    attn_in_BxTxD = _layers.rms_norm(self.cfg, 'attn_norm')(x_BxTxD)
    x_BxTxD = x_BxTxD + attn(attn_in_BxTxD, cos_BxTxF, sin_BxTxF, mask_BxTxS, cache_index)
    mlp_in_BxTxD = _layers.rms_norm(self.cfg, 'mlp_norm')(x_BxTxD)
    return x_BxTxD + _layers.SwiGLU(self.cfg, name='mlp')(mlp_in_BxTxD)


def _check_batch_array(name: str, value, shape: tuple[int, int], kind: str) -> jax.Array:
  value = jnp.asarray(value)
  if value.shape != shape:
    raise ValueError(f"{name} must have shape {shape} (the tokens' [B, T]), got {value.shape}")
  if kind == 'int' and not jnp.issubdtype(value.dtype, jnp.integer):
    raise TypeError(f'{name} must have an integer dtype, got {value.dtype}')
  if kind == 'mask' and not (value.dtype == jnp.bool_ or jnp.issubdtype(value.dtype, jnp.integer)):
    raise TypeError(f'{name} must be boolean or integer (1 = real token), got {value.dtype}')
  return value


class Decoder(nn.Module):
  """LLaMA-style decoder-only transformer; see ``__call__``.

  Parameters: ``embed/embedding`` [V, D]; ``layers_{i}/attn_norm/scale``,
  ``layers_{i}/attn/{q,k,v,o}/kernel``, ``layers_{i}/mlp_norm/scale``,
  ``layers_{i}/mlp/{gate,up,down}/kernel``; ``final_norm/scale``; and
  ``head/kernel`` [D, V] only when ``cfg.tie_embeddings`` is False. With
  ``cfg.qkv_bias`` also ``layers_{i}/attn/{q,k,v}/bias``, with
  ``cfg.out_bias`` ``layers_{i}/attn/o/bias``.
  """

  cfg: _config.DecoderConfig

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: Optional[jax.Array] = None,
    attention_mask: Optional[jax.Array] = None,
    decode: bool = False,
  ) -> tuple[jax.Array, jax.Array]:
    """Runs the decoder causally over ``tokens``.

    Args:
      tokens: int [B, T] token ids in [0, vocab_size) (ids outside give NaN).
      positions: int [B, T] RoPE positions. Default: ``arange(T)`` for a full
        forward, ``cache_index + arange(T)`` when decoding. For left-padded
        prompts pass ``positions_from_mask(mask)`` in both modes.
      attention_mask: bool or int [B, T], 1 = real token, 0 = padding. Queries
        never attend to padding keys (a padding query attends to itself only,
        so its output is finite but meaningless). Default: all real. With
        ``decode=True`` it describes the T new tokens and is remembered in the
        cache for later steps.
      decode: append the T new tokens to the KV cache (the mutable ``cache``
        collection from ``init_cache``) at its current index and attend over
        everything cached so far, e.g. prefill a (padded) prompt in one call,
        then one token per call. Call with ``mutable=['cache']``. Writing past
        the cache length is not detected under jit: keep the total number of
        decoded tokens <= the cache length.

    Returns:
      ``(logits, hidden)``: float32 logits [B, T, V] and the final normed
      hidden state [B, T, D] (the input of the output head) in the compute
      dtype. A prefill + token-by-token decode gives the logits of the full
      forward on the same sequence, mask and positions.

    Sharding: on explicit meshes (``jax.make_mesh``) parameters may be sharded
    on any dimension (they are all-gathered before use, FSDP-style) and the
    batch dimension of the inputs along data axes; activations, outputs and
    the KV cache follow the batch layout of ``tokens``.
    """
    cfg = self.cfg
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [B, T], got shape {tokens.shape}')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f'tokens must have an integer dtype, got {tokens.dtype}')
    batch, length = tokens.shape
    if length > cfg.max_len:
      raise ValueError(f'sequence length {length} exceeds DecoderConfig.max_len={cfg.max_len}')
    if positions is not None:
      positions = _check_batch_array('positions', positions, tokens.shape, 'int')
    if attention_mask is not None:
      attention_mask = _check_batch_array(
        'attention_mask', attention_mask, tokens.shape, 'mask'
      ).astype(bool)

    if decode:
      cache_index, mask_BxTxS = self._update_cache_mask(tokens, attention_mask)
      if positions is None:
        positions = jnp.broadcast_to(cache_index + jnp.arange(length), tokens.shape)
    else:
      cache_index = None
      mask_BxTxS = (
        None
        if attention_mask is None
        else _attention.causal_padding_mask(attention_mask, 0, length)
      )
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)

    cos_BxTxF, sin_BxTxF = _rope.rope_angles(
      positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    )
    embed = _layers.Embed(cfg, name='embed')
    x_BxTxD = embed(tokens)

    # Decoding has no backward pass, and remat would need the cache lifted.
    block_cls = nn.remat(Block) if cfg.remat and not decode else Block
    for i in range(cfg.n_layers):
      x_BxTxD = block_cls(cfg, decode=decode, name=f'layers_{i}')(
        x_BxTxD, cos_BxTxF, sin_BxTxF, mask_BxTxS, cache_index
      )
    hidden_BxTxD = _layers.rms_norm(cfg, 'final_norm')(x_BxTxD)

    # float32 accumulation and output: bf16 logits would lose the small
    # differences between likely tokens that the losses and samplers need.
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(hidden_BxTxD)
    else:
      logits_BxTxV = _layers.dense(
        cfg.vocab_size, cfg, std=0.02, name='head', out_dtype=jnp.float32
      )(hidden_BxTxD)
    return logits_BxTxV.astype(jnp.float32), hidden_BxTxD

  def _update_cache_mask(
    self, tokens: jax.Array, attention_mask: Optional[jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    """Advances ``cache_index`` / ``key_valid``; returns (old index, mask)."""
    batch, length = tokens.shape
    # At init time the input sets the cache's [B, L] (see init_cache).
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    key_valid = self.variable('cache', 'key_valid', jnp.zeros, (batch, length), jnp.bool_)
    cache_batch, cache_len = key_valid.value.shape
    if cache_batch != batch:
      raise ValueError(
        f'decode batch size {batch} does not match the cache batch size {cache_batch}'
      )
    if length > cache_len:
      raise ValueError(f'decode step of {length} tokens does not fit the cache length {cache_len}')
    start = index.value
    new_valid_BxT = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask
    # The cache follows the batch layout of the tokens (see _sharding).
    valid_BxL = jax.lax.dynamic_update_slice(
      _sharding.like(key_valid.value, tokens), _sharding.like(new_valid_BxT, tokens), (0, start)
    )
    key_valid.value = valid_BxL
    index.value = start + length
    return start, _attention.causal_padding_mask(valid_BxL, start, length)
