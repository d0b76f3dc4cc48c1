"""The learning-rate sweep: two stages, best-point selection, steps-to-loss, report."""

import json
import math
import os
import shutil

import ml_collections
import pytest

from curvopt import studies
from curvopt import train

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


@pytest.mark.parametrize(
  'steps, values, target, expected',
  [
    ([10, 20, 30], [3.0, 2.0, 1.0], 1.5, 25.0),  # interpolated between 20 and 30
    ([10, 20, 30], [3.0, 2.0, 1.0], 2.0, 20.0),  # hit exactly at a logged point
    ([10, 20, 30], [3.0, 2.0, 1.0], 3.5, 10.0),  # already below at the first point
    ([10, 20, 30], [3.0, 2.0, 1.0], 0.5, math.inf),  # never reached
    ([10, 20, 30], [3.0, 1.0, 2.0], 1.5, 17.5),  # the first crossing counts
  ],
)
def test_steps_to_reach(steps, values, target, expected):
  assert studies.steps_to_reach(steps, values, target) == pytest.approx(expected)
  # The same curve mirrored is an accuracy reaching -target from below.
  assert studies.steps_to_reach(
    steps, [-v for v in values], -target, higher_is_better=True
  ) == pytest.approx(expected)


# Fake runs: a final loss that depends on the learning rate and a little on the seed, so the
# best point and the seed statistics are known in advance.
_BEST_LR = {'a': 0.02, 'b': 0.3}


def _fake_train(config, workdir):
  best = _BEST_LR[config.optimizer.tag]
  final = 1.0 + abs(math.log(config.optimizer.learning_rate / best)) + 0.01 * config.seed
  writer = train.MetricWriter(workdir, tensorboard=False)
  for step in (10, 20, 30, 40):
    writer.write(step, {'eval_loss': final + (40 - step) / 10})
  writer.close()
  _fake_train.calls.append((config.optimizer.tag, config.optimizer.learning_rate, config.seed))


def _sweep(tmp_path, train_fn=_fake_train):
  base = ml_collections.ConfigDict(
    {
      'seed': 0,
      'total_steps': 40,
      'data': {'data_dir': None},
      'optimizer': {'learning_rate': 0.0, 'tag': ''},
    }
  )
  grid = ml_collections.ConfigDict(
    {
      'a': {'tag': 'a', 'learning_rate': [0.01, 0.02, 0.04]},
      'b': {'tag': 'b', 'learning_rate': [0.1, 0.3]},
    }
  )
  _fake_train.calls = []
  results = studies.run_sweep(base, grid, (0, 1, 2), str(tmp_path), train_fn=train_fn)
  return results, list(_fake_train.calls)


def _stop_part_way(tmp_path, name, lr, seed):
  """Cuts a finished fake run's metrics back to step 20, as if it had been stopped there."""
  path = os.path.join(studies.sweep_run_dir(str(tmp_path), name, lr, seed), 'metrics.jsonl')
  with open(path) as f:
    lines = f.readlines()
  with open(path, 'w') as f:
    f.writelines(lines[:2])


def test_a_report_of_a_sweep_part_way_shows_only_finished_runs(tmp_path):
  results, _ = _sweep(tmp_path)
  # Undo part of it: a's seed 2 never started, b's seed 1 stopped at step 20, b at 0.1 never ran.
  shutil.rmtree(studies.sweep_run_dir(str(tmp_path), 'a', 0.02, 2))
  shutil.rmtree(studies.sweep_run_dir(str(tmp_path), 'b', 0.1, 0))
  _stop_part_way(tmp_path, 'b', 0.3, 1)
  report, calls = _sweep(tmp_path, train_fn=lambda config, workdir: None)
  assert calls == []
  assert [p.learning_rate for p in report['a']] == [0.01, 0.02, 0.04]
  assert sorted(studies.best_point(report['a']).curves) == [0, 1]
  assert [p.learning_rate for p in report['b']] == [0.3]
  assert sorted(report['b'][0].curves) == [0, 2]
  # Nothing finished at all: no entries.
  assert _sweep(tmp_path / 'empty', train_fn=lambda config, workdir: None)[0] == {}


