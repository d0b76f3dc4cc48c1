r"""The main job: a small version of every experiment, written up as one report.

python experiments/demo.py --workdir=/tmp/curvopt_demo                 # default, ~10 min on 2 cores
python experiments/demo.py --workdir=/tmp/demo --config=configs/demo.py:smoke   # seconds, for tests
"""

import os

import ml_collections

from curvopt import train


def _load_config(name: str, arg: str) -> ml_collections.ConfigDict:
  return train.load_config(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py'), arg
  )


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  if arg not in ('default', 'smoke'):
    raise ValueError(f"unknown configs/demo.py variant {arg!r}; valid: ['default', 'smoke']")
  config = ml_collections.ConfigDict()
  # LM section: the tiny decoder on the code corpus, once per optimizer below.
  config.lm = _load_config('lm', 'tiny')
  config.lm.total_steps = 300
  config.lm.eval_every = 50
  config.lm.checkpoint.every = 100
  # Peak learning rates: each optimizer's best point of the 300-step sweep on this config
  # (docs/lm_experiments.md, configs/lm_sweep.py:tiny). LANTON: mean_ratio, its sign-LMO
  # embedding at 0.1 of the schedule, the noise estimate refreshed every 4th step (cheaper, and
  # the variant that beat D-Muon on every seed).
  config.lm_runs = ml_collections.ConfigDict(
    {
      'adamw': {'name': 'adamw', 'learning_rate': 3e-3},
      'dmuon': {'name': 'dmuon', 'learning_rate': 0.01, 'adam_learning_rate': 3e-3},
      'lanton_mean': {
        'name': 'lanton_mean',
        'learning_rate': 0.015,
        'adam_learning_rate': 3e-3,
        'lanton_embed_head_scale': 0.1,
        'lanton_noise_every': 4,
      },
    }
  )
  # RL section: SFT the LM section's AdamW model on arithmetic, then aggressive GRPO vs CAPO
  # from that policy (the full study is experiments/rl_study.py).
  config.rl = ml_collections.ConfigDict()
  config.rl.init_from_lm = 'adamw'  # which LM run the SFT starts from
  config.rl.baseline = 'grpo_aggressive'
  config.rl.candidate = 'capo_aggressive'
  config.rl.sft = _load_config('sft', 'arithmetic')
  config.rl.sft.update(total_steps=300, eval_every=100)
  config.rl.sft.eval.num_prompts = 128
  config.rl.runs = ml_collections.ConfigDict(
    {name: _load_config('rl', name) for name in ('grpo_aggressive', 'capo_aggressive')}
  )
  for run in config.rl.runs.values():
    run.update(total_steps=40, eval_every=10)
    run.task.eval_prompts = 128
    run.model = config.lm.model.copy_and_resolve_references()  # the SFT'd LM's (tied head)
  # Merge section: the RL section's arithmetic SFT model and a kv_recall expert, both fine-tuned
  # with AdamW from the LM section's AdamW model (the base), merged by every method (the full
  # study is experiments/merge_study.py). From that base, 300 steps of 32 sequences at lr 3e-3
  # teach kv_recall (0.83 greedy accuracy) where reversal and format stay at 0 (16 sequences:
  # 0.16).
  config.merge = _load_config('merge_study', 'default')
  config.merge.tasks = ('arithmetic', 'kv_recall')
  config.merge.expert.total_steps = 300
  config.merge.expert.optimizer.learning_rate = 3e-3
  config.merge.expert.data.batch_size = 32
  config.merge.expert.schedule.warmup_steps = 15
  config.merge.expert.checkpoint.every = 100
  config.merge.eval.num_prompts = 64
  config.merge.merge.ta_scales = (0.5, 1.0)
  config.merge.merge.ffg_densities = (0.3,)
  if arg == 'smoke':
    config.lm.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64)
    config.lm.data.name = 'code_corpus/mini'
    config.lm.data.update(batch_size=8, seq_len=32, eval_batches=1)
    config.lm.update(total_steps=6, log_every=2, eval_every=3)
    config.lm.schedule.warmup_steps = 2
    config.lm.checkpoint.every = 3
    sft_test = _load_config('sft', 'test')
    sft_test.model = config.lm.model.copy_and_resolve_references()  # it starts from that LM
    sft_test.update(total_steps=4, eval_every=4)
    sft_test.data.tasks = ml_collections.ConfigDict({'arithmetic': 1.0})
    config.rl.sft = sft_test
    rl_test = _load_config('rl', 'test')
    for run in config.rl.runs.values():
      for section in ('task', 'eval', 'rollout', 'checkpoint', 'mesh'):
        run[section] = rl_test[section].copy_and_resolve_references()
      run.model = config.lm.model.copy_and_resolve_references()
      run.update(total_steps=2, eval_every=1, log_every=1, tensorboard=False)
    merge_test = _load_config('merge_study', 'smoke')  # arithmetic + reversal: they fit max_len
    for run in (merge_test.base, merge_test.expert):
      run.model = config.lm.model.copy_and_resolve_references()
    config.merge = merge_test
  return config
