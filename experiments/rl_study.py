r"""The RL regime study; writes DIR/rl_study.md and its plots.

  python experiments/rl_study.py --config=configs/rl_study.py --workdir=/tmp/rl/study \
      --config.init_from=/tmp/rl/sft

Rerun with the same workdir to resume: finished runs are reused, interrupted ones resume.
--only runs and reports a subset of the config's variants (e.g. the arms a later one waits on).
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import studies
from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'e.g. configs/rl_study.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Runs, rl_study.md and plots go here.')
_ONLY = flags.DEFINE_list('only', None, "Run and report only these of the config's variants.")
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only write the report (no training).')
_FINISHED_ONLY = flags.DEFINE_bool(
  'finished_only', False, 'Report only the runs that reached their last step.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  variants = list(config.get('variants') or config.runs)
  if _ONLY.value:
    unknown = sorted(set(_ONLY.value) - set(variants))
    if unknown:
      raise app.UsageError(f'--only names unknown variants {unknown}; valid: {variants}')
    variants = [v for v in variants if v in _ONLY.value]
  seeds_by_variant = config.get('seeds_by_variant')
  if not _REPORT_ONLY.value:
    studies.run_rl_study(
      config.runs,
      config.seeds,
      workdir,
      init_from=config.init_from,
      variants=variants,
      seeds_by_variant=seeds_by_variant,
    )
  if _FINISHED_ONLY.value:
    seeds_by_variant = studies.finished_seeds(
      workdir, config.runs, variants, config.seeds, seeds_by_variant
    )
    print(f'finished runs: {seeds_by_variant}', flush=True)
    variants = [v for v in variants if seeds_by_variant[v]]
  text = (
    '# RL regimes on arithmetic\n\n'
    + studies.rl_study_report(
      workdir,
      variants,
      config.seeds,
      baseline=config.baseline,
      candidate=config.candidate,
      seeds_by_variant=seeds_by_variant,
      collapse_drop=config.collapse_drop,
      comparisons=[tuple(pair) for pair in config.comparisons],
    )
    + '\n'
  )
  path = os.path.join(workdir, 'rl_study.md')
  studies.write_text(path, text)
  print(text, flush=True)


if __name__ == '__main__':
  app.run(main)
