"""Per-expert scalar options (weights, densities, drop rates), validated once.

Options are passed to the jitted kernels as fp32 arrays of shape [T], not as
static values, so a density sweep or a weight search reuses one compilation.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np

from curvopt.merge._paths import is_tracer


def per_expert(
  value: Any,
  num: int,
  *,
  what: str,
  default: float = 1.0,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  dtype: Any = np.float32,
) -> Any:
  """`value` (None, a scalar, or one per expert) as an fp32 array [num].

  Args:
    value: None (every expert gets `default`), a scalar, or a sequence of
      `num` scalars.
    num: the number of experts.
    what: the option's name, for error messages.
    default: the value used when `value` is None.
    low: smallest allowed value (None: unbounded).
    high: largest allowed value (None: unbounded).
    low_open: exclude `low` itself.
    high_open: exclude `high` itself.
    dtype: the numpy dtype returned.

  Returns:
    A numpy array of shape [num] (a jax fp32 array when `value` is traced,
    in which case it is not range-checked).

  Raises:
    ValueError: wrong length, non-finite or out-of-range values; the message
      holds the value.
  """
  if value is None:
    return np.full((num,), default, dtype)
  if is_tracer(value):
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (num,))
  try:
    arr = np.asarray(value, np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{what} must be a number or one number per expert, got {value!r}') from e
  if arr.ndim == 0:
    arr = np.full((num,), float(arr))
  if arr.shape != (num,):
    raise ValueError(f'{what} needs a scalar or one value per expert ({num}), got {value!r}')
  if not np.all(np.isfinite(arr)):
    raise ValueError(f'{what} must be finite, got {value!r}')
  bad_low = low is not None and np.any(arr <= low if low_open else arr < low)
  bad_high = high is not None and np.any(arr >= high if high_open else arr > high)
  if bad_low or bad_high:
    lo = '(' if low_open else '['
    hi = ')' if high_open else ']'
    raise ValueError(f'{what} must lie in {lo}{low}, {high}{hi}, got {value!r}')
  return arr.astype(dtype)


def density(value: Any, num: int, *, what: str = 'density') -> Any:
  """Densities (fractions of entries kept) in [0, 1], one per expert.

  Kept in float64: they only set integer counts (`_topk.num_kept`), on the
  host, where fp32 rounding would move a count at a .5 boundary.
  """
  if value is None:
    raise ValueError(f'{what} is required')
  return per_expert(value, num, what=what, low=0.0, high=1.0, dtype=np.float64)


def positive(value: Any, *, what: str) -> float:
  """A finite scalar > 0 (eps, power)."""
  number = finite(value, what=what)
  if not is_tracer(number) and number <= 0:
    raise ValueError(f'{what} must be finite and > 0, got {value!r}')
  return number


def finite(value: Any, *, what: str) -> float:
  if is_tracer(value):
    return value
  try:
    number = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{what} must be a number, got {value!r}') from e
  if not np.isfinite(number):
    raise ValueError(f'{what} must be finite, got {value!r}')
  return number


def choice(value: Any, valid: tuple[str, ...], *, what: str) -> str:
  if value not in valid:
    raise ValueError(f'unknown {what} {value!r}; valid: {valid}')
  return value
