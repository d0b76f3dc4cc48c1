"""The RL study: run order, collapse from the running maximum, the baseline-gain rule, the
sample-efficiency ratio and its bootstrap interval, paired comparisons, masked shares."""

import math
import os

import ml_collections
import numpy as np
import pytest

from curvopt import studies
from curvopt import train

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def _write_run(workdir, variant, seed, per_step, accuracies, *, se=0.01, masked=None):
  writer = train.MetricWriter(studies.study_run_dir(workdir, variant, seed), tensorboard=False)
  for step, acc in enumerate(accuracies):
    record = {
      'completions_seen': step * per_step,
      'eval_sampled_accuracy': acc,
      'eval_sampled_accuracy_se': se,
      'eval_accuracy': acc / 2,
    }
    if masked is not None and step:
      record.update({f'capo/{k}': v for k, v in masked.items()})
    writer.write(step, record)
  writer.close()


@pytest.mark.parametrize(
  'accuracies, index, drop',
  [
    ([0.3, 0.4, 0.5], None, 0.0),
    ([0.3, 0.5, 0.34], 2, 0.16),  # 0.16 below the running maximum
    ([0.3, 0.5, 0.36], None, 0.14),  # 0.14: not yet
    ([0.45, 0.3, 0.5], 1, 0.15),  # exactly 0.15 counts, and a recovery does not undo it
    ([0.6, 0.5, 0.4, 0.3], 2, 0.3),  # a slide from the start
    ([0.3], None, 0.0),
  ],
)
def test_collapse_is_judged_from_the_running_maximum(accuracies, index, drop):
  assert studies.collapse_index(accuracies, 0.15) == index
  assert studies.is_collapsed(accuracies) == (index is not None)
  assert studies.largest_drop(accuracies) == pytest.approx(drop)


