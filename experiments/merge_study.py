r"""The merging study; writes DIR/merge_study.md and its plots.

  python experiments/merge_study.py --config=configs/merge_study.py:finetune \
      --workdir=/tmp/merge_study_ft

Rerun with the same workdir to resume: finished training runs are reused, interrupted ones
resume, and models already scored (DIR/.../evals.jsonl or evals.json) are not scored again.
The finetune design stops with a one-line reason when its base or its experts do not meet
the design (e.g. the base outside its accuracy band) and says which setting to change.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import studies
from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'e.g. configs/merge_study.py:finetune.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Runs, merge_study.md and plots go here.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  if config.study == 'gain_kept':
    try:
      study = studies.run_gain_study(config, workdir)
    except studies.StudyStopped as e:
      raise SystemExit(f'merge study stopped: {e}') from None
    body = studies.gain_study_report(study, workdir)
  else:
    study = studies.run_merge_study(config, workdir)
    body = studies.merge_study_report(study, workdir)
  text = f'# Merging study: {len(study.tasks)} experts ({", ".join(study.tasks)})\n\n{body}\n'
  path = os.path.join(workdir, 'merge_study.md')
  studies.write_text(path, text)
  print(text, flush=True)


if __name__ == '__main__':
  app.run(main)
