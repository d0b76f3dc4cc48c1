r"""CAPO's premise on real steps: m_F against the realized per-token KL, and the head's share.

  python experiments/capo_premise.py --config=configs/rl.py:grpo_aggressive \
      --workdir=/tmp/rl/premise --config.init_from=/tmp/rl/sft --steps=20 \
      --config.schedule.name=constant --config.schedule.warmup_steps=0

Takes --steps steps of the config (CAPO's stats computed, nothing masked) from its init_from
policy at the peak rate; writes DIR/premise.json, DIR/metrics.jsonl and per-token arrays.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from curvopt import studies
from curvopt import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'An RL config, e.g. configs/rl.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'premise.json and the records go here.')
_STEPS = flags.DEFINE_integer('steps', 20, 'How many real steps to measure.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  result = train.capo_premise_check(_CONFIG.value, _WORKDIR.value, steps=_STEPS.value)
  summary = result.summary()
  print(studies.markdown_table(list(summary), [list(summary.values())]), flush=True)


if __name__ == '__main__':
  app.run(main)
