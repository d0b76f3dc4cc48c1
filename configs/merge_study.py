r"""The merging capability study: base + one AdamW expert per task, merged by every method.

  python experiments/merge_study.py --config=configs/merge_study.py:default \
      --workdir=/tmp/merge_study \
      --config.base.init_from=/work/runs/sweep_tiny/adamw/lr0.003/seed0   # a train_lm run

Variants:
  default  CPU-sized (~40 min on 2 cores): the tiny decoder from a pretrained code-corpus LM
           (configs/lm.py:tiny), a 200-step multi-task warm-up on the study's tasks, then a
           200-step AdamW expert per task at lr 1e-3; 64 greedy test prompts per task.
  smoke    seconds, for tests: the configs/sft.py:test decoder from scratch, 2 tasks.
"""

import os

import ml_collections

from curvopt import train

_PRETRAINED = '/work/runs/sweep_tiny/adamw/lr0.003/seed0'


def _sft(arg: str) -> ml_collections.ConfigDict:
  return train.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sft.py'), arg)


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  if arg not in ('default', 'smoke'):
    raise ValueError(f"unknown configs/merge_study.py variant {arg!r}; valid: ['default', 'smoke']")
  config = ml_collections.ConfigDict()
  # Copy-like tasks a 200-step expert learns; arithmetic needs ~600 steps to reach 0.3.
  config.tasks = ('reversal', 'sorting', 'kv_recall', 'format')
  config.data_dir = ''  # tfds data dir of the tasks; '' = <workdir>/tfds

  # Existing runs instead of training: the base's params (no warm-up) and {task: expert run}.
  config.base_from = ''
  config.expert_runs = ml_collections.ConfigDict()
  # The base: a light multi-task warm-up (its tasks are set to config.tasks by the study).
  config.base = _sft('multitask')
  config.base.init_from = _PRETRAINED
  config.base.total_steps = 300
  config.base.data.batch_size = 16
  # An expert template: the study sets data.tasks, eval.tasks and init_from (the base).
  config.expert = _sft('expert_reversal')
  config.expert.total_steps = 600  # 200-step experts barely learned (docs/merge_experiments.md)
  config.expert.optimizer.learning_rate = 1e-3
  config.expert.data.batch_size = 16
  for run in (config.base, config.expert):
    # The study scores the models itself; training only logs its completion loss.
    run.eval.num_prompts = 0
    run.eval.loss_batches = 1
    run.eval_every = 0
    run.tensorboard = False
    run.checkpoint.every = run.total_steps
    run.checkpoint.keep = 1
    run.schedule.warmup_steps = max(2, run.total_steps // 20)

  config.eval = ml_collections.ConfigDict()
  config.eval.num_prompts = 128  # greedy completions of the first test prompts, per task
  config.eval.max_prompt_len = 48
  config.eval.max_new_tokens = 64

  config.merge = ml_collections.ConfigDict()
  config.merge.ta_scales = (0.3, 0.5, 1.0)
  config.merge.ties_density = 0.3
  config.merge.dare_drop = 0.7
  config.merge.ffg_density = 0.3  # the OTA+FFG row, the grafts, masks and overlap
  config.merge.ffg_densities = (0.1, 0.3, 0.5)  # the OTA+FFG density sweep
  config.merge.ota_power = 0.5
  config.merge.ota_eps = 1e-8
  config.merge.seed = 0  # DARE's drop masks

  if arg == 'smoke':
    config.tasks = ('arithmetic', 'reversal')
    test = _sft('test')
    for run, steps in ((config.base, 4), (config.expert, 4)):
      for section in ('model', 'mesh'):
        run[section] = test[section].copy_and_resolve_references()
      run.init_from = ''
      run.total_steps = steps
      run.log_every = 2
      run.data.batch_size = 8
      run.data.seq_len = 64
      run.checkpoint.every = steps
      run.schedule.warmup_steps = 1
    config.eval.update(num_prompts=4, max_prompt_len=32, max_new_tokens=8)
    config.merge.ta_scales = (1.0,)
    config.merge.ffg_densities = (0.1, 0.3)
  return config
