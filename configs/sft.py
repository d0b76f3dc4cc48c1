r"""Supervised fine-tuning on the synthetic tasks (completion tokens only).

Launch (CPU):
  python experiments/sft.py --config=configs/sft.py:arithmetic --workdir=/tmp/sft_arith
  python experiments/sft.py --config=configs/sft.py:arithmetic --workdir=/tmp/sft_arith_pt \
      --config.init_from=/work/runs/sweep_tiny/adamw/lr0.003/seed0   # from a train_lm run
  python experiments/sft.py --config=configs/sft.py:arithmetic_untied --workdir=/tmp/rl/sft \
      --config.init_from=/tmp/rl/lm   # a configs/lm.py:tiny_untied run
  python experiments/sft.py --config=configs/sft.py:multitask --workdir=/tmp/merge/base
  python experiments/sft.py --config=configs/sft.py:expert_reversal --workdir=/tmp/merge/reversal \
      --config.init_from=/tmp/merge/base
Variants:
  arithmetic       the tiny decoder fine-tuned to moderate arithmetic accuracy (the first RL
                   study's policy; the demo's).
  arithmetic_untied  the RL policy of configs/rl.py: the same with a separate output head (from
                   configs/lm.py:tiny_untied), longer, evaluated by sampled accuracy too (the
                   RL study starts at a sampled success of 0.4-0.6; data.tasks picks an
                   easier arithmetic_task if it needs one).
  multitask        a light warm-up on all tasks at once: the base model of the merge experiment.
  expert_<task>    one capability expert per task (arithmetic, reversal, sorting, kv_recall,
                   format), fine-tuned with AdamW (its checkpoint keeps Adam's nu); start it
                   from the multitask base with --config.init_from.
  test             seconds, for tests: a 2-layer d=32 decoder.
  hf_gsm8k         a Hugging Face checkpoint (e.g. Qwen2.5-0.5B) fine-tuned on GSM8K-style
                   JSONL before GRPO (configs/rl.py:qwen2_5_0_5b_gsm8k); both must be named:
  python experiments/sft.py --config=configs/sft.py:hf_gsm8k --workdir=/ckpt/sft \
      --config.init_from=hf:/models/Qwen2.5-0.5B --config.data.tasks=jsonl:/data/gsm8k
"""

import os

import ml_collections
from ml_collections import config_dict

from curvopt import train

TASK_NAMES = ('arithmetic', 'reversal', 'sorting', 'kv_recall', 'format')
_VARIANTS = ('arithmetic', 'arithmetic_untied', 'multitask', 'test', 'hf_gsm8k') + tuple(
  f'expert_{t}' for t in TASK_NAMES
)


def _lm_config(arg: str) -> ml_collections.ConfigDict:
  return train.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lm.py'), arg)


