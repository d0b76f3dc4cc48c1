"""Learning-rate mappings: a group's noise estimates H -> per-layer scales.

A mapping is any function h_N -> s_N over the N leaves of one group (called
inside the jit'd update, on every step). LANTON's paper (arXiv 2510.14009)
does not publish its exact mapping; these are the candidates: the least noisy
layer at the scheduled rate (`min_ratio`), rates around the group's mean
noise (`mean_ratio`, arithmetic or geometric mean, clipped), and `ones` (no
adaptation: the ablation). The exponent p of the ratio is an option: 1/2
(the default) or e.g. 1/4, the fourth root that the paper's analysis (an
optimal step ~ sigma^(-1/2)) suggests.

A mapping may carry the attribute `bounds = (s_min, s_max)`: the optimizers
then report how often the clip binds (the fraction of each group's leaves at
s_min and at s_max on the last step). The named mappings set it where they
clip; a user's callable without it reports no clipping.
"""

from typing import Callable, Union

import jax
import jax.numpy as jnp

Mapping = Callable[[jax.Array], jax.Array]

NORMALISERS = ('arithmetic', 'geometric')


def _check_exponent(exponent) -> None:
  if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not exponent > 0:
    raise ValueError(f'exponent must be a number > 0, got {exponent!r}')


def _power(ratio: jax.Array, exponent: float) -> jax.Array:
  # sqrt at p = 1/2 keeps the historical numerics bit for bit.
  return jnp.sqrt(ratio) if exponent == 0.5 else jnp.power(ratio, exponent)


def min_ratio(*, exponent: float = 0.5, eps: float = 1e-12) -> Mapping:
  """s_l = ((min_j H_j + eps) / (H_l + eps))^exponent, in (0, 1].

  The least noisy layer of the group gets exactly 1 (the scheduled rate),
  noisier layers less. eps sits in the numerator too so that the least noisy
  layer gets 1 even when all H are ~0 (for H >> eps it is
  (min H / (H_l + eps))^exponent).

  Args:
    exponent: the power p of the ratio (0.5: square root; 0.25: fourth root).
    eps: regularizer of the ratio.

  Returns:
    A mapping (it never clips: no `bounds`).
  """
  _check_exponent(exponent)

  def mapping(h):
    return _power((jnp.min(h) + eps) / (h + eps), exponent)

  return mapping


def mean_ratio(
  *,
  exponent: float = 0.5,
  normaliser: str = 'arithmetic',
  s_min: float = 0.1,
  s_max: float = 3.0,
  eps: float = 1e-12,
) -> Mapping:
  """s_l = clip(((N(H) + eps) / (H_l + eps))^exponent, s_min, s_max).

  Quieter-than-average layers get more than the scheduled rate (up to s_max),
  noisier ones less (down to s_min). N is the group's mean noise:
  - 'arithmetic': N + eps = mean_j H_j + eps;
  - 'geometric': N + eps = exp(mean_j log(H_j + eps)), the geometric mean of
    H + eps (less pulled up than the arithmetic mean by one very noisy
    layer of a right-skewed H).

  Args:
    exponent: the power p of the ratio (0.5: square root; 0.25: fourth root).
    normaliser: 'arithmetic' or 'geometric'.
    s_min, s_max: clipping range (the mapping's `bounds`).
    eps: regularizer of the ratio.

  Returns:
    A mapping with `bounds = (s_min, s_max)`.
  """
  _check_exponent(exponent)
  if normaliser not in NORMALISERS:
    raise ValueError(f'unknown normaliser {normaliser!r}; valid: {list(NORMALISERS)}')
  if not s_min <= s_max:
    raise ValueError(f'need s_min <= s_max, got {s_min} > {s_max}')

  if normaliser == 'arithmetic':

    def mapping(h):
      return jnp.clip(_power((jnp.mean(h) + eps) / (h + eps), exponent), s_min, s_max)

  else:

    def mapping(h):
      log_h = jnp.log(h + eps)
      return jnp.clip(jnp.exp(exponent * (jnp.mean(log_h) - log_h)), s_min, s_max)

  mapping.bounds = (s_min, s_max)
  return mapping


def ones() -> Mapping:
  """s_l = 1 for every leaf: the noise is measured and logged, not used (the ablation)."""

  def mapping(h):
    return jnp.ones_like(h)

  return mapping


# The mapping of docs/lm_experiments.md's best result: D-Muon times these factors ended 1,000
# steps of `tiny` lower than D-Muon on every seed (p = 1/4, geometric mean, default clip).
DEFAULT_NOISE_MAPPING_OPTIONS = {'exponent': 0.25, 'normaliser': 'geometric'}


def default_noise_mapping() -> Mapping:
  """`mean_ratio(exponent=0.25, normaliser='geometric')`: `noise_adaptive`'s default."""
  return mean_ratio(**DEFAULT_NOISE_MAPPING_OPTIONS)


_NAMED = {'min_ratio': min_ratio, 'mean_ratio': mean_ratio, 'ones': ones}
MAPPING_NAMES = tuple(_NAMED)


def as_mapping(spec: Union[str, Mapping]) -> Mapping:
  """A mapping from a name ('min_ratio', 'mean_ratio', 'ones'; default options) or a callable."""
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


def bounds_of(mapping: Mapping) -> tuple[float, float] | None:
  """The mapping's clip range (s_min, s_max), or None if it declares none."""
  return getattr(mapping, 'bounds', None)
