r"""The RL regime study; writes DIR/rl_study.md and its plots.

  python experiments/rl_study.py --config=configs/rl_study.py --workdir=/tmp/rl/study \
      --config.init_from=/tmp/rl/sft

Rerun with the same workdir to resume: finished runs are reused, interrupted ones resume.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import studies
from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'e.g. configs/rl_study.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Runs, rl_study.md and plots go here.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  studies.run_rl_study(config.runs, config.seeds, workdir, init_from=config.init_from)
  text = (
    '# RL regimes on arithmetic\n\n'
    + studies.rl_study_report(
      workdir,
      list(config.runs),
      config.seeds,
      baseline=config.baseline,
      candidate=config.candidate,
      collapse_fraction=config.collapse_fraction,
    )
    + '\n'
  )
  path = os.path.join(workdir, 'rl_study.md')
  studies.write_text(path, text)
  print(text, flush=True)


if __name__ == '__main__':
  app.run(main)
