"""Threshold calibration from a capo.mode='log' run's per-token files."""

import os

import numpy as np
import pytest

from curvopt import rl
from curvopt import studies
from curvopt import train
from curvopt.train import _rl

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def _fake_log_run(run_dir, steps=6, warmup=2):
  """What a log-mode run leaves: per-step token files and a warm-up in its learning rate."""
  rng = np.random.default_rng(0)
  writer = train.MetricWriter(run_dir, tensorboard=False)
  pooled = {'m_H': [], 'm_F': [], 'advantages': []}
  for step in range(1, steps + 1):
    writer.write(step, {'learning_rate': min(step, warmup) * 1e-3})
    mask = rng.uniform(size=(8, 5)) < 0.8
    adv = rng.normal(size=8).astype(np.float32)
    adv[:2] = 0.0
    m_h = rng.normal(size=(8, 5)).astype(np.float32) * step  # warm-up steps are smaller
    m_f = rng.exponential(size=(8, 5)).astype(np.float32) * step
    _rl._save_capo_tokens(  # pylint: disable=protected-access
      os.path.join(run_dir, train.CAPO_TOKENS_DIR), step, {'m_H': m_h, 'm_F': m_f}, adv, mask
    )
    if step > warmup:
      keep = mask & (adv[:, None] != 0)
      pooled['m_H'].append(m_h[keep])
      pooled['m_F'].append(m_f[keep])
      pooled['advantages'].append(np.broadcast_to(adv[:, None], mask.shape)[keep])
  writer.close()
  return {k: np.concatenate(v) for k, v in pooled.items()}


def test_calibration_pools_the_steps_after_the_warmup(tmp_path):
  run_dir = str(tmp_path)
  pooled = _fake_log_run(run_dir)
  assert studies.peak_rate_step(run_dir) == 2
  got = studies.capo_calibration(run_dir, percentile_H=95, percentile_F=90)
  want = rl.capo_thresholds(
    pooled['m_H'], pooled['m_F'], pooled['advantages'], percentile_H=95, percentile_F=90
  )
  assert got == want and got.tokens == len(pooled['m_H'])
  assert (np.abs(pooled['advantages']) > 0).all()  # only tokens with A != 0 were saved
  everything = studies.capo_calibration(run_dir, percentile_H=95, percentile_F=90, after_step=0)
  assert everything.tokens > got.tokens
  with pytest.raises(ValueError, match="no per-token CAPO stats after step 6 .* capo.mode='log'"):
    studies.capo_calibration(run_dir, percentile_H=95, percentile_F=90, after_step=6)


def _digit_reward(prompts, completions, answers):
  del prompts, answers
  return np.asarray(
    [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions], np.float32
  )


@pytest.mark.slow
def test_a_log_run_masks_nothing_and_calibrates(tmp_path):
  config = train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'test')
  config.capo.mode = 'log'
  config.task.data_dir = str(tmp_path / 'tfds')
  run_dir = str(tmp_path / 'run')
  train.train_rl(config, run_dir, reward_fn=_digit_reward)
  files = sorted(os.listdir(os.path.join(run_dir, train.CAPO_TOKENS_DIR)))
  assert files == [f'step_{s:06d}.npz' for s in range(1, 5)]
  out = studies.capo_calibration(run_dir, percentile_H=90, percentile_F=90, after_step=0)
  assert out.tokens > 0 and out.tau_H > 0 and out.tau_F > 0 and 0 < out.masked_share < 0.25
