r"""The main job: runs a small version of each experiment and writes DIR/report.md with plots.

  python experiments/demo.py --workdir=/tmp/curvopt_demo

Run again with the same workdir, finished runs are reused and interrupted ones resume.
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from curvopt import studies
from curvopt import train

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py'),
  'Demo config, e.g. configs/demo.py or configs/demo.py:smoke.',
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where runs, report.md and plots go.')
flags.mark_flag_as_required('workdir')


def lm_section(config, workdir: str) -> str:
  """Pretrains the tiny decoder with each optimizer of `config.lm_runs`; table + eval-loss plot."""
  rows, curves = [], {}
  for name, optimizer in config.lm_runs.items():
    run = config.lm.copy_and_resolve_references()
    run.optimizer.update(optimizer)
    run.data.data_dir = run.data.data_dir or os.path.join(workdir, 'tfds')
    run_dir = os.path.join(workdir, 'lm', name)
    logging.info('LM run %s in %s', name, run_dir)
    train.train_lm(run, run_dir)
    summary = studies.run_summary(run_dir)
    rows.append(
      [
        name,
        optimizer.learning_rate,
        summary['step'],
        summary['train_loss'],
        summary['eval_loss'],
        round(summary['tokens_per_s']),
      ]
    )
    curves[name] = studies.curve(run_dir, 'eval_loss')
  plot = studies.plot_curves(
    curves,
    os.path.join(workdir, 'lm_eval_loss.png'),
    title=f'{config.lm.model.name} decoder on {config.lm.data.name}',
    xlabel='step',
    ylabel='eval loss (nats/token)',
  )
  table = studies.markdown_table(
    ['optimizer', 'peak lr', 'steps', 'final train loss', 'final eval loss', 'tokens/s'], rows
  )
  tokens = config.lm.data.batch_size * config.lm.data.seq_len
  return (
    f'## Language-model pretraining\n\n{config.lm.model.name} decoder, '
    f'{config.lm.total_steps} steps of {tokens} tokens, {config.lm.schedule.name} '
    f'schedule.\n\n{table}\n\n![eval loss]({os.path.basename(plot)})\n'
  )


def lanton_section(config, workdir: str) -> str:
  """LANTON's per-layer learning-rate scales over training, from its LM run's metrics."""
  name = next((n for n, o in config.lm_runs.items() if o.name.startswith('lanton')), None)
  if name is None:
    return ''
  run_dir = os.path.join(workdir, 'lm', name)
  prefix = 'lanton/lr_scale/'
  series = {k[len(prefix) :]: v for k, v in studies.curves(run_dir, prefix).items()}
  steps = next(iter(series.values()))[0]
  plot = studies.plot_heatmap(
    {leaf: values for leaf, (_, values) in series.items()},
    steps,
    os.path.join(workdir, 'lanton_lr_scale.png'),
    title=f'LANTON ({config.lm_runs[name].name}): per-layer lr scale',
    xlabel='step',
    colorbar='learning-rate scale s(H)',
  )
  final = sorted(((values[-1], leaf) for leaf, (_, values) in series.items()))
  table = studies.markdown_table(
    ['leaf', 'final lr scale'], [[leaf, value] for value, leaf in final[:3] + final[-3:]]
  )
  return (
    "## LANTON: noise-adaptive layerwise learning rates\n\nEach layer's step is the "
    'schedule times s(H), from its gradient-noise estimate H in the dual norm of its '
    'LMO; noisier layers get smaller steps. The three smallest and three largest scales at '
    "the end of the run (a constant per-group factor, such as the embedding's, "
    f'included):\n\n{table}\n\n'
    f'![lr scales]({os.path.basename(plot)})\n'
  )


def _sft_dir(workdir: str) -> str:
  """The RL section's arithmetic SFT run (the merge section's arithmetic expert too)."""
  return os.path.join(workdir, 'rl', 'sft')


def _tasks_dir(config, workdir: str) -> str:
  return config.rl.sft.data.data_dir or os.path.join(workdir, 'rl', 'tfds')


def rl_section(config, workdir: str) -> str:
  """SFT on arithmetic from the LM section's model, then aggressive GRPO vs aggressive CAPO."""
  rl_dir = os.path.join(workdir, 'rl')
  sft = config.rl.sft.copy_and_resolve_references()
  sft.init_from = os.path.join(workdir, 'lm', config.rl.init_from_lm)
  sft.data.data_dir = _tasks_dir(config, workdir)
  sft_dir = _sft_dir(workdir)
  logging.info('SFT on arithmetic in %s', sft_dir)
  result = train.train_sft(sft, sft_dir)
  # From the metrics, not the result: a finished run reused by a rerun evaluates nothing.
  accuracy = studies.curve(sft_dir, 'accuracy/mean')[1][-1]
  runs = config.rl.runs.copy_and_resolve_references()
  for run in runs.values():
    run.task.data_dir = run.task.data_dir or sft.data.data_dir
  studies.run_rl_study(runs, (0,), rl_dir, init_from=sft_dir)
  baseline, candidate = config.rl.baseline, config.rl.candidate
  report = studies.rl_study_report(
    rl_dir, [baseline, candidate], (0,), baseline=baseline, candidate=candidate, plot_dir=workdir
  )
  return (
    f'## RL with the CAPO mask\n\nThe tiny LM above, fine-tuned on multi-step arithmetic '
    f'for {result.step} steps (held-out greedy accuracy {accuracy:.3f}), then '
    f'trained by GRPO and by GRPO with the CAPO mask in the aggressive regime (learning '
    f'rate {runs[baseline].optimizer.learning_rate:g}, '
    f'{runs[baseline].rollout.prompts_per_step * runs[baseline].rollout.group_size} '
    f'completions a step), one seed; the full study is experiments/rl_study.py.\n\n'
    f'{report}\n'
  )


def merge_section(config, workdir: str) -> str:
  """Merges the RL section's arithmetic model with a second task's expert, by every method."""
  study_config = config.merge.copy_and_resolve_references()
  study_config.base_from = os.path.join(workdir, 'lm', config.rl.init_from_lm)
  study_config.expert_runs = {'arithmetic': _sft_dir(workdir)}
  study_config.data_dir = _tasks_dir(config, workdir)
  study = studies.run_merge_study(study_config, os.path.join(workdir, 'merge'))
  second = next(t for t in study_config.tasks if t != 'arithmetic')
  return (
    "## Model merging: OTA + FFG\n\nThe LM section's AdamW model is the base; its "
    f'arithmetic fine-tune from the RL section and a {second} expert '
    f'({study_config.expert.total_steps} AdamW steps from the base) are merged by every '
    'method, each capability scored by greedy exact match on '
    f'{study_config.eval.num_prompts} test prompts and normalized by its own expert; the '
    'full study is experiments/merge_study.py.\n\n'
    + studies.merge_study_report(study, workdir)
    + '\n'
  )


SECTIONS = (lm_section, lanton_section, rl_section, merge_section)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_library_logs()
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  parts = ['# curvopt demo report\n']
  parts += [text for text in (section(_CONFIG.value, workdir) for section in SECTIONS) if text]
  parts.append(f'_Total wall time: {time.perf_counter() - start:.0f} s._\n')
  report = os.path.join(workdir, 'report.md')
  studies.write_text(report, '\n'.join(parts))
  print(f'wrote {report}', flush=True)


if __name__ == '__main__':
  app.run(main)
