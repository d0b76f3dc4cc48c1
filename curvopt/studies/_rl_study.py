"""The RL regime study: every variant x seed from one SFT policy, then accuracy, collapse,
masked shares, paired comparisons and sample efficiency against the conservative baseline.

Accuracy is held-out *sampled* accuracy (what the policy does when it samples, as in training);
greedy accuracy can stay put while the distribution flattens. Two rules keep the report honest:
no sample-efficiency ratio against a baseline whose own gain is within 3 standard errors of
zero (the ratio of noise to noise is meaningless), and a collapse is a drop of at least
`collapse_drop` below the run's running maximum (not a final value below a share of the start,
which misses a run that rose and then fell).
"""

import dataclasses
import math
import os
from typing import Callable, Mapping, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np

from curvopt import train
from curvopt.studies import _report
from curvopt.studies import _stats
from curvopt.studies import _sweep

SAMPLED = 'eval_sampled_accuracy'


def study_run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f'seed{seed}')


def seeds_of(
  seeds: Sequence[int], variant: str, seeds_by_variant: Optional[Mapping] = None
) -> tuple[int, ...]:
  """A variant's seeds: its entry in `seeds_by_variant`, else `seeds`."""
  chosen = (seeds_by_variant or {}).get(variant, seeds)
  return tuple(int(s) for s in chosen)


def run_rl_study(
  runs: ml_collections.ConfigDict,
  seeds: Sequence[int],
  workdir: str,
  *,
  init_from: str,
  variants: Optional[Sequence[str]] = None,
  seeds_by_variant: Optional[Mapping] = None,
  train_fn: Callable = train.train_rl,
) -> None:
  """Trains each of `variants` (names in `runs`, configs/rl.py configs; default: all of them)
  with each of its seeds (seeds_of).

  Seed by seed (every variant of seed 0, then of seed 1, ...), variants in the given order:
  a study stopped early holds whole paired seeds. Each run has its own directory, so an
  interrupted study resumes run by run. Every run's config is checked before the first starts.
  """
  variants = list(runs) if variants is None else list(variants)
  unknown = sorted(set(variants) - set(runs))
  if unknown:
    raise ValueError(f'unknown variant(s) {unknown}; the runs are {sorted(runs)}')
  configs = {}
  for variant in variants:
    for seed in seeds_of(seeds, variant, seeds_by_variant):
      config = runs[variant].copy_and_resolve_references()
      config.seed = seed
      config.init_from = init_from
      if not config.task.data_dir:  # one prepared task data set for the whole study
        config.task.data_dir = os.path.join(workdir, 'tfds')
      train.check_rl_config(config)
      configs[variant, seed] = config
  order = sorted(configs, key=lambda vs: (vs[1], variants.index(vs[0])))
  for variant, seed in order:
    directory = study_run_dir(workdir, variant, seed)
    logging.info('RL study run %s seed %d in %s', variant, seed, directory)
    train_fn(configs[variant, seed], directory)


def finished_seeds(
  workdir: str,
  runs: ml_collections.ConfigDict,
  variants: Sequence[str],
  seeds: Sequence[int],
  seeds_by_variant: Optional[Mapping] = None,
) -> dict[str, tuple[int, ...]]:
  """Per variant, the seeds whose run logged its last step (config total_steps)."""
  out = {}
  for variant in variants:
    total = runs[variant].copy_and_resolve_references().total_steps
    done = []
    for seed in seeds_of(seeds, variant, seeds_by_variant):
      try:
        records = train.read_metrics(study_run_dir(workdir, variant, seed))
      except FileNotFoundError:
        continue
      if records and records[-1]['step'] >= total:
        done.append(seed)
    out[variant] = tuple(done)
  return out


def _mean_curve(curves: Sequence[tuple[list, list]]) -> tuple[list, list]:
  """Mean over runs at the x values every run logged."""
  common = sorted(set.intersection(*(set(x) for x, _ in curves)))
  return common, [float(np.mean([dict(zip(x, y))[c] for x, y in curves])) for c in common]


