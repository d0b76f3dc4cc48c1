r"""The merging capability study; writes DIR/merge_study.md and its plots.

  python experiments/merge_study.py --config=configs/merge_study.py:default \
      --workdir=/tmp/merge_study

Rerun with the same workdir to resume: finished training runs are reused, interrupted ones
resume, and accuracies already in DIR/evals.json are not measured again.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import studies
from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'e.g. configs/merge_study.py:default.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Runs, merge_study.md and plots go here.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  study = studies.run_merge_study(config, workdir)
  text = (
    f'# Merging study: {len(study.tasks)} experts ({", ".join(study.tasks)})\n\n'
    + studies.merge_study_report(study, workdir)
    + '\n'
  )
  path = os.path.join(workdir, 'merge_study.md')
  studies.write_text(path, text)
  print(text, flush=True)


if __name__ == '__main__':
  app.run(main)
