"""The main job end to end on its smoke config: report.md with a table and a PNG plot."""

import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_smoke_writes_report_and_plot(tmp_path, mini_data_dir):
  workdir = tmp_path / 'demo'
  cmd = [
    sys.executable,
    os.path.join(REPO, 'experiments', 'demo.py'),
    f'--config={os.path.join(REPO, "configs", "demo.py")}:smoke',
    f'--config.lm.data.data_dir={mini_data_dir}',
    f'--workdir={workdir}',
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = (workdir / 'report.md').read_text()
  assert '## Language-model pretraining' in report
  for optimizer in ('adamw', 'dmuon', 'lanton_mean'):
    row = next(line for line in report.splitlines() if line.startswith(f'| {optimizer} |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[2] == '6'  # steps
    assert all(float(c) > 0 for c in cells[3:6])  # train loss, eval loss, tokens/s
  assert '## LANTON' in report and '| layers_' in report
  assert '## RL with the CAPO mask' in report
  for variant in ('grpo_aggressive', 'capo_aggressive'):
    assert f'| {variant} | 1 | 32 |' in report  # one seed, 2 steps x 4 prompts x 4 completions
  assert '## Model merging: OTA + FFG' in report
  for model in ('base', 'linear', 'ota', 'ota_ffg_d0.3', 'ota_ffg_rank1_d0.3'):
    row = next(line for line in report.splitlines() if line.startswith(f'| {model} |'))
    # Normalized scores: nan where an expert scores 0 (as the smoke config's do).
    scores = [float(c) for c in row.strip('|').split('|')[1:3]]  # the two tasks
    assert all(math.isnan(v) or 0 <= v for v in scores)
  for name in (
    'lm_eval_loss.png',
    'lanton_lr_scale.png',
    'rl_accuracy.png',
    'rl_masked.png',
    'merge_normalized.png',
  ):
    png = workdir / name
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 5000

  # Run again: finished runs are reused, not retrained, and the report is the same table.
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (workdir / 'report.md').read_text().split('_Total')[0] == report.split('_Total')[0]
