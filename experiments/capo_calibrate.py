r"""CAPO thresholds calibrated on a capo.mode='log' run's per-token stats.

  python experiments/train_rl.py --config=configs/rl.py:capo_log --workdir=/tmp/rl/calib \
      --config.init_from=/tmp/rl/sft
  python experiments/capo_calibrate.py --run=/tmp/rl/calib --percentile_H=98 --percentile_F=98

Prints tau_H and tau_F (the percentiles of |m_H| and m_F over the tokens with A != 0 after the
run's warm-up), the share of those tokens they mask, and the flags that set them.
"""

from absl import app
from absl import flags

from curvopt import studies

_RUN = flags.DEFINE_string('run', None, "A train_rl workdir of a capo.mode='log' run.")
_PERCENTILE_H = flags.DEFINE_float('percentile_H', 98.0, 'Percentile of |m_H| for tau_H.')
_PERCENTILE_F = flags.DEFINE_float('percentile_F', 98.0, 'Percentile of m_F for tau_F.')
_AFTER_STEP = flags.DEFINE_integer(
  'after_step', None, 'Use the steps after this one (default: after the warm-up).'
)
flags.mark_flags_as_required(['run'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  out = studies.capo_calibration(
    _RUN.value,
    percentile_H=_PERCENTILE_H.value,
    percentile_F=_PERCENTILE_F.value,
    after_step=_AFTER_STEP.value,
  )
  print(
    f'tau_H {out.tau_H:.6g} tau_F {out.tau_F:.6g}: masks {100 * out.masked_share:.2f}% of '
    f'{out.tokens} tokens with A != 0\n'
    f'--config.capo.tau_H={out.tau_H:.6g} --config.capo.tau_F={out.tau_F:.6g}',
    flush=True,
  )


if __name__ == '__main__':
  app.run(main)