def _by_completions(run_dir: str, key: str) -> tuple[list, list]:
  records = {r['step']: r for r in train.read_metrics(run_dir)}
  steps = sorted(s for s, r in records.items() if key in r and 'completions_seen' in r)
  return ([records[s]['completions_seen'] for s in steps], [records[s][key] for s in steps])


def collapse_index(accuracies: Sequence[float], drop: float = 0.15) -> Optional[int]:
  """The first evaluation at least `drop` below the running maximum before it, or None."""
  best = -math.inf
  for i, accuracy in enumerate(accuracies):
    best = max(best, accuracy)
    if accuracy <= best - drop:
      return i
  return None


def largest_drop(accuracies: Sequence[float]) -> float:
  """The largest fall of an evaluation below the running maximum before it (0 if none)."""
  best, drop = -math.inf, 0.0
  for accuracy in accuracies:
    best = max(best, accuracy)
    drop = max(drop, best - accuracy)
  return drop


def is_collapsed(accuracies: Sequence[float], drop: float = 0.15) -> bool:
  """A run collapsed when an evaluation fell `drop` or more below its running maximum."""
  return collapse_index(accuracies, drop) is not None


@dataclasses.dataclass(frozen=True)
class BaselineGain:
  """The baseline's mean gain (final - start accuracy) and its standard error.

  The error is the larger of the seeds' spread (std of the per-seed gains over sqrt(n)) and
  the evaluation's own noise (the per-seed evaluation errors of start and end, combined);
  with one seed only the latter exists.
  """

  mean: float
  se: float
  seed_se: float
  eval_se: float

  def significant(self, sigmas: float = 3.0) -> bool:
    """A positive gain of at least `sigmas` standard errors (False when the error is nan)."""
    return self.mean > 0 and self.mean >= sigmas * self.se