def get_config(arg: str = 'arithmetic') -> ml_collections.ConfigDict:
  if arg not in _VARIANTS:
    raise ValueError(f'unknown configs/sft.py variant {arg!r}; valid: {sorted(_VARIANTS)}')
  # Model, optimizer, schedule, checkpoint and mesh sections as in LM pretraining, so that
  # init_from a train_lm run of configs/lm.py:tiny needs no model overrides.
  config = _lm_config('tiny_untied' if arg == 'arithmetic_untied' else 'tiny')
  del config.data
  # A train_lm / train_sft workdir: start from its newest params; or 'hf:/path' (see lm.py).
  config.init_from = ''
  config.total_steps = 600
  config.log_every = 25
  config.eval_every = 100
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 0.0

  config.data = ml_collections.ConfigDict()
  if arg == 'hf_gsm8k':
    # A str, so that --config.data.tasks=jsonl:/path/to/dir sets it; unset, the trainer says so.
    config.data.tasks = config_dict.placeholder(str)
  else:
    config.data.tasks = ml_collections.ConfigDict({'arithmetic': 1.0})  # task -> mixture weight
  config.data.data_dir = config_dict.placeholder(str)  # default: $TFDS_DATA_DIR or <workdir>/tfds
  config.data.batch_size = 32
  config.data.seq_len = 64  # arithmetic examples are <= 61 tokens with BOS and EOS

  config.eval = ml_collections.ConfigDict()
  config.eval.tasks = ''  # comma-separated task names; '' evaluates the training tasks
  config.eval.num_prompts = 200  # greedy completions of the first test prompts, per task
  config.eval.max_prompt_len = 32  # with BOS: arithmetic <= 22, kv_recall <= 46 tokens
  config.eval.max_new_tokens = 48  # with EOS: arithmetic <= 39, kv_recall <= 55 tokens
  config.eval.loss_batches = 4  # completion loss on fixed test batches
  # > 0: also sampled accuracy (temperature 1, top_k), samples_per_prompt a prompt.
  config.eval.samples_per_prompt = 0
  config.eval.top_k = 50
  config.eval.seed = 0

  if arg == 'arithmetic_untied':
    config.total_steps = 2000
    config.eval.num_prompts = 256
    config.eval.samples_per_prompt = 4  # 1,024 sampled completions, as the RL evaluation
    config.checkpoint.every = 100
  if arg == 'multitask':
    config.data.tasks = ml_collections.ConfigDict({t: 1.0 for t in TASK_NAMES})
    config.data.seq_len = 128
    config.total_steps = 300
    config.eval.max_prompt_len = 48
    config.eval.max_new_tokens = 64
    config.eval.num_prompts = 100
  elif arg.startswith('expert_'):
    config.data.tasks = ml_collections.ConfigDict({arg[len('expert_') :]: 1.0})
    config.data.seq_len = 128
    config.total_steps = 300
    config.optimizer.learning_rate = 1e-3
    config.eval.tasks = ','.join(TASK_NAMES)  # what the expert forgot matters to the merge
    config.eval.max_prompt_len = 48
    config.eval.max_new_tokens = 64
    config.eval.num_prompts = 100
  elif arg == 'test':
    config.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=128)
    config.data.tasks = ml_collections.ConfigDict({'arithmetic': 1.0, 'reversal': 1.0})
    config.data.batch_size = 8
    config.total_steps = 8
    config.log_every = 2
    config.eval_every = 4
    config.eval.num_prompts = 8
    config.eval.max_new_tokens = 8
    config.eval.loss_batches = 1
    config.tensorboard = False
    config.mesh.num_devices = 1
    config.checkpoint.every = 4
  elif arg == 'hf_gsm8k':
    _hf_gsm8k(config)
  config.schedule.warmup_steps = max(2, config.total_steps // 20)
  config.checkpoint.every = min(config.checkpoint.every, config.total_steps)
  return config


def _hf_gsm8k(config: ml_collections.ConfigDict) -> None:
  """SFT of a Hugging Face checkpoint on GSM8K-style JSONL (the hf_gsm8k variant)."""
  # The checkpoint's config.json is the model; left unset, the trainer asks for init_from.
  config.init_from = config_dict.placeholder(str)
  config.model = ml_collections.ConfigDict()
  config.model.name = config_dict.placeholder(str)
  config.model.dtype = 'bfloat16'
  config.model.param_dtype = 'float32'  # updates of lr 1e-5 are below bf16's resolution
  config.model.remat = True
  config.model.max_len = 1024
  config.data.batch_size = 64
  config.data.seq_len = 768  # a GSM8K question and worked solution: < 600 Qwen tokens
  config.total_steps = 350  # GSM8K's 7,473 training problems three times over
  config.log_every = 10
  config.eval_every = 50
  config.optimizer.learning_rate = 1e-5
  config.eval.num_prompts = 256
  config.eval.max_prompt_len = 320
  config.eval.max_new_tokens = 512
  config.checkpoint.every = 50
  config.mesh.update(data=1, fsdp=-1, num_devices=None)
