"""Learning-rate sweeps: an LM run per (optimizer, learning rate, seed), then the best one's seeds.

A sweep is a grid of optimizer settings, each with a list of peak learning rates. Stage one runs
every learning rate of every entry with the first seed; stage two reruns each entry's best one
(lowest final eval loss) with the remaining seeds, one seed round across all entries at a time.
Every run has its own directory, so an interrupted sweep resumes run by run (`train_lm` resumes a
run from its checkpoints; a finished run is read back from its metrics and not rerun). The report
compares entries seed by seed where asked ('arm-reference' pairs: mean difference of final eval
loss, its t-interval, and a decision only when the interval excludes 0).
"""

import dataclasses
import math
import os
from typing import Callable, Mapping, Sequence

from absl import logging
import ml_collections
import numpy as np

from curvopt import train
from curvopt.studies import _report
from curvopt.studies import _stats

# A grid entry's key for overrides of the base config's other fields (e.g. its own total_steps):
# everything else in an entry is an optimizer field.
BASE_OVERRIDES = 'base_overrides'


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  """One optimizer at one learning rate, with the eval-loss curve of each seed run."""

  optimizer: str
  learning_rate: float
  curves: Mapping[int, tuple[list[int], list[float]]]  # seed -> (steps, eval losses)

  @property
  def final_losses(self) -> list[float]:
    return [values[-1] if values else math.nan for _, values in self.curves.values()]

  @property
  def mean_curve(self) -> tuple[list[int], list[float]]:
    """Mean eval loss over seeds at the eval steps every seed logged."""
    common = sorted(set.intersection(*(set(s) for s, _ in self.curves.values())))
    means = [
      float(np.mean([dict(zip(s, v))[step] for s, v in self.curves.values()])) for step in common
    ]
    return common, means


def sweep_run_dir(workdir: str, optimizer: str, learning_rate: float, seed: int) -> str:
  return os.path.join(workdir, optimizer, f'lr{learning_rate:g}', f'seed{seed}')


def steps_to_reach(
  steps: Sequence[int], values: Sequence[float], target: float, *, higher_is_better: bool = False
) -> float:
  """First step at which a curve reaches `target`, linearly interpolated between logged points.

  A loss reaches it from above (value <= target), an accuracy with `higher_is_better` from
  below. Returns inf when the curve never gets there (a ratio against it says "not reached").
  """
  sign = -1.0 if higher_is_better else 1.0
  for i, (step, value) in enumerate(zip(steps, values)):
    if sign * value <= sign * target:
      if i == 0:
        return float(step)
      prev_step, prev_value = steps[i - 1], values[i - 1]
      return prev_step + (step - prev_step) * (prev_value - target) / (prev_value - value)
  return math.inf


def run_sweep(
  base: ml_collections.ConfigDict,
  grid: ml_collections.ConfigDict,
  seeds: Sequence[int],
  workdir: str,
  train_fn: Callable[[ml_collections.ConfigDict, str], object] = train.train_lm,
) -> dict[str, list[SweepPoint]]:
  """Runs the two-stage sweep; returns, per grid entry, its points in learning-rate order.

  `grid` maps a run name to optimizer overrides whose `learning_rate` is a list; the name is
  what tables show (two entries may use one registry optimizer with different options). An
  entry's `base_overrides` (a nested dict) sets other fields of its runs' config, e.g.
  `{'total_steps': 670}` for a shorter run with its own full schedule; they must name existing
  fields. Runs that did not reach their total_steps are left out (with a `train_fn` that runs
  nothing, the result is the report of the runs finished so far), and so are entries with none
  finished.
  """
  if not seeds:
    raise ValueError('a sweep needs at least one seed')
  entries = {}
  for name, entry in grid.items():
    entry = entry.to_dict()
    rates = entry.pop('learning_rate')
    if not rates:
      raise ValueError(f'grid entry {name!r} has no learning rates')
    overrides = entry.pop(BASE_OVERRIDES, None) or {}
    _check_overrides(name, base, overrides)
    entries[name] = (entry, rates, overrides)

  def run(name, lr, seed):
    config = base.copy_and_resolve_references()
    optimizer, _, overrides = entries[name]
    config.update(overrides)
    config.optimizer.update(dict(optimizer, learning_rate=lr))
    config.seed = seed
    directory = sweep_run_dir(workdir, name, lr, seed)
    logging.info('sweep run %s lr=%g seed=%d in %s', name, lr, seed, directory)
    if not config.data.data_dir:  # one prepared corpus for the whole sweep
      config.data.data_dir = os.path.join(workdir, 'tfds')
    # A finished run is read back, not restored: that costs nothing and still works after the
    # optimizer's state layout changed since it ran.
    curve = _finished_curve(directory, config.total_steps)
    if curve is None:
      train_fn(config, directory)
      curve = _finished_curve(directory, config.total_steps)
    return curve

  def point(name, lr, seed_curves):
    return SweepPoint(name, lr, {s: c for s, c in seed_curves.items() if c is not None})

  # Breadth first: every learning rate of every entry, then one seed round at a time across the
  # entries, so a sweep stopped part-way has compared every entry on equal terms.
  points = {
    name: [point(name, lr, {seeds[0]: run(name, lr, seeds[0])}) for lr in rates]
    for name, (_, rates, _) in entries.items()
  }
  best = {
    name: min((p for p in ps if p.curves), key=lambda p: _nan_last(p.final_losses[0]))
    for name, ps in points.items()
    if any(p.curves for p in ps)
  }
  for seed in seeds[1:]:
    for name, p in best.items():
      curve = run(name, p.learning_rate, seed)
      if curve is not None:
        p.curves[seed] = curve
  return {name: [p for p in ps if p.curves] for name, ps in points.items() if name in best}