def baseline_gain(starts, finals, start_ses, final_ses) -> BaselineGain:
  gains = np.asarray(finals, np.float64) - np.asarray(starts, np.float64)
  n = len(gains)
  seed_se = float(gains.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
  eval_var = np.asarray(start_ses, np.float64) ** 2 + np.asarray(final_ses, np.float64) ** 2
  eval_se = float(math.sqrt(np.nanmean(eval_var) / n)) if np.isfinite(eval_var).any() else math.nan
  se = float(np.nanmax([seed_se, eval_se])) if np.isfinite([seed_se, eval_se]).any() else math.nan
  return BaselineGain(float(gains.mean()), se, seed_se, eval_se)


def sample_efficiency(baseline_curves, candidate_curves) -> tuple[float, float, float]:
  """(baseline needs, candidate needs, ratio): the completions the baseline's mean curve needs
  to first reach its final mean accuracy, over those the candidate's mean curve needs to reach
  that accuracy (inf when it never does)."""
  target_x, target_y = _mean_curve(baseline_curves)
  target = target_y[-1]
  base_needs = _sweep.steps_to_reach(target_x, target_y, target, higher_is_better=True)
  cand_needs = _sweep.steps_to_reach(*_mean_curve(candidate_curves), target, higher_is_better=True)
  return base_needs, cand_needs, base_needs / max(cand_needs, 1.0)


def bootstrap_ratio(
  baseline_curves, candidate_curves, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
  """(2.5%, 97.5% percentiles of the ratio, share of resamples where the candidate never
  reaches the target): seeds resampled with replacement within each arm. A resample in which
  the candidate never reaches the target counts as ratio 0."""
  rng = np.random.default_rng(seed)

  def resample(curves):
    return [curves[i] for i in rng.integers(0, len(curves), len(curves))]

  ratios, never = [], 0
  for _ in range(resamples):
    _, cand_needs, ratio = sample_efficiency(resample(baseline_curves), resample(candidate_curves))
    never += not math.isfinite(cand_needs)
    ratios.append(ratio if math.isfinite(cand_needs) else 0.0)
  low, high = np.quantile(np.asarray(ratios), [0.025, 0.975], method='inverted_cdf')
  return float(low), float(high), never / resamples


@dataclasses.dataclass
class _Variant:
  seeds: tuple[int, ...]
  curves: list  # per seed: (completions, accuracies)
  ses: list  # per seed: (start se, final se)
  greedy_finals: list
  masked: dict  # metric name -> per seed (completions, values)


def _percent(value: float, digits: int = 2) -> str:
  return 'n/a' if math.isnan(value) else f'{100 * value:.{digits}f}%'


def _nanmean(values) -> float:
  values = np.asarray(values, np.float64)
  return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _nanmax(values) -> float:
  values = np.asarray(values, np.float64)
  return float(np.nanmax(values)) if np.isfinite(values).any() else math.nan


_MASK_METRICS = (
  'capo/nz/masked_frac',
  'capo/pos/masked_frac',
  'capo/neg/masked_frac',
  'capo/masked_pos_share',
)


def _read_variant(workdir, variant, seeds, accuracy_key) -> _Variant:
  curves, ses, greedy, masked = [], [], [], {m: [] for m in _MASK_METRICS}
  for seed in seeds:
    run = study_run_dir(workdir, variant, seed)
    curves.append(_by_completions(run, accuracy_key))
    se = _by_completions(run, accuracy_key + '_se')[1]
    ses.append((se[0], se[-1]) if se else (math.nan, math.nan))
    greedy_curve = _by_completions(run, 'eval_accuracy')[1]
    greedy.append(greedy_curve[-1] if greedy_curve else math.nan)
    for metric in _MASK_METRICS:
      masked[metric].append(_by_completions(run, metric))
  return _Variant(tuple(seeds), curves, ses, greedy, masked)


def rl_study_report(
  workdir: str,
  variants: Sequence[str],
  seeds: Sequence[int],
  *,
  baseline: str,
  candidate: str,
  seeds_by_variant: Optional[Mapping] = None,
  collapse_drop: float = 0.15,
  comparisons: Sequence[tuple[str, str]] = (),
  accuracy_key: str = SAMPLED,
  resamples: int = 2000,
  plot_dir: str | None = None,
) -> str:
  """Markdown: per-variant accuracy, collapse and masked shares; paired comparisons; the
  sample-efficiency ratio of `candidate` against `baseline` with a bootstrap interval (left
  out when either is not among `variants`). Each variant's seeds are seeds_of's.

  Accuracy is `accuracy_key` (held-out sampled accuracy by default; 'eval_accuracy' is
  greedy). The ratio is refused when the baseline's gain is under 3 standard errors
  (BaselineGain). `comparisons` are (a, b) pairs of variants compared on their common seeds'
  final accuracies (a - b, with a 95% t-interval). Masked shares are over tokens with A != 0:
  the mean over the steps that had such tokens, and its split by the sign of A. Writes
  rl_accuracy.png and rl_masked.png to `plot_dir` (default: beside the runs).
  """
  data = {
    v: _read_variant(workdir, v, seeds_of(seeds, v, seeds_by_variant), accuracy_key)
    for v in variants
  }
  rows, acc_curves, masked_curves = [], {}, {}
  for variant, d in data.items():
    accs = [a for _, a in d.curves]
    if not all(accs):
      raise ValueError(f'{variant}: a run logged no {accuracy_key!r} (seeds {d.seeds})')
    finals = np.array([a[-1] for a in accs])
    collapsed = sum(is_collapsed(a, collapse_drop) for a in accs)
    acc_curves[variant] = _mean_curve(d.curves)
    nz = d.masked['capo/nz/masked_frac']
    has_mask = all(values for _, values in nz)
    if has_mask:
      masked_curves[variant] = _mean_curve(
        [(x, [0.0 if math.isnan(v) else v for v in y]) for x, y in nz]
      )

    share = {m: _nanmean([v for _, y in runs for v in y]) for m, runs in d.masked.items()}
    rows.append(
      [
        variant,
        len(d.seeds),
        int(acc_curves[variant][0][-1]),
        float(np.mean([a[0] for a in accs])),
        f'{finals.mean():.4f} +- {finals.std():.4f}',
        float(np.mean([a[-1] - a[0] for a in accs])),
        float(max(largest_drop(a) for a in accs)),
        float(np.max(acc_curves[variant][1])),
        float(np.mean(d.greedy_finals)),
        f'{collapsed}/{len(d.seeds)}',
        _percent(share['capo/nz/masked_frac']) if has_mask else '-',
        _percent(_nanmax([_nanmean(y) for _, y in nz])) if has_mask else '-',
        (
          f'{_percent(share["capo/pos/masked_frac"])} / {_percent(share["capo/neg/masked_frac"])}'
          if has_mask
          else '-'
        ),
        _percent(share['capo/masked_pos_share'], 1) if has_mask else '-',
      ]
    )
  parts = [
    _report.markdown_table(
      [
        'variant',
        'seeds',
        'completions',
        'start acc',
        'final acc (mean +- std)',
        'gain',
        'largest drop',
        'best mean acc',
        'final greedy',
        'collapsed',
        'masked (A != 0)',
        'max run-mean masked',
        'masked A > 0 / A < 0',
        'masked with A > 0',
      ],
      rows,
    )
  ]
  parts.append(
    f'Accuracy: `{accuracy_key}` (held-out). Gain: final - start, mean over seeds. Largest '
    "drop: the most an evaluation fell below the run's running maximum (the worst seed). "
    f'Collapse: an evaluation {collapse_drop:g} or more '
    "below the run's running maximum. Masked shares: over the tokens with A != 0, mean over "
    'the steps that had any; "masked with A > 0": the share of masked tokens that were in '
    "groups' successes."
  )
  comparison_rows = []
  for a, b in comparisons:
    if a not in data or b not in data:
      continue
    finals = {v: dict(zip(data[v].seeds, (y[-1] for _, y in data[v].curves))) for v in (a, b)}
    diff = _stats.paired_difference(finals[a], finals[b])
    comparison_rows.append(
      [f'{a} - {b}', diff.n, diff.mean, f'[{diff.low:.4f}, {diff.high:.4f}]', diff.decision]
    )
  if comparison_rows:
    parts.append(
      _report.markdown_table(
        ['paired (final acc)', 'seeds', 'mean difference', '95% interval', 'decision'],
        comparison_rows,
      )
    )
  if baseline in data and candidate in data:
    parts.append(_efficiency_text(data[baseline], data[candidate], baseline, candidate, resamples))
  plot_dir = plot_dir or workdir
  acc_plot = _report.plot_curves(
    acc_curves,
    os.path.join(plot_dir, 'rl_accuracy.png'),
    title='held-out accuracy, mean over seeds',
    xlabel='completions seen',
    ylabel=accuracy_key,
  )
  parts.append(f'![accuracy]({os.path.basename(acc_plot)})')
  if masked_curves:
    masked_plot = _report.plot_curves(
      masked_curves,
      os.path.join(plot_dir, 'rl_masked.png'),
      title='masked share of the tokens with A != 0',
      xlabel='completions seen',
      ylabel='masked fraction',
    )
    parts.append(f'![masked]({os.path.basename(masked_plot)})')
  return '\n\n'.join(parts)


def _efficiency_text(base: _Variant, cand: _Variant, baseline, candidate, resamples) -> str:
  accs = [a for _, a in base.curves]
  gain = baseline_gain(
    [a[0] for a in accs], [a[-1] for a in accs], [s for s, _ in base.ses], [s for _, s in base.ses]
  )
  head = (
    f'Sample efficiency against {baseline}: its gain is {gain.mean:+.4f} (standard error '
    f'{gain.se:.4f}; seeds {gain.seed_se:.4f}, evaluation {gain.eval_se:.4f})'
  )
  if not gain.significant():
    return (
      f'{head}: **no ratio**, the gain is under 3 standard errors, so the baseline has no '
      'final accuracy to reach that is not noise.'
    )
  base_needs, cand_needs, ratio = sample_efficiency(base.curves, cand.curves)
  if not math.isfinite(cand_needs):
    return (
      f'{head}; it first reaches its final mean accuracy after {base_needs:.0f} completions; '
      f'{candidate} never reaches it.'
    )
  low, high, never = bootstrap_ratio(base.curves, cand.curves, resamples=resamples)
  return (
    f'{head}; it first reaches its final mean accuracy after {base_needs:.0f} completions, '
    f'{candidate} after {cand_needs:.0f}: ratio **{ratio:.2f}x** (bootstrap 95% interval over '
    f'seeds [{low:.2f}, {high:.2f}]; {100 * never:.0f}% of resamples never reach it).'
  )
