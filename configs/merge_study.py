r"""The merging capability study: base + one AdamW expert per task, merged by every method.

  python experiments/merge_study.py --config=configs/merge_study.py:finetune \
      --workdir=/tmp/merge_study_ft \
      --config.base.init_from=/work/runs/sweep_tiny/adamw/lr0.003/seed0   # a train_lm run

Variants:
  finetune        the fine-tuning regime (docs/merge_experiments.md, first section): the tiny
                  decoder from a pretrained code-corpus LM, a multi-task warm-up until the base
                  has partial skill on every task (its greedy accuracy must lie in base_band),
                  experts fine-tuned from it with AdamW at the smallest rate of a sweep at
                  which each is clearly better than the base, 3 seeds; the share of each
                  expert's gain a merge keeps, greedy and sampled, on all 500 test prompts.
  finetune_smoke  seconds of training, for tests: the finetune study on the configs/sft.py:test
                  decoder from scratch, 2 tasks, 2 seeds, no band and no rate rule.
  default         the first design (normalized accuracy, one seed, a base that knows none of
                  the tasks): the tiny decoder from the pretrained LM, a 300-step warm-up, a
                  600-step expert per task at lr 1e-3; 128 greedy test prompts per task.
  smoke           seconds, for tests: the default design on the configs/sft.py:test decoder.
"""

import os

import ml_collections

from curvopt import train

_PRETRAINED = '/work/runs/sweep_tiny/adamw/lr0.003/seed0'


def _sft(arg: str) -> ml_collections.ConfigDict:
  return train.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sft.py'), arg)


_VARIANTS = ('default', 'smoke', 'finetune', 'finetune_smoke')


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  if arg not in _VARIANTS:
    raise ValueError(f'unknown configs/merge_study.py variant {arg!r}; valid: {list(_VARIANTS)}')
  if arg.startswith('finetune'):
    return _finetune(smoke=arg == 'finetune_smoke')
  config = ml_collections.ConfigDict()
  config.study = 'normalized'
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
    _run_defaults(run)

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
    _shrink(config)
    config.merge.ta_scales = (1.0,)
    config.merge.ffg_densities = (0.1, 0.3)
  return config


def _run_defaults(run: ml_collections.ConfigDict) -> None:
  # The study scores the models itself; training only logs its completion loss.
  run.eval.num_prompts = 0
  run.eval.loss_batches = 1
  run.eval_every = 0
  run.tensorboard = False
  run.checkpoint.every = run.total_steps
  run.checkpoint.keep = 1
  run.schedule.warmup_steps = max(2, run.total_steps // 20)


def _shrink(config: ml_collections.ConfigDict) -> None:
  """The base and expert runs on the configs/sft.py:test decoder from scratch, 4 steps each."""
  test = _sft('test')
  for run in (config.base, config.expert):
    for section in ('model', 'mesh'):
      run[section] = test[section].copy_and_resolve_references()
    run.init_from = ''
    run.total_steps = 4
    run.log_every = 2
    run.data.batch_size = 8
    run.data.seq_len = 64
    run.checkpoint.every = 4
    run.schedule.warmup_steps = 1
  config.eval.update(num_prompts=4, max_prompt_len=32, max_new_tokens=8)


def _finetune(*, smoke: bool) -> ml_collections.ConfigDict:
  """The fine-tuning regime: a competent base, brief low-rate experts, 3 seeds, gain kept."""
  config = ml_collections.ConfigDict()
  config.study = 'gain_kept'
  # Four copy-like tasks a few hundred AdamW steps teach this decoder (arithmetic is slower).
  config.tasks = ('reversal', 'sorting', 'kv_recall', 'format')
  config.data_dir = ''  # tfds data dir of the tasks; '' = <workdir>/tfds

  # The base: the pretrained LM, then a multi-task warm-up of base.total_steps steps.
  config.base = _sft('multitask')
  config.base.init_from = _PRETRAINED
  config.base.total_steps = 1200  # the warm-up length: tune it until the base is in base_band
  config.base.data.batch_size = 16
  config.warmup_weights = ()  # mixture weight per task of config.tasks; () = uniform
  config.base_band = (0.2, 0.5)  # the base's greedy exact match must lie here on every task

  # Experts: AdamW from the base at the smallest rate of expert_lrs at which every expert
  # gains >= expert_min_z standard errors on its own task (first seed); then all seeds.
  config.expert = _sft('expert_reversal')  # the study sets tasks, rate, seed and init_from
  config.expert.total_steps = 300
  config.expert.data.batch_size = 16
  config.expert_lrs = (1e-4, 3e-4, 1e-3)
  config.expert_seeds = (0, 1, 2)  # a seed sets the expert's data order (the base is shared)
  config.expert_min_z = 3.0
  for run in (config.base, config.expert):
    _run_defaults(run)

  config.eval = ml_collections.ConfigDict()
  config.eval.num_prompts = 500  # the whole test split of each task
  config.eval.max_prompt_len = 48
  config.eval.max_new_tokens = 64
  config.eval.num_samples = 4  # sampled completions per prompt (0: greedy only)
  # 'best': sampled scores re-measure the models greedy chose (each method's best setting,
  # rank-1 at OTA+FFG's best density, the automatic densities); 'all': every model.
  config.eval.sampled_models = 'best'
  config.eval.temperature = 1.0
  config.eval.sample_seed = 0  # the same sampling key for every model
  config.eval.batch_size = 256  # completions per sampler call

  config.merge = ml_collections.ConfigDict()
  config.merge.ta_scales = (0.25, 0.5, 0.75, 1.0)
  config.merge.ties_densities = (0.1, 0.2, 0.4)
  config.merge.dare_densities = (0.1, 0.3, 0.5)  # kept share (drop = 1 - density)
  config.merge.ffg_densities = (0.05, 0.1, 0.2, 0.4)  # OTA+FFG (full and rank-1) and grafts
  # Automatic per-expert densities from nu tau^2: 'knee' (entries above the mean saliency),
  # 'mass<share>' (fewest entries holding that share of the saliency).
  config.merge.auto_rules = ('knee', 'mass0.9')
  config.merge.ota_power = 0.5
  config.merge.ota_eps = 1e-8

  if smoke:
    config.tasks = ('arithmetic', 'reversal')  # their prompts fit the test decoder
    _shrink(config)
    config.base_band = (0.0, 1.0)
    config.expert_lrs = (1e-3, 3e-3)
    config.expert_seeds = (0, 1)
    config.expert_min_z = None  # 4-step experts learn nothing: the smallest rate, untested
    config.eval.update(num_samples=2, batch_size=8)
    config.merge.update(
      ta_scales=(0.5, 1.0),
      ties_densities=(0.3,),
      dare_densities=(0.5,),
      ffg_densities=(0.1, 0.3),
    )
  return config
