r"""GRPO-family RL on the synthetic arithmetic task, with and without the CAPO mask.

Launch (CPU), from an untied SFT policy (configs/sft.py:arithmetic_untied, itself from a
configs/lm.py:tiny_untied run):
  python experiments/sft.py --config=configs/sft.py:arithmetic_untied --workdir=/tmp/rl/sft \
      --config.init_from=/tmp/rl/lm
  python experiments/train_rl.py --config=configs/rl.py:capo_aggressive --workdir=/tmp/rl/capo \
      --config.init_from=/tmp/rl/sft
The regimes of the paper, scaled to a 0.9M-parameter policy: both warm up over the first 10% of
the steps and decay by cosine to 0, as the reference recipes do (so nothing is masked on step 0,
and the masked share falls late in training with the rate).
Variants:
  grpo_conservative   learning rate x, 12b prompts a step
  grpo_aggressive     5x, b prompts (drgrpo_aggressive: Dr.GRPO's advantages and aggregation)
  capo_aggressive     the aggressive regime with the CAPO mask at the reference thresholds
                      (drcapo_aggressive: Dr.CAPO's)
  capo_calibrated     the same at calibrated thresholds (set capo.tau_H / capo.tau_F)
  random_aggressive   a random mask at a set rate (capo.random_rate) of the A != 0 tokens
  capo_log            calibration: CAPO's stats logged per token, nothing masked, seed 100
                      (a seed no study run uses)
  test                seconds, from scratch
  qwen2_5_0_5b_gsm8k  GRPO from a Hugging Face Qwen2.5-0.5B(-Instruct) directory on GSM8K-style
  qwen2_5_1_5b_gsm8k  JSONL (data.jsonl_task_source: train.jsonl, test.jsonl), on a GPU / TPU mesh:
                      bf16 compute, fp32 params and AdamW state, lr 1e-6, 32 prompts x 8 a
                      step, 512 new tokens. The model and the data are the user's to name:
  python experiments/train_rl.py --config=configs/rl.py:qwen2_5_0_5b_gsm8k --workdir=/ckpt/grpo \
      --config.init_from=hf:/models/Qwen2.5-0.5B-Instruct --config.task.name=jsonl:/data/gsm8k
  Memory and time per step: benchmarks/estimate_hf_memory.py (BUILD.md).
"""

import os

import ml_collections
from ml_collections import config_dict

from curvopt import train

# The conservative learning rate x; the aggressive regime runs at 5x with 1/12 of the batch.
_LR = 2e-5
_MULTIPLIER = 5
_PROMPTS = 4  # b prompts a step in the aggressive regime (b * group_size completions)
# CAPO thresholds of its reference recipes: (tau_H, tau_F) per advantage kind.
_CAPO_TAUS = {'grpo': (0.01, 1e-4), 'dr_grpo': (5e-4, 1e-3)}
_CALIBRATION_SEED = 100
_VARIANTS = (
  'grpo_conservative',
  'grpo_aggressive',
  'drgrpo_aggressive',
  'capo_aggressive',
  'drcapo_aggressive',
  'capo_calibrated',
  'random_aggressive',
  'capo_log',
  'test',
  'qwen2_5_0_5b_gsm8k',
  'qwen2_5_1_5b_gsm8k',
)
# GSM8K's train split (7,473 problems) three times over at 32 prompts a step: what one 8-GPU
# host holds (the RL update takes a step's completions at once, without micro-batches; the
# reference's 128 prompts need ~18 H200s, benchmarks/estimate_hf_memory.py).
_GSM8K_PROMPTS = 32
_GSM8K_STEPS = 700


