"""Building blocks: Dense (bias optional), token embedding, RMSNorm, SwiGLU MLP.

Each reads its parameters through ``_sharding.gather_param`` so that
FSDP-sharded parameters work on explicit meshes.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from curvopt.models import _config
from curvopt.models import _sharding


class Dense(nn.Module):
  """x @ kernel (+ bias), kernel [d_in, features] ~ normal(std), bias zeros.

  ``out_dtype`` sets the accumulation and output dtype (default: ``dtype``).
  """

  features: int
  std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  out_dtype: Optional[jnp.dtype] = None
  use_bias: bool = False

  @nn.compact
  def __call__(self, x_BxTxI: jax.Array) -> jax.Array:
    kernel_IxO = self.param(
      'kernel',
      nn.initializers.normal(stddev=self.std),
      (x_BxTxI.shape[-1], self.features),
      self.param_dtype,
    )
    kernel_IxO = _sharding.gather_param(kernel_IxO).astype(self.dtype)
    out = jnp.einsum(
      '...i,io->...o', x_BxTxI.astype(self.dtype), kernel_IxO, preferred_element_type=self.out_dtype
    )
    if not self.use_bias:
      return out
    bias_O = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    return out + _sharding.gather_param(bias_O).astype(out.dtype)


def dense(
  features: int,
  cfg: _config.DecoderConfig,
  *,
  std: float,
  name: str,
  out_dtype: Optional[jnp.dtype] = None,
  use_bias: bool = False,
) -> Dense:
  return Dense(
    features,
    std=std,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.params_dtype,
    out_dtype=out_dtype,
    use_bias=use_bias,
    name=name,
  )


class Embed(nn.Module):
  """Token embedding ``embedding`` [V, D] ~ normal(0.02), usable as the head."""

  cfg: _config.DecoderConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
      'embedding',
      nn.initializers.normal(stddev=0.02),
      (cfg.vocab_size, cfg.d_model),
      cfg.params_dtype,
    )

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    """[B, T, D] rows in the compute dtype (NaN for ids out of range)."""
    table_VxD = _sharding.gather_param(self.embedding)
    return _sharding.take_rows(table_VxD.astype(self.cfg.compute_dtype), tokens_BxT)

  def attend(self, hidden_BxTxD: jax.Array) -> jax.Array:
    """Tied-head logits hidden @ embedding.T, accumulated in float32."""
    table_VxD = _sharding.gather_param(self.embedding)
    dtype = self.cfg.compute_dtype
    return jnp.einsum(
      'btd,vd->btv',
      hidden_BxTxD.astype(dtype),
      table_VxD.astype(dtype),
      preferred_element_type=jnp.float32,
    )


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32; parameter ``scale`` [D] = 1."""

  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = self.param('scale', nn.initializers.ones, (x_BxTxD.shape[-1],), self.param_dtype)
    scale_D = _sharding.gather_param(scale_D).astype(jnp.float32)
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D).astype(self.dtype)


def rms_norm(cfg: _config.DecoderConfig, name: str) -> RMSNorm:
  return RMSNorm(eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)); parameters ``{gate, up, down}/kernel``."""

  cfg: _config.DecoderConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    out_std = 0.02 / (2 * cfg.n_layers) ** 0.5
    gate_BxTxF = dense(cfg.d_ff, cfg, std=0.02, name='gate')(x_BxTxD)
    up_BxTxF = dense(cfg.d_ff, cfg, std=0.02, name='up')(x_BxTxD)
    hidden_BxTxF = nn.silu(gate_BxTxF) * up_BxTxF
    return dense(cfg.d_model, cfg, std=out_std, name='down')(hidden_BxTxF)