def test_baseline_gain_takes_the_larger_of_seed_and_evaluation_error():
  gain = studies.baseline_gain([0.3, 0.3, 0.3], [0.40, 0.44, 0.42], [0.01] * 3, [0.02] * 3)
  assert gain.mean == pytest.approx(0.12)
  assert gain.seed_se == pytest.approx(np.std([0.10, 0.14, 0.12], ddof=1) / math.sqrt(3))
  assert gain.eval_se == pytest.approx(math.sqrt((0.01**2 + 0.02**2) / 3))
  assert gain.se == max(gain.seed_se, gain.eval_se) and gain.significant()
  # The old study's baseline: 0.332 -> 0.336 against an evaluation error of ~0.03.
  flat = studies.baseline_gain([0.332] * 3, [0.32, 0.35, 0.338], [0.03] * 3, [0.03] * 3)
  assert not flat.significant()
  one_seed = studies.baseline_gain([0.3], [0.5], [0.02], [0.02])
  assert math.isnan(one_seed.seed_se) and one_seed.se == one_seed.eval_se
  # No gain is never significant, even with no measured error; nor is an unknown error.
  assert not studies.baseline_gain([0.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3).significant()
  assert not studies.baseline_gain([0.3], [0.5], [math.nan], [math.nan]).significant()


def test_bootstrap_counts_resamples_that_never_reach_the_target():
  base = [([0, 100, 200], [0.2, 0.3, 0.5])] * 3
  # Seed 0 of the candidate reaches 0.5 at 20 completions, the others never do: a resample
  # reaches it only through seed 0's weight in the mean curve.
  cand = [([0, 10, 20], [0.2, 0.4, 1.0]), ([0, 10, 20], [0.2, 0.2, 0.2])]
  low, high, never = studies.bootstrap_ratio(base, cand, resamples=400)
  # Resamples: both seeds 0 (mean 1.0 at 20), mixed (0.6 at 20), both seeds 1 (never).
  assert never == pytest.approx(0.25, abs=0.07)
  assert low == 0.0 and high == pytest.approx(200 / (10 + 10 * 0.1 / 0.6), rel=1e-6)


def _study(workdir, base_curve, base_se=0.01):
  for seed in (0, 1, 2):
    # Baseline: 100 completions a step; candidate: 10 a step, a bit different per seed.
    _write_run(workdir, 'base', seed, 100, [a + 0.01 * seed for a in base_curve], se=base_se)
    _write_run(
      workdir,
      'cand',
      seed,
      10,
      [0.2, 0.3, 0.4, 0.6 + 0.01 * seed, 0.6],
      masked={'nz/masked_frac': 0.04, 'pos/masked_frac': 0.1, 'neg/masked_frac': 0.02},
    )
    _write_run(workdir, 'rand', seed, 10, [0.2, 0.3, 0.3, 0.3 + 0.02 * seed, 0.25])
  # Masked runs whose steps never had a token with A != 0: their shares are undefined.
  no_signal = {'nz/masked_frac': math.nan}
  _write_run(workdir, 'bad', 0, 10, [0.2, 0.4, 0.2, 0.2, 0.2], masked=no_signal)
  _write_run(workdir, 'bad', 1, 10, [0.2, 0.3, 0.3, 0.3, 0.3], masked=no_signal)


def _curves(workdir, variant, seeds=(0, 1, 2)):
  """Per seed (completions, sampled accuracies), read back from the metrics."""
  out = []
  for seed in seeds:
    records = train.read_metrics(studies.study_run_dir(workdir, variant, seed))
    out.append(
      ([r['completions_seen'] for r in records], [r['eval_sampled_accuracy'] for r in records])
    )
  return out


def _rows(text):
  return {
    line.split(' | ')[0].strip('| '): line.split(' | ')
    for line in text.splitlines()
    if line.startswith('| ')
  }


def test_report_ratio_interval_comparisons_and_collapse(tmp_path):
  workdir = str(tmp_path)
  _study(workdir, [0.2, 0.3, 0.4, 0.45, 0.5])
  text = studies.rl_study_report(
    workdir,
    ['base', 'cand', 'rand', 'bad'],
    (0, 1, 2),
    seeds_by_variant={'bad': (0, 1)},
    baseline='base',
    candidate='cand',
    comparisons=[('cand', 'rand')],
    resamples=200,
  )
  # Baseline: mean curve 0.21 ... 0.51, reached at 400; the candidate's mean curve passes
  # 0.51 between 20 (0.4) and 30 (0.61).
  x = 20 + 10 * (0.51 - 0.4) / (0.61 - 0.4)
  assert f'after 400 completions, cand after {x:.0f}: ratio **{400 / x:.2f}x**' in text
  low, high, _ = studies.bootstrap_ratio(
    _curves(workdir, 'base'), _curves(workdir, 'cand'), resamples=200
  )
  assert f'[{low:.2f}, {high:.2f}]' in text and low <= 400 / x <= high
  rows = _rows(text)
  assert rows['bad'][9] == '1/2' and rows['cand'][9] == '0/3'  # collapsed
  assert float(rows['bad'][6]) == pytest.approx(0.2)  # the largest drop
  assert rows['cand'][10] == '4.00%' and rows['cand'][12] == '10.00% / 2.00%'
  assert rows['base'][10] == '-'
  assert rows['bad'][10] == 'n/a' and rows['bad'][12] == 'n/a / n/a'
  assert float(rows['cand'][8]) == pytest.approx(0.3)  # final greedy: half the sampled
  # cand - rand on paired seeds: 0.6 - (0.25) each.
  assert rows['cand - rand'][1:4] == ['3', '0.35', '[0.3500, 0.3500]']
  assert os.path.exists(os.path.join(workdir, 'rl_accuracy.png'))
  assert os.path.exists(os.path.join(workdir, 'rl_masked.png'))


def test_report_refuses_a_ratio_against_a_flat_baseline(tmp_path):
  workdir = str(tmp_path)
  _study(workdir, [0.33, 0.32, 0.35, 0.33, 0.336], base_se=0.03)
  text = studies.rl_study_report(
    workdir, ['base', 'cand'], (0, 1, 2), baseline='base', candidate='cand', resamples=50
  )
  assert '**no ratio**, the gain is under 3 standard errors' in text
  assert 'ratio **' not in text


def test_report_says_when_the_candidate_never_reaches_the_baseline(tmp_path):
  workdir = str(tmp_path)
  _study(workdir, [0.2, 0.3, 0.5, 0.6, 0.7])
  text = studies.rl_study_report(
    workdir, ['base', 'rand'], (0, 1, 2), baseline='base', candidate='rand', resamples=50
  )
  assert 'rand never reaches it' in text
  with pytest.raises(FileNotFoundError):
    studies.rl_study_report(workdir, ['base', 'rand'], (0, 5), baseline='base', candidate='rand')


def test_study_runs_seed_by_seed_in_the_given_order_after_checking_every_config():
  calls = []

  def fake_train(config, directory):
    calls.append((os.path.basename(os.path.dirname(directory)), config.seed, config.init_from))

  runs = ml_collections.ConfigDict(
    {name: train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'test') for name in ('a', 'b', 'c')}
  )
  studies.run_rl_study(
    runs,
    (0, 1),
    '/tmp/study',
    init_from='SFT',
    variants=('c', 'a', 'b'),
    seeds_by_variant={'b': (1, 2)},
    train_fn=fake_train,
  )
  assert calls == [
    ('c', 0, 'SFT'),
    ('a', 0, 'SFT'),
    ('c', 1, 'SFT'),
    ('a', 1, 'SFT'),
    ('b', 1, 'SFT'),
    ('b', 2, 'SFT'),
  ]
  calls.clear()
  runs.c.capo.tau_H = None  # e.g. calibrated thresholds not yet set
  with pytest.raises(ValueError, match='capo.tau_H is unset'):
    studies.run_rl_study(runs, (0,), '/tmp/study', init_from='', train_fn=fake_train)
  assert not calls
  with pytest.raises(ValueError, match=r"unknown variant\(s\) \['d'\]"):
    studies.run_rl_study(runs, (0,), '/tmp/study', init_from='', variants=['d'])


