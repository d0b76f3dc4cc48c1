"""Causal multi-head attention with grouped KV heads and a KV cache."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from curvopt.models import _config
from curvopt.models import _layers
from curvopt.models import _rope
from curvopt.models import _sharding


def causal_padding_mask(
  key_valid_BxS: jax.Array, query_offset: jax.Array | int, num_queries: int
) -> jax.Array:
  """Boolean [B, T, S] mask: which key slot each query slot may attend to.

  Query i sits at slot ``query_offset + i``; key j at slot j. A query sees the
  keys at or before its own slot that are real tokens, and always itself, so
  that a padding query has one key to attend to (no all-masked softmax row,
  and the full forward and the cached decode agree on it exactly).

  Args:
    key_valid_BxS: True (or 1) where the key slot holds a real token.
    query_offset: slot of the first query (0 for a full forward; the cache
      index when decoding). May be traced.
    num_queries: T.
  """
  key_valid_BxS = key_valid_BxS.astype(bool)
  num_keys = key_valid_BxS.shape[1]
  query_slot_T = query_offset + jnp.arange(num_queries)
  key_slot_S = jnp.arange(num_keys)
  causal_TxS = key_slot_S[None, :] <= query_slot_T[:, None]
  self_TxS = key_slot_S[None, :] == query_slot_T[:, None]
  return causal_TxS[None] & (key_valid_BxS[:, None, :] | self_TxS[None])


def dot_product_attention(
  query_BxTxNxH: jax.Array,
  key_BxSxKxH: jax.Array,
  value_BxSxKxH: jax.Array,
  *,
  mask_BxTxS: Optional[jax.Array] = None,
  is_causal: bool = False,
  implementation: Optional[str] = None,
) -> jax.Array:
  """Softmax attention of N query heads over K | N key/value heads.

  A thin layer over ``jax.nn.dot_product_attention`` (float32 logits and
  softmax; cuDNN flash attention when ``implementation='cudnn'``).

  Args:
    query_BxTxNxH: queries.
    key_BxSxKxH: keys; N must be a multiple of K (grouped-query attention).
    value_BxSxKxH: values.
    mask_BxTxS: optional boolean mask, True where a query may attend a key.
    is_causal: additionally apply the causal mask (T == S).
    implementation: passed on to ``jax.nn.dot_product_attention``.

  Returns:
    [B, T, N, H] attention outputs in the dtype of the inputs.
  """
  mask = None if mask_BxTxS is None else mask_BxTxS.astype(bool)[:, None]
  return jax.nn.dot_product_attention(
    query_BxTxNxH,
    key_BxSxKxH,
    value_BxSxKxH,
    mask=mask,
    is_causal=is_causal,
    implementation=implementation,
  )


class Attention(nn.Module):
  """Causal self-attention; parameters ``{q, k, v, o}/kernel`` (and biases, see the config).

  With ``decode=True`` the new keys and values are written into the
  ``cache`` collection (``cached_key`` / ``cached_value``, [B, L, K, H]) at
  ``cache_index`` and the queries attend over all L slots under ``mask``.
  """

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
    cfg = self.cfg
    batch, length, _ = x_BxTxD.shape
    num_heads, num_kv, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    std, out_std = 0.02, 0.02 / (2 * cfg.n_layers) ** 0.5

    bias = cfg.qkv_bias
    q = _layers.dense(num_heads * head_dim, cfg, std=std, name='q', use_bias=bias)(x_BxTxD)
    k = _layers.dense(num_kv * head_dim, cfg, std=std, name='k', use_bias=bias)(x_BxTxD)
    v = _layers.dense(num_kv * head_dim, cfg, std=std, name='v', use_bias=bias)(x_BxTxD)
    q_BxTxNxH = _rope.apply_rope(
      q.reshape(batch, length, num_heads, head_dim), cos_BxTxF, sin_BxTxF
    )
    k_BxTxKxH = _rope.apply_rope(k.reshape(batch, length, num_kv, head_dim), cos_BxTxF, sin_BxTxF)
    v_BxTxKxH = v.reshape(batch, length, num_kv, head_dim)

    if self.decode:
      # At init time the input length sets the cache length (see init_cache).
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
      cached_value = self.variable(
        'cache', 'cached_value', jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype
      )
      start = (0, cache_index, 0, 0)
      # The cache follows the batch layout of the activations (see _sharding).
      cached_key.value = jax.lax.dynamic_update_slice(
        _sharding.like(cached_key.value, k_BxTxKxH), k_BxTxKxH.astype(cached_key.value.dtype), start
      )
      cached_value.value = jax.lax.dynamic_update_slice(
        _sharding.like(cached_value.value, v_BxTxKxH),
        v_BxTxKxH.astype(cached_value.value.dtype),
        start,
      )
      out_BxTxNxH = dot_product_attention(
        q_BxTxNxH, cached_key.value, cached_value.value, mask_BxTxS=mask_BxTxS
      )
    elif mask_BxTxS is None:
      out_BxTxNxH = dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True, implementation=cfg.attention_impl
      )
    else:
      out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxTxS=mask_BxTxS)

    out_BxTxNH = out_BxTxNxH.reshape(batch, length, num_heads * head_dim)
    return _layers.dense(cfg.d_model, cfg, std=out_std, name='o', use_bias=cfg.out_bias)(out_BxTxNH)
