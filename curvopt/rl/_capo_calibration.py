"""CAPO thresholds calibrated on a model's own stats instead of a 7B model's.

m_H and m_F scale with the hidden size and the learning rate, so the reference recipes'
thresholds mask almost nothing or almost everything on another model. Logged from a run that
computes the stats without masking, their percentiles over the tokens that carry a gradient
(A != 0) give thresholds that mask a chosen share there.
"""

from typing import NamedTuple, Optional

import numpy as np


class CapoThresholds(NamedTuple):
  """Calibrated thresholds and what they mask on the tokens they came from.

  Attributes:
    tau_H: the percentile_H percentile of |m_H|.
    tau_F: the percentile_F percentile of m_F.
    masked_share: the share of those tokens the symmetric mask (|m_H| < tau_H and
      m_F < tau_F) removes.
    tokens: how many tokens (valid, A != 0) the percentiles are over.
  """

  tau_H: float  # pylint: disable=invalid-name
  tau_F: float  # pylint: disable=invalid-name
  masked_share: float
  tokens: int


def capo_thresholds(
  m_H,  # pylint: disable=invalid-name
  m_F,  # pylint: disable=invalid-name
  advantages,
  *,
  mask: Optional[np.ndarray] = None,
  percentile_H: float,  # pylint: disable=invalid-name
  percentile_F: float,  # pylint: disable=invalid-name
) -> CapoThresholds:
  """tau_H, tau_F = percentiles of |m_H| and m_F over the valid tokens with A != 0.

  Args:
    m_H: per-token m_H (any shape; e.g. every logged token of many steps, flattened).
    m_F: per-token m_F, the shape of m_H.
    advantages: per-token advantages, the shape of m_H.
    mask: None (every token valid) or the valid tokens (nonzero), the shape of m_H.
    percentile_H: in (0, 100]: the share of those tokens whose |m_H| stays below tau_H.
    percentile_F: in (0, 100], for m_F and tau_F.

  Returns:
    CapoThresholds; ValueError when no token is valid with A != 0 or a stat is non-finite.
  """
  m_h, m_f, adv = (np.asarray(x, np.float64) for x in (m_H, m_F, advantages))
  valid = np.ones(m_h.shape, bool) if mask is None else np.asarray(mask) != 0
  if not m_h.shape == m_f.shape == adv.shape == valid.shape:
    raise ValueError(
      f'm_H, m_F, advantages and mask must share a shape, got {m_h.shape}, {m_f.shape}, '
      f'{adv.shape}, {valid.shape}'
    )
  for name, q in (('percentile_H', percentile_H), ('percentile_F', percentile_F)):
    if not 0.0 < q <= 100.0:
      raise ValueError(f'{name} must be in (0, 100], got {q}')
  members = valid & (adv != 0)
  if not members.any():
    raise ValueError('no valid token with a nonzero advantage to calibrate on')
  abs_h, f = np.abs(m_h[members]), m_f[members]
  if not (np.isfinite(abs_h).all() and np.isfinite(f).all()):
    raise ValueError('m_H or m_F is non-finite on a valid token with a nonzero advantage')
  tau_h = float(np.percentile(abs_h, percentile_H))
  tau_f = float(np.percentile(f, percentile_F))
  masked = ~((abs_h < tau_h) & (f < tau_f))
  return CapoThresholds(tau_h, tau_f, float(masked.mean()), int(members.sum()))
