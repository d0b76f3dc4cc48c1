"""experiments/sweep_lm.py --report_only on a sweep part-way (fake finished runs, no training)."""

import os
import subprocess
import sys

from curvopt import studies
from curvopt import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, 'configs', 'lm_sweep.py')


def _report(workdir, *flags):
  return subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, 'experiments', 'sweep_lm.py'),
      f'--config={CONFIG}:smoke',
      f'--workdir={workdir}',
      '--report_only',
      *flags,
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    check=False,
  )


def _finished_run(workdir, name, lr, seed, final, steps=4):
  writer = train.MetricWriter(
    studies.sweep_run_dir(str(workdir), name, lr, seed), tensorboard=False
  )
  for step in range(2, steps + 1, 2):
    writer.write(step, {'eval_loss': final + (steps - step)})
  writer.close()


def test_report_only_reports_finished_runs_and_runs_nothing(tmp_path):
  done = _report(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "no finished run of the anchor 'dmuon'" in done.stdout
  _finished_run(tmp_path, 'dmuon', 0.02, 0, 2.0)
  _finished_run(tmp_path, 'dmuon', 0.02, 1, 2.2)
  _finished_run(tmp_path, 'adamw', 0.001, 0, 2.5)
  _finished_run(tmp_path, 'adamw', 0.003, 0, 3.0, steps=2)  # stopped at step 2 of 4
  done = _report(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / 'sweep.md') as f:
    text = f.read()
  rows = [line for line in text.splitlines() if line.startswith('| ')]
  assert '| dmuon | 0.02 | 2 | 2.1 | ' in text  # two seeds, mean 2.1
  assert not any(line.startswith('| adamw | 0.003') for line in rows)  # not finished
  assert not any('lanton' in line for line in rows)  # nothing finished
  assert os.path.exists(tmp_path / 'sweep_eval_loss.png')
  # It ran nothing: no run directories beyond the ones written here.
  assert sorted(os.listdir(tmp_path / 'adamw')) == ['lr0.001', 'lr0.003']
  assert not os.path.exists(tmp_path / 'lanton')


def test_entries_reports_only_those_and_rejects_unknown_names(tmp_path):
  _finished_run(tmp_path, 'dmuon', 0.02, 0, 2.0)
  _finished_run(tmp_path, 'adamw', 0.001, 0, 2.5)
  done = _report(tmp_path, '--entries=adamw')
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [line for line in done.stdout.splitlines() if line.startswith('| ')]
  assert any(line.startswith('| adamw | 0.001') for line in rows)
  assert not any(line.startswith('| dmuon') for line in rows)  # finished, but not asked for
  done = _report(tmp_path, '--entries=adamw,nope')
  assert done.returncode != 0
  assert "--entries ['nope'] are not in the grid" in done.stderr