def test_sweep_runs_every_rate_then_the_best_ones_seeds(tmp_path):
  results, calls = _sweep(tmp_path)
  # Breadth first: every rate of every entry, then one seed round at a time across entries.
  assert calls == [
    ('a', 0.01, 0),
    ('a', 0.02, 0),
    ('a', 0.04, 0),
    ('b', 0.1, 0),
    ('b', 0.3, 0),
    ('a', 0.02, 1),
    ('b', 0.3, 1),
    ('a', 0.02, 2),
    ('b', 0.3, 2),
  ]
  best = studies.best_point(results['a'])
  assert best.learning_rate == 0.02
  assert best.final_losses == pytest.approx([1.0, 1.01, 1.02])
  assert best.mean_curve == ([10, 20, 30, 40], pytest.approx([4.01, 3.01, 2.01, 1.01]))
  assert os.path.exists(
    os.path.join(studies.sweep_run_dir(str(tmp_path), 'b', 0.3, 2), 'metrics.jsonl')
  )


def test_a_rerun_sweep_reads_finished_runs_back_without_training(tmp_path):
  first, _ = _sweep(tmp_path)
  # Part-way run: b's seed 1 stopped at step 20, so only it trains again.
  _stop_part_way(tmp_path, 'b', 0.3, 1)
  again, calls = _sweep(tmp_path)
  assert calls == [('b', 0.3, 1)]
  assert {n: [p.curves for p in ps] for n, ps in again.items()} == {
    n: [p.curves for p in ps] for n, ps in first.items()
  }


def test_sweep_report_steps_ratio_against_the_anchor(tmp_path):
  results, _ = _sweep(tmp_path)
  text = studies.sweep_report(results, 'b')
  # b's mean final loss 1.01 at step 40; a's mean curve (offset 0) reaches 1.01 at step 40 too,
  # while a at lr 0.01 (stage one only) is not a best point.
  rows = {
    line.split(' | ')[0].strip('| '): line
    for line in text.splitlines()
    if line.startswith('| a') or line.startswith('| b')
  }
  assert rows['b'].endswith('| 1 |')
  assert rows['a'].endswith('| 1 |')
  with pytest.raises(ValueError, match="anchor 'c'"):
    studies.sweep_report(results, 'c')


def test_sweep_rejects_an_empty_grid_entry(tmp_path):
  base = ml_collections.ConfigDict(
    {'seed': 0, 'total_steps': 40, 'data': {'data_dir': None}, 'optimizer': {'learning_rate': 0.0}}
  )
  grid = ml_collections.ConfigDict({'a': {'learning_rate': []}})
  with pytest.raises(ValueError, match="'a' has no learning rates"):
    studies.run_sweep(base, grid, (0,), str(tmp_path), train_fn=_fake_train)


@pytest.mark.parametrize('arg', ['tiny', 'small', 'smoke'])
def test_sweep_configs_name_registry_optimizers(arg):
  config = train.load_config(os.path.join(_CONFIGS, 'lm_sweep.py'), arg)
  assert config.anchor in config.grid
  for entry in config.grid.values():
    assert entry.name in train.OPTIMIZERS
    assert len(entry.learning_rate) >= 1


# Fake runs for the paired comparisons: arm 'c' ends 0.02-0.04 below 'a' on every seed, 'd' is
# 'a' give or take 0.03; each entry's best rate is 0.02; the run's own total_steps is logged.
_OFFSETS = {'a': (0.0, 0.0, 0.0, 0.0), 'c': (-0.03, -0.02, -0.04, -0.01), 'd': (0.03, -0.03, 0, 0)}


def _fake_train_offsets(config, workdir):
  tag = config.optimizer.tag
  final = (
    1.0
    + abs(math.log(config.optimizer.learning_rate / 0.02))
    + 0.1 * config.seed
    + _OFFSETS[tag][config.seed]
  )
  writer = train.MetricWriter(workdir, tensorboard=False)
  for step in range(10, config.total_steps + 1, 10):
    writer.write(step, {'eval_loss': final + (config.total_steps - step) / 10})
  writer.close()
  _fake_train_offsets.calls.append((tag, config.optimizer.learning_rate, config.seed))
  _fake_train_offsets.steps.append(config.total_steps)


def _paired_sweep(tmp_path, train_fn=_fake_train_offsets):
  base = ml_collections.ConfigDict(
    {
      'seed': 0,
      'total_steps': 40,
      'data': {'data_dir': None},
      'optimizer': {'learning_rate': 0.0, 'tag': ''},
    }
  )
  grid = ml_collections.ConfigDict(
    {
      'a': {'tag': 'a', 'learning_rate': [0.01, 0.02]},
      'c': {'tag': 'c', 'learning_rate': [0.02, 0.04]},
      'c_20': {'tag': 'c', 'learning_rate': [0.02], 'base_overrides': {'total_steps': 20}},
      'd': {'tag': 'd', 'learning_rate': [0.02]},
    }
  )
  _fake_train_offsets.calls, _fake_train_offsets.steps = [], []
  return studies.run_sweep(base, grid, (0, 1, 2, 3), str(tmp_path), train_fn=train_fn)


