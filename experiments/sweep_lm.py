r"""Learning-rate sweep over optimizers; writes DIR/sweep.md and DIR/sweep_eval_loss.png.

  python experiments/sweep_lm.py --config=configs/lm_sweep.py:tiny --workdir=/tmp/sweep_tiny

Rerun with the same workdir to resume: finished runs are reused, interrupted ones resume.
With --report_only it runs nothing and reports the runs finished so far (e.g. while the sweep
runs in another process).
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import studies
from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'e.g. configs/lm_sweep.py:tiny.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Runs, sweep.md and the plot go here.')
_REPORT_ONLY = flags.DEFINE_bool(
  'report_only', False, 'Run nothing: report the runs finished so far.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  train_fn = (lambda config, workdir: None) if _REPORT_ONLY.value else train.train_lm
  results = studies.run_sweep(config.base, config.grid, config.seeds, workdir, train_fn=train_fn)
  if config.anchor not in results:  # only a report can get here
    print(
      f'no finished run of the anchor {config.anchor!r} yet in {workdir}; entries with '
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
  text = (
    f'# Sweep: {base.model.name} decoder on {base.data.name}\n\n{base.total_steps} steps '
    f'of {base.data.batch_size}x{base.data.seq_len} tokens, {base.schedule.name} schedule, '
    f'seeds {list(config.seeds)}.\n\n'
    + studies.sweep_report(results, config.anchor)
    + f'\n\n![eval loss]({os.path.basename(plot)})\n'
  )
  path = os.path.join(workdir, 'sweep.md')
  studies.write_text(path, text)
  print(text, flush=True)


if __name__ == '__main__':
  app.run(main)
