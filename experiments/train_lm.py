r"""Trains a decoder LM on the code corpus; resumes from the newest checkpoint in --workdir.

  python experiments/train_lm.py --config=configs/lm.py:tiny --workdir=/tmp/lm \
      --config.total_steps=200 --config.optimizer.name=adamw

Multi-process: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every
process, or --distributed_auto on a TPU pod / SLURM cluster (see BUILD.md).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/lm.py:tiny.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and data land here.')
_START_DISTRIBUTED = train.define_distributed_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  _START_DISTRIBUTED()
  result = train.train_lm(_CONFIG.value, _WORKDIR.value)
  print(
    f'{"halted" if result.halted else "finished"} at step {result.step}: '
    f'train loss {result.train_loss:.4f}, eval loss {result.eval_loss:.4f}, '
    f'{result.tokens_per_s:.0f} tokens/s',
    flush=True,
  )


if __name__ == '__main__':
  app.run(main)
