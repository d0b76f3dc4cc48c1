r"""Fine-tunes a decoder on synthetic tasks; resumes from the newest checkpoint in --workdir.

  python experiments/sft.py --config=configs/sft.py:arithmetic --workdir=/tmp/sft_arith
  python experiments/sft.py --config=configs/sft.py:expert_sorting --workdir=/tmp/sorting \
      --config.init_from=/tmp/merge/base

Multi-process: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every
process, or --distributed_auto on a TPU pod / SLURM cluster (see BUILD.md).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/sft.py:test.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and data land here.')
_START_DISTRIBUTED = train.define_distributed_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  _START_DISTRIBUTED()
  result = train.train_sft(_CONFIG.value, _WORKDIR.value)
  accuracy = ', '.join(f'{k} {v:.3f}' for k, v in result.accuracy.items())
  print(
    f'{"halted" if result.halted else "finished"} at step {result.step}: '
    f'train loss {result.train_loss:.4f}, eval loss {result.eval_loss:.4f}, '
    f'accuracy {result.mean_accuracy:.3f} ({accuracy}), '
    f'{result.tokens_per_s:.0f} tokens/s, {result.wall_s:.0f} s',
    flush=True,
  )


if __name__ == '__main__':
  app.run(main)
