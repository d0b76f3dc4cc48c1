"""The decoder as a sampling policy: the decode function `curvopt.rl.sample` takes."""

import dataclasses
from typing import Any

import jax

from curvopt.models import _decoder


@dataclasses.dataclass(frozen=True)
class _DecoderDecodeFn:
  """`decode_fn(params, cache, tokens, positions, attention_mask)`.

  A frozen dataclass rather than a closure: equal models give equal, equally
  hashing decode functions, so the compiled sampler (which takes decode_fn as
  a static argument) is reused across calls of `decode_fn_for`.
  """

  model: _decoder.Decoder

  def __call__(
    self,
    params: Any,
    cache: Any,
    tokens: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
  ) -> tuple[jax.Array, Any]:
    # Also accept the {'params': ...} variables dict that model.init returns.
    if isinstance(params, dict) and set(params) == {'params'}:
      params = params['params']
    (logits, _), mutated = self.model.apply(
      {'params': params, 'cache': cache},
      tokens,
      positions=positions,
      attention_mask=attention_mask,
      decode=True,
      mutable=['cache'],
    )
    return logits, mutated['cache']


def decode_fn_for(model: _decoder.Decoder) -> _DecoderDecodeFn:
  """The `curvopt.rl.sample` decode function of a `Decoder`.

  `decode_fn(params, cache, tokens [N, S], positions [N, S], attention_mask
  [N, S]) -> (logits [N, S, V] float32, new_cache)` appends the S tokens to
  the KV cache (``model.apply(..., decode=True, mutable=['cache'])``). Build
  the cache with ``init_cache(model, B * num_samples, P + max_new_tokens)``.

  Args:
    model: the `Decoder`.

  Returns:
    A hashable callable (equal for equal models).
  """
  if not isinstance(model, _decoder.Decoder):
    raise TypeError(
      f'decode_fn_for expects a curvopt.models.Decoder, got {type(model).__name__}: {model!r}'
    )
  return _DecoderDecodeFn(model)