def get_config(arg: str = 'capo_aggressive') -> ml_collections.ConfigDict:
  if arg not in _VARIANTS:
    raise ValueError(f'unknown configs/rl.py variant {arg!r}; valid: {sorted(_VARIANTS)}')
  lm = train.load_config(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lm.py'), 'tiny_untied'
  )
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A train_sft (or train_lm) workdir: the policy starts from its params; or 'hf:/path', a
  # Hugging Face model directory (its tokenizer.json replaces the byte tokenizer).
  config.init_from = ''
  config.total_steps = 150
  config.halt_after_steps = 0
  config.log_every = 10
  config.eval_every = 5  # every 160 aggressive completions: an early collapse is seen
  config.tensorboard = True
  config.model = lm.model  # the SFT policy's (configs/sft.py:arithmetic_untied), head untied

  config.task = ml_collections.ConfigDict()
  config.task.name = 'arithmetic'  # or an easier / harder data.arithmetic_task(min, max)
  config.task.data_dir = config_dict.placeholder(str)  # default: $TFDS_DATA_DIR or <workdir>/tfds
  config.task.max_prompt_len = 32
  config.task.eval_prompts = 256  # greedy accuracy on the first test prompts

  # Held-out evaluation beside greedy accuracy: sampled accuracy as the rollouts sample, and a
  # probe (the starting policy's samples on the first test prompts) for entropy and KL.
  config.eval = ml_collections.ConfigDict()
  config.eval.sampled_prompts = 256
  config.eval.samples_per_prompt = 4  # 1,024 sampled completions
  config.eval.temperature = 1.0
  config.eval.top_k = 50
  config.eval.seed = 0  # the same draws at every evaluation and in every run
  config.eval.probe_prompts = 64
  config.eval.probe_every = 1  # steps; 0: at evaluations only

  config.rollout = ml_collections.ConfigDict()
  config.rollout.prompts_per_step = _PROMPTS
  config.rollout.group_size = 8  # G completions per prompt
  config.rollout.max_new_tokens = 48
  config.rollout.temperature = 1.0
  config.rollout.top_k = 50  # as CAPO's top-K set, so every sampled token is in it
  config.rollout.top_p = 1.0

  config.reward = 'exact_match'
  config.advantage = 'grpo'  # or dr_grpo, rloo, none
  config.loss = ml_collections.ConfigDict()
  config.loss.agg = 'seq-mean-token-mean'
  config.loss.eps_low = 0.2
  config.loss.eps_high = 0.2
  config.loss.dual_clip = config_dict.placeholder(float)
  config.loss.beta = 0.0  # KL to the initial policy (the aggressive regime of the paper: 0)
  config.loss.kl = 'k3'

  config.capo = ml_collections.ConfigDict()
  config.capo.mode = 'off'  # 'capo' (the mask), 'random' (the control), 'log' (calibration)
  config.capo.tau_H, config.capo.tau_F = _CAPO_TAUS['grpo']
  config.capo.symmetric = True
  config.capo.top_k = 50
  config.capo.chunk_size = 256
  config.capo.random_rate = config_dict.placeholder(float)  # mode 'random': share of A != 0
  # The shadow Adam's b1 / b2 / eps are the optimizer's; set here, they must restate them.
  for field in ('b1', 'b2', 'eps'):
    config.capo[field] = config_dict.placeholder(float)

  config.optimizer = lm.optimizer
  config.optimizer.update(
    name='adamw',
    learning_rate=_MULTIPLIER * _LR,
    weight_decay=0.0,
    b2=0.999,
    grad_clip_norm=1.0,
  )
  config.schedule = lm.schedule
  config.schedule.update(name='warmup_cosine', final_fraction=0.0)
  config.schedule.warmup_steps = config.get_ref('total_steps') // 10
  config.checkpoint = lm.checkpoint
  config.checkpoint.every = 25
  config.mesh = lm.mesh

  if arg == 'grpo_conservative':
    config.rollout.prompts_per_step = 12 * _PROMPTS
    config.optimizer.learning_rate = _LR
    config.total_steps = 100
    config.checkpoint.every = 10
  if arg.startswith('dr'):
    config.advantage = 'dr_grpo'
    config.loss.agg = 'seq-mean-token-sum-norm'
    config.capo.tau_H, config.capo.tau_F = _CAPO_TAUS['dr_grpo']
  if arg in ('capo_aggressive', 'drcapo_aggressive'):
    config.capo.mode = 'capo'
  if arg == 'capo_calibrated':
    config.capo.mode = 'capo'
    config.capo.tau_H = config_dict.placeholder(float)
    config.capo.tau_F = config_dict.placeholder(float)
  if arg == 'random_aggressive':
    config.capo.mode = 'random'
  if arg == 'capo_log':
    config.capo.mode = 'log'
    config.seed = _CALIBRATION_SEED
  if arg == 'test':
    config.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64)
    config.capo.mode = 'capo'
    config.total_steps = 4
    config.log_every = 2
    config.eval_every = 2
    config.task.max_prompt_len = 40
    config.task.eval_prompts = 8
    config.eval.update(sampled_prompts=4, samples_per_prompt=2, probe_prompts=4)
    config.rollout.max_new_tokens = 16
    config.rollout.group_size = 4
    config.checkpoint.every = 2
    config.checkpoint.async_save = False
    config.tensorboard = False
    config.mesh.num_devices = 1
  if arg.endswith('_gsm8k'):
    _hf_gsm8k(config)
  return config


def _hf_gsm8k(config: ml_collections.ConfigDict) -> None:
  """GRPO from a Hugging Face checkpoint on GSM8K-style JSONL (the *_gsm8k variants).

  The two sizes share every setting: the checkpoint at init_from sets the shapes.
  """
  # The checkpoint's config.json is the model: no preset name, only numerics here. Left
  # unset, the trainer refuses to start and asks for --config.init_from=hf:/path.
  config.init_from = config_dict.placeholder(str)
  config.model = ml_collections.ConfigDict()
  config.model.name = config_dict.placeholder(str)
  config.model.dtype = 'bfloat16'  # compute and KV cache
  # AdamW at lr 1e-6 moves a weight by ~1e-6, far below bf16's resolution (2^-8 relative):
  # bf16 parameters would drop most updates, so they and the moments stay fp32.
  config.model.param_dtype = 'float32'
  config.model.remat = True  # the update's activations at 1,024 x 832 tokens dominate memory
  config.model.attention_impl = config_dict.placeholder(str)
  config.model.max_len = 1024  # >= max_prompt_len + max_new_tokens
  # 'jsonl:/dir' with dir/train.jsonl and dir/test.jsonl (GSM8K's files); left unset, the
  # trainer refuses to start and says so.
  config.task.name = config_dict.placeholder(str)
  config.task.max_prompt_len = 320  # GSM8K questions in a Qwen chat turn: < 300 tokens
  config.task.eval_prompts = 1319  # all of GSM8K's test split, greedy
  config.total_steps = _GSM8K_STEPS
  config.eval_every = 25
  config.log_every = 1
  config.eval.update(sampled_prompts=256, samples_per_prompt=4, probe_prompts=64, probe_every=0)
  # The reference GRPO recipe (G = 8, lr 1e-6 with 10% warm-up and cosine decay to 0, no KL), at
  # a quarter of its prompts a step.
  config.rollout.update(prompts_per_step=_GSM8K_PROMPTS, group_size=8, max_new_tokens=512)
  config.optimizer.update(learning_rate=1e-6, weight_decay=0.0, grad_clip_norm=1.0)
  config.loss.beta = 0.0
  config.capo.mode = 'off'  # 'capo' adds the mask at the reference thresholds
  config.checkpoint.every = 25
  config.checkpoint.keep = 2
  config.mesh.update(data=1, fsdp=-1, num_devices=None)  # FSDP over every device
