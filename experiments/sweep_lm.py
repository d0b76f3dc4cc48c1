r"""Learning-rate sweep over optimizers; writes DIR/sweep.md, sweep.json and sweep_eval_loss.png.

  python experiments/sweep_lm.py --config=configs/lm_sweep.py:tiny --workdir=/tmp/sweep_tiny

Rerun with the same workdir to resume: finished runs are reused, interrupted ones resume.
With --report_only it runs nothing and reports the runs finished so far (e.g. while the sweep
runs in another process). With --entries it runs and reports only those grid entries, so that
processes sharing one --workdir can split a sweep between them (a final run without it, or with
--report_only, reports them all). A config's `comparisons` ('arm-reference,...') adds paired
differences by seed with 95% t-intervals; sweep.json holds the report's numbers.
"""

import json
import os

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from curvopt import studies
from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'e.g. configs/lm_sweep.py:tiny.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Runs, sweep.md and the plot go here.')
_REPORT_ONLY = flags.DEFINE_bool(
  'report_only', False, 'Run nothing: report the runs finished so far.'
)
_ENTRIES = flags.DEFINE_list(
  'entries', None, "Only these grid entries (comma-separated names); default: the config's all."
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  comparisons = studies.parse_comparisons(config.get('comparisons') or '', valid=list(config.grid))
  grid, anchor = config.grid, config.anchor
  if _ENTRIES.value:
    unknown = sorted(set(_ENTRIES.value) - set(grid))
    if unknown:
      raise app.UsageError(f'--entries {unknown} are not in the grid; valid: {sorted(grid)}')
    grid = ml_collections.ConfigDict({name: grid[name] for name in _ENTRIES.value})
    comparisons = [pair for pair in comparisons if set(pair) <= set(grid)]
    anchor = anchor if anchor in grid else _ENTRIES.value[0]
  train_fn = (lambda config, workdir: None) if _REPORT_ONLY.value else train.train_lm
  results = studies.run_sweep(config.base, grid, config.seeds, workdir, train_fn=train_fn)
  if anchor not in results:  # only a report can get here
    print(
      f'no finished run of the anchor {anchor!r} yet in {workdir}; entries with '
      f'finished runs: {sorted(results)}',
      flush=True,
    )
    return
  best = {name: studies.best_point(points) for name, points in results.items()}
  plot = studies.plot_curves(
    {
      f'{name} (lr {p.learning_rate:g}, {len(p.curves)} seeds)': p.mean_curve
      for name, p in best.items()
    },
    os.path.join(workdir, 'sweep_eval_loss.png'),
    title='best learning rate of each, seed mean',
    xlabel='step',
    ylabel='eval loss (nats/token)',
  )
  base = config.base
  overrides = {
    name: entry.base_overrides.to_dict()
    for name, entry in grid.items()
    if entry.get(studies.BASE_OVERRIDES)
  }
  text = (
    f'# Sweep: {base.model.name} decoder on {base.data.name}\n\n{base.total_steps} steps '
    f'({base.schedule.warmup_steps} warm-up) of {base.data.batch_size}x{base.data.seq_len} '
    f'tokens, {base.schedule.name} schedule, {base.data.eval_batches} eval batches, '
    f'seeds {list(config.seeds)}.'
    + ''.join(f' {name}: {o}.' for name, o in overrides.items())
    + '\n\n'
    + studies.sweep_report(results, anchor, comparisons)
    + f'\n\n![eval loss]({os.path.basename(plot)})\n'
  )
  path = os.path.join(workdir, 'sweep.md')
  studies.write_text(path, text)
  studies.write_text(
    os.path.join(workdir, 'sweep.json'),
    json.dumps(studies.sweep_summary(results, comparisons), indent=1) + '\n',
  )
  print(text, flush=True)


if __name__ == '__main__':
  app.run(main)