def _check_overrides(name: str, base: ml_collections.ConfigDict, overrides: Mapping) -> None:
  """Raises ValueError if `overrides` names a field `base` lacks (a typo would add a field)."""

  def check(prefix, fields, values):
    for key, value in values.items():
      if key not in fields:
        raise ValueError(
          f'grid entry {name!r}: {BASE_OVERRIDES} field {prefix + key!r} is not in the base '
          f'config; valid: {sorted(fields)}'
        )
      if isinstance(value, Mapping):
        if not isinstance(fields[key], Mapping):
          raise ValueError(
            f'grid entry {name!r}: {BASE_OVERRIDES} field {prefix + key!r} is not a section'
          )
        check(f'{prefix}{key}.', fields[key], value)

  check('', base.to_dict(), overrides)


def _finished_curve(directory: str, total_steps: int) -> tuple[list[int], list[float]] | None:
  """A run's eval-loss curve if it reached `total_steps`, else None (part-way or not started)."""
  try:
    steps, values = _report.curve(directory, 'eval_loss')
  except FileNotFoundError:
    return None
  return (steps, values) if steps and steps[-1] >= total_steps else None


def _nan_last(x: float) -> float:
  return math.inf if not math.isfinite(x) else x


def best_point(points: Sequence[SweepPoint]) -> SweepPoint:
  """The point that got the extra seeds (the most seed runs; ties: lowest mean final loss)."""
  return min(points, key=lambda p: (-len(p.curves), _nan_last(float(np.mean(p.final_losses)))))


def parse_comparisons(
  comparisons: str | Sequence[tuple[str, str]], valid: Sequence[str] | None = None
) -> list[tuple[str, str]]:
  """'a-b,c-d' (or [('a', 'b'), ...]) -> [('a', 'b'), ('c', 'd')]: each arm minus its reference.

  With `valid` (e.g. the grid's entry names), a name outside it raises ValueError.
  """
  if isinstance(comparisons, str):
    pairs = []
    for item in (x.strip() for x in comparisons.split(',')):
      if not item:
        continue
      parts = [x.strip() for x in item.split('-')]
      if len(parts) != 2 or not all(parts):
        raise ValueError(f"a comparison is 'arm-reference', got {item!r} in {comparisons!r}")
      pairs.append((parts[0], parts[1]))
  else:
    pairs = [(str(a), str(b)) for a, b in comparisons]
  if valid is not None:
    unknown = sorted({n for pair in pairs for n in pair} - set(valid))
    if unknown:
      raise ValueError(f'comparisons name unknown entries {unknown}; valid: {sorted(valid)}')
  return pairs


def paired_comparisons(
  results: Mapping[str, Sequence[SweepPoint]],
  comparisons: str | Sequence[tuple[str, str]],
  *,
  confidence: float = 0.95,
) -> list[tuple[str, str, _stats.PairedDifference]]:
  """Final eval loss of each arm's best point minus its reference's, paired by seed.

  An arm without finished runs (yet) pairs no seeds: n = 0, no interval, no effect measured.
  """

  def finals(name):
    if name not in results:
      return {}
    p = best_point(results[name])
    return {seed: values[-1] for seed, (_, values) in p.curves.items() if values}

  return [
    (a, b, _stats.paired_difference(finals(a), finals(b), confidence=confidence))
    for a, b in parse_comparisons(comparisons)
  ]


def _signed(x: float) -> str:
  return f'{x:+.4f}' if math.isfinite(x) else 'n/a'


