"""The RL study's report: collapse detection and the sample-efficiency ratio from run metrics."""

import os

import pytest

from curvopt import studies
from curvopt import train

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def _write_run(workdir, variant, seed, per_step, accuracies, masked=None):
  writer = train.MetricWriter(studies.study_run_dir(workdir, variant, seed), tensorboard=False)
  for step, acc in enumerate(accuracies):
    record = {'completions_seen': step * per_step, 'eval_accuracy': acc}
    if masked is not None and step:
      record['capo/masked_frac'] = masked
    writer.write(step, record)
  writer.close()


@pytest.mark.parametrize(
  'accuracies, collapsed',
  [
    ([0.3, 0.4, 0.5], False),
    ([0.3, 0.5, 0.1], True),  # fell below half of its start at the end
    ([0.3, 0.1, 0.3], False),  # recovered: only the end counts
    ([0.3], False),
  ],
)
def test_is_collapsed(accuracies, collapsed):
  assert studies.is_collapsed(accuracies, 0.5) == collapsed


def test_report_ratio_and_collapse_counts(tmp_path):
  workdir = str(tmp_path)
  for seed in (0, 1):
    # Baseline: 100 completions a step, ends at 0.5 (first reached at 400 completions).
    _write_run(workdir, 'base', seed, 100, [0.2, 0.3, 0.4, 0.45, 0.5])
    # Candidate: 10 a step, reaches 0.5 halfway between 20 and 30 completions.
    _write_run(workdir, 'cand', seed, 10, [0.2, 0.3, 0.4, 0.6, 0.6], masked=0.05)
  _write_run(workdir, 'bad', 0, 10, [0.2, 0.3, 0.05, 0.05, 0.05])
  _write_run(workdir, 'bad', 1, 10, [0.2, 0.3, 0.3, 0.3, 0.3])
  with pytest.raises(FileNotFoundError):
    studies.rl_study_report(
      workdir, ['base', 'cand', 'bad'], (0, 1, 2), baseline='base', candidate='cand'
    )
  text = studies.rl_study_report(
    workdir, ['base', 'cand', 'bad'], (0, 1), baseline='base', candidate='cand'
  )
  assert 'after 400 completions' in text and 'after 25: ratio **16.00x**' in text
  rows = {
    line.split(' | ')[0].strip('| '): line for line in text.splitlines() if line.startswith('| ')
  }
  assert '| 1/2 |' in rows['bad'] and '| 0/2 |' in rows['cand']
  assert rows['cand'].endswith('| 5.00% |') and rows['base'].endswith('| - |')
  assert os.path.exists(os.path.join(workdir, 'rl_accuracy.png'))
  assert os.path.exists(os.path.join(workdir, 'rl_masked.png'))
  # A baseline that ends below its start defines no ratio.
  text = studies.rl_study_report(workdir, ['bad', 'cand'], (0, 1), baseline='bad', candidate='cand')
  assert 'the ratio is undefined' in text


@pytest.mark.parametrize('arg', ['default', 'smoke'])
def test_study_configs(arg):
  config = train.load_config(os.path.join(_CONFIGS, 'rl_study.py'), arg)
  assert config.baseline in config.runs and config.candidate in config.runs
  assert config.runs[config.candidate].capo.enabled
  assert not config.runs[config.baseline].capo.enabled