def test_an_entry_runs_with_its_own_total_steps_and_is_read_back(tmp_path):
  results = _paired_sweep(tmp_path)
  calls = list(zip(_fake_train_offsets.calls, _fake_train_offsets.steps))
  assert [s for (tag, _, _), s in calls if tag == 'c' and s == 20] == [20] * 4
  assert studies.best_point(results['c_20']).mean_curve[0] == [10, 20]
  # Finished at its own 20 steps: a rerun trains nothing.
  _paired_sweep(tmp_path)
  assert _fake_train_offsets.calls == []


def test_base_overrides_must_name_existing_fields(tmp_path):
  base = ml_collections.ConfigDict(
    {'seed': 0, 'total_steps': 40, 'data': {'data_dir': None}, 'optimizer': {'learning_rate': 0.0}}
  )
  for overrides, match in [
    ({'total_step': 20}, "'total_step' is not in the base config"),
    ({'data': {'eval_batch': 2}}, "'data.eval_batch' is not in the base config"),
    ({'seed': {'x': 1}}, "'seed' is not a section"),
  ]:
    grid = ml_collections.ConfigDict({'a': {'learning_rate': [0.1], 'base_overrides': overrides}})
    with pytest.raises(ValueError, match=match):
      studies.run_sweep(base, grid, (0,), str(tmp_path), train_fn=_fake_train)


def test_sweep_report_paired_differences_and_decisions(tmp_path):
  results = _paired_sweep(tmp_path)
  text = studies.sweep_report(results, 'a', 'c-a, c_20-a,d-a')
  rows = {
    line.split(' | ')[0].strip('| '): line.split(' | ')
    for line in text.split('Paired differences')[1].splitlines()
    if line.startswith('| ') and ' - ' in line.split(' | ')[0]
  }
  assert sorted(rows) == ['c - a', 'c_20 - a', 'd - a']
  # c - a: -0.03, -0.02, -0.04, -0.01 (hand-computed in test_studies_stats).
  c = rows['c - a']
  assert c[1:5] == ['4', '0 / 1 / 2 / 3', '-0.0300 / -0.0200 / -0.0400 / -0.0100', '-0.0250']
  assert c[6] == '[-0.0455, -0.0045]'
  assert c[7].strip(' |') == 'lower'
  # The 20-step run ends at the same loss as its 40-step one (the fake's curve ends at `final`).
  assert rows['c_20 - a'][7].strip(' |') == 'lower'
  assert rows['d - a'][7].strip(' |') == 'no effect measured'
  pairs = studies.paired_comparisons(results, [('c', 'a')])
  assert pairs[0][2].mean == pytest.approx(-0.025)


def test_comparisons_of_arms_without_finished_runs_measure_nothing(tmp_path):
  results = _paired_sweep(tmp_path)
  del results['d']
  ((_, _, d),) = studies.paired_comparisons(results, 'd-a')
  assert d.n == 0 and d.decision == 'no effect measured'
  assert 'n/a (< 2 seeds)' in studies.sweep_report(results, 'a', 'd-a')
  # No comparisons: no table.
  assert 'Paired differences' not in studies.sweep_report(results, 'a')


def test_parse_comparisons():
  assert studies.parse_comparisons('e-a, c-b,') == [('e', 'a'), ('c', 'b')]
  assert studies.parse_comparisons('') == []
  assert studies.parse_comparisons([('e', 'a')], valid=['a', 'e']) == [('e', 'a')]
  with pytest.raises(ValueError, match="'arm-reference'"):
    studies.parse_comparisons('e-a-b')
  with pytest.raises(ValueError, match="'arm-reference'"):
    studies.parse_comparisons('e')
  with pytest.raises(ValueError, match=r"unknown entries \['x'\]"):
    studies.parse_comparisons('x-a', valid=['a', 'e'])


def test_sweep_summary_is_plain_json_data(tmp_path):
  results = _paired_sweep(tmp_path)
  summary = json.loads(json.dumps(studies.sweep_summary(results, 'c-a,c_20-a')))
  assert summary['entries']['c']['best_learning_rate'] == 0.02
  point = summary['entries']['c_20']['points'][0]
  assert point['final_step'] == {'0': 20, '1': 20, '2': 20, '3': 20}
  assert point['final_eval_loss']['1'] == pytest.approx(1.08)
  first = summary['comparisons'][0]
  assert (first['arm'], first['reference'], first['n'], first['decision']) == ('c', 'a', 4, 'lower')
  assert first['low'] == pytest.approx(-0.045543, abs=1e-6)
