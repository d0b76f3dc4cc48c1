"""Paired comparisons of two arms run on the same seeds: mean difference and its t-interval.

A seed sets both the initialization and the data order, so two arms' final losses on one seed
move together; their per-seed differences are the measurement. The interval is Student's t with
n - 1 degrees of freedom, its quantile computed here (no scipy): the t distribution's CDF has a
closed form for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4), inverted by bisection.
"""

import dataclasses
import math
from typing import Mapping

import numpy as np

LOWER = 'lower'
HIGHER = 'higher'
NO_EFFECT = 'no effect measured'


def _t_central_probability(t: float, dof: int) -> float:
  """P(|T| <= t) for Student's t with `dof` (a positive integer) degrees of freedom."""
  theta = math.atan(t / math.sqrt(dof))
  s, c = math.sin(theta), math.cos(theta)
  if dof % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
    total, term = 0.0, c
    for k in range(1, (dof - 1) // 2 + 1):
      total += term
      term *= c * c * (2 * k) / (2 * k + 1)
    return 2.0 / math.pi * (theta + s * total)
  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(dof - 2))
  total, term = 0.0, 1.0
  for k in range(1, dof // 2 + 1):
    total += term
    term *= c * c * (2 * k - 1) / (2 * k)
  return s * total


def t_quantile(probability: float, dof: int) -> float:
  """The `probability` quantile of Student's t with `dof` degrees of freedom (an integer >= 1).

  E.g. t_quantile(0.975, 3) = 3.1824, the half-width factor of a two-sided 95% interval from
  4 paired seeds. Accurate to ~1e-12 relative (bisection on the closed-form CDF).
  """
  if isinstance(dof, bool) or not isinstance(dof, (int, np.integer)) or dof < 1:
    raise ValueError(f'dof must be an integer >= 1, got {dof!r}')
  if not 0.0 < probability < 1.0:
    raise ValueError(f'probability must be in (0, 1), got {probability!r}')
  if probability == 0.5:
    return 0.0
  central = abs(2.0 * probability - 1.0)  # P(|T| <= q)
  low, high = 0.0, 1.0
  while _t_central_probability(high, int(dof)) < central:
    high *= 2.0
  for _ in range(200):
    mid = 0.5 * (low + high)
    if _t_central_probability(mid, int(dof)) < central:
      low = mid
    else:
      high = mid
    if high - low <= 1e-13 * high:
      break
  q = 0.5 * (low + high)
  return q if probability > 0.5 else -q


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """Per-seed differences a - b over the seeds both arms ran, and their t-interval.

  `low` / `high` bound the `confidence` interval of the mean difference (nan with fewer than two
  seeds). `decision` is 'lower' when the whole interval lies below 0 (a ends lower than b),
  'higher' when it lies above 0, else 'no effect measured'.
  """

  seeds: tuple[int, ...]
  differences: tuple[float, ...]
  confidence: float

  @property
  def n(self) -> int:
    return len(self.differences)

  @property
  def mean(self) -> float:
    return float(np.mean(self.differences)) if self.n else math.nan

  @property
  def std(self) -> float:
    return float(np.std(self.differences, ddof=1)) if self.n > 1 else math.nan

  @property
  def half_width(self) -> float:
    if self.n < 2:
      return math.nan
    return t_quantile(0.5 + self.confidence / 2, self.n - 1) * self.std / math.sqrt(self.n)

  @property
  def low(self) -> float:
    return self.mean - self.half_width

  @property
  def high(self) -> float:
    return self.mean + self.half_width

  @property
  def decision(self) -> str:
    if self.high < 0:  # False for nan
      return LOWER
    if self.low > 0:
      return HIGHER
    return NO_EFFECT


def paired_difference(
  a: Mapping[int, float], b: Mapping[int, float], *, confidence: float = 0.95
) -> PairedDifference:
  """a[seed] - b[seed] over the seeds in both, with a `confidence` t-interval of their mean.

  Args:
    a: seed -> value of the arm measured (e.g. final eval loss).
    b: seed -> value of the reference arm.
    confidence: two-sided coverage of the interval, in (0, 1).
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1), got {confidence!r}')
  seeds = tuple(sorted(set(a) & set(b)))
  return PairedDifference(
    seeds=seeds,
    differences=tuple(float(a[s]) - float(b[s]) for s in seeds),
    confidence=float(confidence),
  )