@pytest.mark.parametrize('arg', ['default', 'sweep', 'multiplier', 'gpu', 'smoke'])
def test_study_configs(arg):
  config = train.load_config(os.path.join(_CONFIGS, 'rl_study.py'), arg)
  assert sorted(config.variants) == sorted(config.runs)
  for name in config.runs:
    run = config.runs[name].copy_and_resolve_references()
    assert run.model.tie_embeddings is False and run.schedule.name == 'warmup_cosine'
  if arg in ('default', 'gpu', 'smoke'):
    arms = ('grpo_aggressive', 'capo_aggressive', 'capo_calibrated', 'random_aggressive')
    assert config.variants[:4] == arms  # aggressive arms first
    modes = {v: config.runs[v].capo.mode for v in arms}
    assert modes == dict(zip(arms, ('off', 'capo', 'capo', 'random')))
  if arg == 'default':
    assert config.baseline == 'grpo_conservative' and config.candidate == 'capo_calibrated'
    assert config.seeds == (0, 1, 2, 3, 4) and config.seeds_by_variant.grpo_conservative == (
      0,
      1,
      2,
    )
    assert ('capo_calibrated', 'random_aggressive') in config.comparisons
    config.update(conservative_lr=3e-5, multiplier=10, tau_H=0.2, tau_F=0.01, random_rate=0.04)
    runs = {k: v.copy_and_resolve_references() for k, v in config.runs.items()}
    assert runs['grpo_conservative'].optimizer.learning_rate == 3e-5
    for arm in arms:
      assert runs[arm].optimizer.learning_rate == pytest.approx(3e-4)
      assert runs[arm].rollout.prompts_per_step * runs[arm].rollout.group_size == 32
    assert (runs['capo_calibrated'].capo.tau_H, runs['capo_calibrated'].capo.tau_F) == (0.2, 0.01)
    assert runs['random_aggressive'].capo.random_rate == 0.04
    assert runs['capo_aggressive'].capo.tau_H == 0.01  # the reference recipe
  if arg == 'gpu':
    assert config.seeds == tuple(range(8)) and 'grpo_conservative' not in config.runs
  if arg == 'multiplier':
    config.conservative_lr = 4e-5
    rates = [
      config.runs[v].copy_and_resolve_references().optimizer.learning_rate for v in config.variants
    ]
    assert rates == pytest.approx([2e-4, 4e-4])
  if arg == 'smoke':
    for run in config.runs.values():
      train.check_rl_config(run.copy_and_resolve_references())


def test_finished_seeds_are_those_that_logged_their_last_step(tmp_path):
  workdir = str(tmp_path)
  runs = ml_collections.ConfigDict(
    {v: train.load_config(os.path.join(_CONFIGS, 'rl.py'), 'test') for v in ('a', 'b')}
  )  # 4 steps each
  _write_run(workdir, 'a', 0, 10, [0.1] * 5)  # steps 0..4: finished
  _write_run(workdir, 'a', 1, 10, [0.1] * 3)  # stopped at step 2
  _write_run(workdir, 'b', 0, 10, [0.1] * 5)
  got = studies.finished_seeds(workdir, runs, ['a', 'b'], (0, 1, 2), {'b': (0,)})
  assert got == {'a': (0,), 'b': (0,)}
