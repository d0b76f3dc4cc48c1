"""Learning-rate mappings: a group's noise estimates H -> per-layer scales.

A mapping is any function h_N -> s_N over the N leaves of one group (called
inside the jit'd update, on every step). LANTON's paper (arXiv 2510.14009)
does not publish its exact mapping; these are two candidates: the least noisy
layer at the scheduled rate (`min_ratio`), or rates around the group's mean
noise (`mean_ratio`).
"""

from typing import Callable, Union

import jax
import jax.numpy as jnp

Mapping = Callable[[jax.Array], jax.Array]


def min_ratio(*, eps: float = 1e-12) -> Mapping:
  """s_l = sqrt((min_j H_j + eps) / (H_l + eps)), in (0, 1].

  The least noisy layer of the group gets exactly 1 (the scheduled rate),
  noisier layers proportionally less. eps sits in the numerator too so that
  the least noisy layer gets 1 even when all H are ~0 (for H >> eps it is
  sqrt(min H / (H_l + eps))).

  Args:
    eps: regularizer of the ratio.

  Returns:
    A mapping.
  """

  def mapping(h):
    return jnp.sqrt((jnp.min(h) + eps) / (h + eps))

  return mapping


def mean_ratio(*, eps: float = 1e-12, s_min: float = 0.1, s_max: float = 3.0) -> Mapping:
  """s_l = clip(sqrt((mean_j H_j + eps) / (H_l + eps)), s_min, s_max).

  Quieter-than-average layers get more than the scheduled rate (up to s_max),
  noisier ones less (down to s_min).

  Args:
    eps: regularizer of the ratio.
    s_min, s_max: clipping range.

  Returns:
    A mapping.
  """
  if not s_min <= s_max:
    raise ValueError(f'need s_min <= s_max, got {s_min} > {s_max}')

  def mapping(h):
    return jnp.clip(jnp.sqrt((jnp.mean(h) + eps) / (h + eps)), s_min, s_max)

  return mapping


_NAMED = {'min_ratio': min_ratio, 'mean_ratio': mean_ratio}
MAPPING_NAMES = tuple(_NAMED)


def as_mapping(spec: Union[str, Mapping]) -> Mapping:
  """A mapping from a name ('min_ratio', 'mean_ratio') or a callable."""
  if isinstance(spec, str):
    if spec not in _NAMED:
      raise ValueError(
        f'unknown learning-rate mapping {spec!r}; valid: '
        f'{list(MAPPING_NAMES)} or a callable h_N -> s_N'
      )
    return _NAMED[spec]()
  if callable(spec):
    return spec
  raise TypeError(f'mapping must be a name or a callable, got {spec!r}')
