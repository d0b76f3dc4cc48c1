"""Allocation of the decoder's KV cache."""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.models import _decoder


def init_cache(model: _decoder.Decoder, batch_size: int, max_len: Optional[int] = None) -> Any:
  """A zero KV cache (the flax ``cache`` collection) for ``decode=True`` calls.

  Args:
    model: the ``Decoder``.
    batch_size: B of every decode call on this cache.
    max_len: cache length L (total tokens that prefill and decoding may write);
      default ``model.cfg.max_len``.

  Returns:
    ``{'cache_index': int32 [], 'key_valid': bool [B, L],
    'layers_{i}': {'attn': {'cached_key', 'cached_value': [B, L, K, H]}}}``
    in the compute dtype, with nothing computed (shapes come from eval_shape).
  """
  cfg = model.cfg
  max_len = cfg.max_len if max_len is None else max_len
  for name, value in (('batch_size', batch_size), ('max_len', max_len)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f'init_cache {name} must be an int, got {value!r}')
    if value <= 0:
      raise ValueError(f'init_cache {name} must be positive, got {value}')
  if max_len > cfg.max_len:
    raise ValueError(f'init_cache max_len={max_len} exceeds DecoderConfig.max_len={cfg.max_len}')
  tokens = jax.ShapeDtypeStruct((int(batch_size), int(max_len)), jnp.int32)
  init = functools.partial(model.init, decode=True)
  shapes = jax.eval_shape(init, jax.random.key(0), tokens)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
