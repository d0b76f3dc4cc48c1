"""The RL regime study: every variant x seed from one SFT policy, then accuracy, collapse and
sample efficiency against the conservative baseline."""

import math
import os
from typing import Callable, Sequence

from absl import logging
import ml_collections
import numpy as np

from curvopt import train
from curvopt.studies import _report
from curvopt.studies import _sweep


def study_run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f'seed{seed}')


def run_rl_study(
  runs: ml_collections.ConfigDict,
  seeds: Sequence[int],
  workdir: str,
  *,
  init_from: str,
  train_fn: Callable = train.train_rl,
) -> None:
  """Trains every run config (variant name -> configs/rl.py config) with every seed.

  Each run has its own directory, so an interrupted study resumes run by run.
  """
  for variant, base in runs.items():
    for seed in seeds:
      config = base.copy_and_resolve_references()
      config.seed = seed
      config.init_from = init_from
      if not config.task.data_dir:  # one prepared task data set for the whole study
        config.task.data_dir = os.path.join(workdir, 'tfds')
      directory = study_run_dir(workdir, variant, seed)
      logging.info('RL study run %s seed %d in %s', variant, seed, directory)
      train_fn(config, directory)


def _mean_curve(curves: Sequence[tuple[list, list]]) -> tuple[list, list]:
  """Mean over runs at the x values every run logged."""
  common = sorted(set.intersection(*(set(x) for x, _ in curves)))
  return common, [float(np.mean([dict(zip(x, y))[c] for x, y in curves])) for c in common]


def _by_completions(run_dir: str, key: str) -> tuple[list, list]:
  records = {r['step']: r for r in train.read_metrics(run_dir)}
  steps = sorted(s for s, r in records.items() if key in r and 'completions_seen' in r)
  return ([records[s]['completions_seen'] for s in steps], [records[s][key] for s in steps])


def is_collapsed(accuracies: Sequence[float], fraction: float) -> bool:
  """A run collapsed when its final held-out accuracy fell below `fraction` of its start."""
  return len(accuracies) > 1 and accuracies[-1] < fraction * accuracies[0]


def rl_study_report(
  workdir: str,
  variants: Sequence[str],
  seeds: Sequence[int],
  *,
  baseline: str,
  candidate: str,
  collapse_fraction: float = 0.5,
  plot_dir: str | None = None,
) -> str:
  """Markdown: per-variant accuracy, collapse and masked share; the sample-efficiency ratio.

  The ratio is the completions `baseline` needed to reach its final mean held-out accuracy
  over the completions `candidate`'s mean curve needed to first reach that same accuracy.
  Writes rl_accuracy.png and rl_masked.png to `plot_dir` (default: beside the runs).
  """
  rows, acc_curves, masked_curves = [], {}, {}
  for variant in variants:
    runs = [study_run_dir(workdir, variant, s) for s in seeds]
    accs = [_by_completions(r, 'eval_accuracy') for r in runs]
    finals = np.array([a[-1] if a else math.nan for _, a in accs])
    starts = np.array([a[0] if a else math.nan for _, a in accs])
    collapsed = sum(is_collapsed(a, collapse_fraction) for _, a in accs)
    masked = [_by_completions(r, 'capo/masked_frac') for r in runs]
    has_mask = all(m for _, m in masked)
    acc_curves[variant] = _mean_curve(accs)
    if has_mask:
      masked_curves[variant] = _mean_curve(masked)
    rows.append(
      [
        variant,
        len(runs),
        int(acc_curves[variant][0][-1]),
        float(np.mean(starts)),
        float(np.mean(finals)),
        float(np.std(finals)),
        float(np.max(acc_curves[variant][1])),
        f'{collapsed}/{len(runs)}',
        f'{100 * max(max(m) for _, m in masked):.2f}%' if has_mask else '-',
      ]
    )
  target_x, target_y = acc_curves[baseline]
  target = target_y[-1]
  baseline_needs = _sweep.steps_to_reach(target_x, target_y, target, higher_is_better=True)
  candidate_needs = _sweep.steps_to_reach(*acc_curves[candidate], target, higher_is_better=True)
  ratio = baseline_needs / max(candidate_needs, 1.0)
  plot_dir = plot_dir or workdir
  acc_plot = _report.plot_curves(
    acc_curves,
    os.path.join(plot_dir, 'rl_accuracy.png'),
    title=f'held-out accuracy, mean of {len(seeds)} seeds',
    xlabel='completions seen',
    ylabel='greedy exact match',
  )
  parts = [
    _report.markdown_table(
      [
        'variant',
        'seeds',
        'completions',
        'start acc',
        'final acc (mean)',
        'final acc (std)',
        'best mean acc',
        'collapsed',
        'max masked',
      ],
      rows,
    )
  ]
  if baseline_needs <= target_x[0]:  # the baseline never improved on its start
    reached = 'the ratio is undefined (the baseline ends at or below its starting accuracy)'
  elif math.isfinite(candidate_needs):
    reached = f'{candidate} first reaches it after {candidate_needs:.0f}: ratio **{ratio:.2f}x**'
  else:
    reached = f'{candidate} never reaches it'
  parts.append(
    f'Sample efficiency: {baseline} ends at mean accuracy {target:.4f}, first reached '
    f'after {baseline_needs:.0f} completions; {reached}. Collapse: final held-out '
    f"accuracy below {collapse_fraction:g} of the run's start."
  )
  parts.append(f'![accuracy]({os.path.basename(acc_plot)})')
  if masked_curves:
    masked_plot = _report.plot_curves(
      masked_curves,
      os.path.join(plot_dir, 'rl_masked.png'),
      title='CAPO: masked share of completion tokens',
      xlabel='completions seen',
      ylabel='masked fraction',
    )
    parts.append(f'![masked]({os.path.basename(masked_plot)})')
  return '\n\n'.join(parts)