def comparison_table(
  comparisons: Sequence[tuple[str, str, _stats.PairedDifference]],
) -> str:
  """Markdown: per comparison the seeds, per-seed differences, mean, std, interval, decision."""
  rows = []
  for a, b, d in comparisons:
    interval = f'[{_signed(d.low)}, {_signed(d.high)}]' if d.n > 1 else 'n/a (< 2 seeds)'
    rows.append(
      [
        f'{a} - {b}',
        d.n,
        ' / '.join(str(s) for s in d.seeds) or '-',
        ' / '.join(_signed(x) for x in d.differences) or '-',
        _signed(d.mean),
        f'{d.std:.4f}' if math.isfinite(d.std) else 'n/a',
        interval,
        d.decision,
      ]
    )
  level = f'{100 * comparisons[0][2].confidence:g}%' if comparisons else '95%'
  return _report.markdown_table(
    [
      'difference',
      'n',
      'seeds',
      'per seed',
      'mean',
      'std',
      f'{level} t-interval',
      'decision',
    ],
    rows,
  )


def sweep_report(
  results: Mapping[str, Sequence[SweepPoint]],
  anchor: str,
  comparisons: str | Sequence[tuple[str, str]] = (),
) -> str:
  """Markdown: the sweep grid, each best point's mean and spread, and steps to the anchor's loss.

  With `comparisons` ('a-b,c-d', see `parse_comparisons`) it adds the table of paired
  differences of final eval loss by seed with 95% t-intervals, and the decision of each: 'lower'
  (the interval lies below 0), 'higher' (above 0), else 'no effect measured'.
  """
  if anchor not in results:
    raise ValueError(f'anchor {anchor!r} is not a grid entry; entries: {sorted(results)}')
  grid_rows = [
    [name, p.learning_rate, p.final_losses[0]] for name, points in results.items() for p in points
  ]
  anchor_best = best_point(results[anchor])
  anchor_steps, anchor_values = anchor_best.mean_curve
  target = anchor_values[-1]
  rows = []
  for name, points in results.items():
    p = best_point(points)
    losses = np.asarray(p.final_losses)
    reach = steps_to_reach(*p.mean_curve, target)
    rows.append(
      [
        name,
        p.learning_rate,
        len(losses),
        float(losses.mean()),
        float(losses.std(ddof=1)) if len(losses) > 1 else math.nan,
        float(losses.min()),
        float(losses.max()),
        'not reached' if math.isinf(reach) else round(reach / anchor_steps[-1], 3),
      ]
    )
  text = (
    'Stage 1, final eval loss of the first seed at every learning rate:\n\n'
    + _report.markdown_table(['run', 'peak lr', 'final eval loss'], grid_rows)
    + f'\n\nBest learning rate of each, over seeds (steps ratio: steps the mean eval curve '
    f"needs to reach {anchor}'s mean final eval loss {target:.4f}, over {anchor}'s "
    f'{anchor_steps[-1]} steps; interpolated between eval points):\n\n'
    + _report.markdown_table(
      ['run', 'peak lr', 'seeds', 'mean', 'std', 'min', 'max', f'steps ratio vs {anchor}'], rows
    )
  )
  pairs = paired_comparisons(results, comparisons)
  if pairs:
    text += (
      '\n\nPaired differences of final eval loss (arm - reference, best learning rate of each, '
      'by seed; t-interval with n - 1 degrees of freedom; "lower" / "higher" only when the '
      'whole interval lies below / above 0):\n\n' + comparison_table(pairs)
    )
  return text


def _json_float(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def sweep_summary(
  results: Mapping[str, Sequence[SweepPoint]], comparisons: str | Sequence[tuple[str, str]] = ()
) -> dict:
  """The report's numbers as plain data (JSON-ready; nan -> None): finals and comparisons."""
  entries = {}
  for name, points in results.items():
    best = best_point(points)
    entries[name] = {
      'best_learning_rate': best.learning_rate,
      'points': [
        {
          'learning_rate': p.learning_rate,
          'final_step': {
            str(s): (steps[-1] if steps else None) for s, (steps, _) in p.curves.items()
          },
          'final_eval_loss': {
            str(s): _json_float(values[-1]) if values else None
            for s, (_, values) in p.curves.items()
          },
        }
        for p in points
      ],
    }
  return {
    'entries': entries,
    'comparisons': [
      {
        'arm': a,
        'reference': b,
        'n': d.n,
        'seeds': list(d.seeds),
        'differences': [_json_float(x) for x in d.differences],
        'mean': _json_float(d.mean),
        'std': _json_float(d.std),
        'confidence': d.confidence,
        'low': _json_float(d.low),
        'high': _json_float(d.high),
        'decision': d.decision,
      }
      for a, b, d in paired_comparisons(results, comparisons)
    ],
  }
