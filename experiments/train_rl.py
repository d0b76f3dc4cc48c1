r"""RL of a decoder policy on a verifiable task (GRPO family, optional CAPO mask).

  python experiments/train_rl.py --config=configs/rl.py:capo_aggressive --workdir=/tmp/rl/capo \
      --config.init_from=/tmp/rl/sft

Resumes from the newest checkpoint in --workdir. Multi-process flags as in train_lm.py.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/rl.py:test.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and data land here.')
_START_DISTRIBUTED = train.define_distributed_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  _START_DISTRIBUTED()
  result = train.train_rl(_CONFIG.value, _WORKDIR.value)
  print(
    f'{"halted" if result.halted else "finished"} at step {result.step}: reward '
    f'{result.reward:.3f}, held-out accuracy {result.eval_accuracy:.3f}, '
    f'{result.completions_seen} completions',
    flush=True,
  )


if __name__ == '__main__':
  app.run(main)
