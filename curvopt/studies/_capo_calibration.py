"""CAPO thresholds from a calibration run: the percentiles of its logged per-token stats."""

import glob
import os
import re
from typing import Optional

import numpy as np

from curvopt import rl
from curvopt import train

_STEP_FILE = re.compile(r'step_(\d+)\.npz$')


def peak_rate_step(run_dir: str) -> int:
  """The first step at which the run's logged learning rate reached its maximum (the end of
  its warm-up)."""
  records = [r for r in train.read_metrics(run_dir) if 'learning_rate' in r]
  if not records:
    raise ValueError(f'{run_dir!r} logged no learning_rate')
  peak = max(r['learning_rate'] for r in records)
  return min(r['step'] for r in records if r['learning_rate'] == peak)


def capo_calibration(
  run_dir: str,
  *,
  percentile_H: float,  # pylint: disable=invalid-name
  percentile_F: float,  # pylint: disable=invalid-name
  after_step: Optional[int] = None,
) -> rl.CapoThresholds:
  """Thresholds at the given percentiles of |m_H| and m_F over the A != 0 tokens that a
  capo.mode='log' run wrote (run_dir/capo_tokens/step_*.npz) in its steps after `after_step`
  (None: after its warm-up, see peak_rate_step)."""
  if after_step is None:
    after_step = peak_rate_step(run_dir)
  paths = glob.glob(os.path.join(run_dir, train.CAPO_TOKENS_DIR, 'step_*.npz'))
  chosen = sorted(p for p in paths if int(_STEP_FILE.search(p).group(1)) > after_step)
  if not chosen:
    raise ValueError(
      f'no per-token CAPO stats after step {after_step} under {run_dir!r} '
      f"(found {len(paths)} step files; the run needs capo.mode='log')"
    )
  parts = {'m_H': [], 'm_F': [], 'advantages': []}
  for path in chosen:
    with np.load(path) as step:
      for key, values in parts.items():
        values.append(step[key])
  return rl.capo_thresholds(
    *(np.concatenate(parts[k]) for k in ('m_H', 'm_F', 'advantages')),
    percentile_H=percentile_H,
    percentile_F=percentile_F,
  )
