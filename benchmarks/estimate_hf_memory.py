r"""Memory and time of a GRPO step from a Hugging Face checkpoint: an estimate, not a measurement.

  python benchmarks/estimate_hf_memory.py                  # Qwen2.5-0.5B and 1.5B, their configs
  python benchmarks/estimate_hf_memory.py --devices=32 --accelerator=h100
  python benchmarks/estimate_hf_memory.py --prompts_per_step=128  # the reference recipe's batch
  python benchmarks/estimate_hf_memory.py --config_json=/models/X/config.json \
      --rl_config=qwen2_5_1_5b_gsm8k

For each model (the built-in Qwen2.5 shapes, or a `config.json` through `models.config_from_hf`)
and the settings of a configs/rl.py variant (dtypes, remat, prompts x group size, prompt and
completion lengths, KL reference), it prints:
- the parameter count, from the shapes (`param_count`; a test checks it against the params tree
  the Decoder builds: tests/benchmarks/test_benchmarks_estimate_hf_memory.py);
- bytes of the parameters, AdamW's two moments and the gradients (param_dtype), of a frozen
  reference policy when loss.beta > 0, of the rollout's KV cache (compute dtype, all rows), and
  of the update's activations: with remat, every block's input plus one block recomputed; the
  masked attention's fp32 scores and probabilities (the update passes a padding mask, so XLA's
  attention materializes them); and the fp32 logits over all positions with the log-softmax,
  probabilities and logit gradient beside them (4 copies);
- the total over the mesh and per device, assuming every part shards evenly over `--devices`;
- time per step from FLOPs at assumed utilizations: 2N FLOPs a token to sample (prefill and
  decode, --sample_mfu, low because decoding is bandwidth-bound) and 6N a token to update
  (--update_mfu); attention FLOPs are left out (short sequences).
"""

import dataclasses
import json
import math
import os
import sys

from absl import app
from absl import flags

from curvopt import models
from curvopt import train

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GIB = 2**30

# config.json fields of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B (their Instruct models share them).
_QWEN2_5 = {
  'architectures': ['Qwen2ForCausalLM'],
  'model_type': 'qwen2',
  'hidden_act': 'silu',
  'max_position_embeddings': 32768,
  'rms_norm_eps': 1e-6,
  'rope_theta': 1000000.0,
  'sliding_window': 32768,
  'use_sliding_window': False,
  'tie_word_embeddings': True,
  'vocab_size': 151936,
  'num_key_value_heads': 2,
}
BUILTIN = {
  'qwen2.5-0.5b': dict(
    _QWEN2_5,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
  ),
  'qwen2.5-1.5b': dict(
    _QWEN2_5,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
  ),
}
# The configs/rl.py variant each built-in model runs with.
_RL_CONFIGS = {'qwen2.5-0.5b': 'qwen2_5_0_5b_gsm8k', 'qwen2.5-1.5b': 'qwen2_5_1_5b_gsm8k'}
# Dense bf16 peak FLOP/s and HBM bytes of one accelerator.
ACCELERATORS = {'h100': (989e12, 80e9), 'h200': (989e12, 141e9)}
_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}

_MODEL = flags.DEFINE_list('model', list(BUILTIN), f'Built-in shapes: {sorted(BUILTIN)}.')
_CONFIG_JSON = flags.DEFINE_string('config_json', None, "A checkpoint's config.json instead.")
_RL_CONFIG = flags.DEFINE_string(
  'rl_config',
  None,
  "configs/rl.py variant (default: the built-in model's; for --config_json, qwen2_5_0_5b_gsm8k).",
)
_PROMPTS = flags.DEFINE_integer(
  'prompts_per_step', None, "Override the config's rollout.prompts_per_step."
)
_DEVICES = flags.DEFINE_integer('devices', 8, 'Devices the mesh shards everything over.')
_ACCELERATOR = flags.DEFINE_enum('accelerator', 'h200', sorted(ACCELERATORS), 'For time and fit.')
_UPDATE_MFU = flags.DEFINE_float('update_mfu', 0.4, 'Assumed utilization of the update.')
_SAMPLE_MFU = flags.DEFINE_float('sample_mfu', 0.1, 'Assumed utilization of sampling.')


@dataclasses.dataclass(frozen=True)
class Run:
  """What the estimate reads of an RL config."""

  param_dtype: str
  compute_dtype: str
  remat: bool
  rows: int  # completions a step: prompts_per_step x group_size
  prompt_len: int
  new_tokens: int
  reference: bool  # a frozen copy of the starting policy for the KL term

  @classmethod
  def from_config(cls, config) -> 'Run':
    return cls(
      param_dtype=config.model.get('param_dtype') or 'float32',
      compute_dtype=config.model.dtype,
      remat=bool(config.model.get('remat')),
      rows=config.rollout.prompts_per_step * config.rollout.group_size,
      prompt_len=config.task.max_prompt_len,
      new_tokens=config.rollout.max_new_tokens,
      reference=config.loss.beta > 0,
    )


def param_count(cfg: models.DecoderConfig) -> int:
  """The Decoder's number of parameters, from its shapes alone."""
  d, hd = cfg.d_model, cfg.head_size or cfg.d_model // cfg.n_heads
  q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
  block = 2 * d  # the two RMSNorm scales
  block += d * q + 2 * d * kv + q * d  # q, k, v, o
  block += (q + 2 * kv) * cfg.qkv_bias + d * cfg.out_bias
  block += 3 * d * cfg.d_ff  # SwiGLU: gate, up, down
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.vocab_size * d + cfg.n_layers * block + d + head


def _block_activations(cfg: models.DecoderConfig) -> int:
  """Values a block keeps per token for its backward pass (attention scores aside)."""
  hd = cfg.head_size or cfg.d_model // cfg.n_heads
  q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
  # Norm inputs and outputs, residual and projection outputs, q/k/v and the attention output,
  # gate, up, silu(gate) and their product.
  return 6 * cfg.d_model + 2 * q + 2 * kv + 4 * cfg.d_ff


def memory(cfg: models.DecoderConfig, run: Run) -> dict[str, int]:
  """Bytes of each part of an RL step over the whole mesh."""
  n = param_count(cfg)
  pb, cb = _BYTES[run.param_dtype], _BYTES[run.compute_dtype]
  hd = cfg.head_size or cfg.d_model // cfg.n_heads
  seq = run.prompt_len + run.new_tokens
  tokens = run.rows * seq
  kept_layers = cfg.n_layers if not run.remat else 1  # blocks whose activations live at once
  parts = {
    'params': n * pb,
    'AdamW mu + nu': 2 * n * pb,
    'grads': n * pb,
    'reference params': n * pb if run.reference else 0,
    'rollout KV cache': 2 * cfg.n_layers * run.rows * seq * cfg.n_kv_heads * hd * cb,
    'block inputs (remat)': cfg.n_layers * tokens * cfg.d_model * cb if run.remat else 0,
    'block activations': kept_layers * tokens * _block_activations(cfg) * cb,
    'attention scores (fp32)': kept_layers * 2 * run.rows * cfg.n_heads * seq * seq * 4,
    'logits (fp32, 4 copies)': 4 * run.rows * (seq - 1) * cfg.vocab_size * 4,
  }
  return {k: v for k, v in parts.items() if v}


def step_flops(n_params: int, run: Run) -> dict[str, float]:
  """FLOPs of one step: sampling (prefill + decode) and the update (forward + backward)."""
  seq = run.prompt_len + run.new_tokens
  update = 6 * n_params * run.rows * seq + (2 * n_params * run.rows * seq if run.reference else 0)
  return {'sample': 2.0 * n_params * run.rows * seq, 'update': float(update)}


def _hf_config(name: str) -> tuple[str, dict]:
  if _CONFIG_JSON.value:
    with open(_CONFIG_JSON.value) as f:
      return _CONFIG_JSON.value, json.load(f)
  if name not in BUILTIN:
    raise app.UsageError(f'unknown --model {name!r}; built in: {sorted(BUILTIN)}')
  return name, BUILTIN[name]


def _report(label: str, hf_config: dict, variant: str) -> None:
  config = train.load_config(os.path.join(_REPO, 'configs', 'rl.py'), variant)
  if _PROMPTS.value:
    config.rollout.prompts_per_step = _PROMPTS.value
  run = Run.from_config(config)
  cfg = models.config_from_hf(hf_config, max_len=run.prompt_len + run.new_tokens)
  devices = _DEVICES.value
  peak, hbm = ACCELERATORS[_ACCELERATOR.value]
  n = param_count(cfg)
  parts = memory(cfg, run)
  total = sum(parts.values())
  print(
    f'\n{label}: {n:,} parameters; configs/rl.py:{variant}: {run.rows} completions a step '
    f'({config.rollout.prompts_per_step} prompts x {config.rollout.group_size}), '
    f'{run.prompt_len} + {run.new_tokens} tokens, params {run.param_dtype}, compute '
    f'{run.compute_dtype}, remat {run.remat}'
  )
  print(f'  {"part":<26} {"GiB total":>10} {f"GiB / device (of {devices})":>22}')
  for name, size in parts.items():
    print(f'  {name:<26} {size / _GIB:>10.2f} {size / devices / _GIB:>22.2f}')
  print(f'  {"sum":<26} {total / _GIB:>10.2f} {total / devices / _GIB:>22.2f}')
  fit = math.ceil(total / (0.9 * hbm))
  print(
    f'  devices whose {hbm / 1e9:.0f} GB of HBM hold it at 90%: {fit} '
    f'({_ACCELERATOR.value}, if every part shards evenly)'
  )
  flops = step_flops(n, run)
  sample_s = flops['sample'] / (devices * peak * _SAMPLE_MFU.value)
  update_s = flops['update'] / (devices * peak * _UPDATE_MFU.value)
  step_s = sample_s + update_s
  print(
    f'  ESTIMATE on {devices} x {_ACCELERATOR.value}: sample {flops["sample"]:.2e} FLOPs at '
    f'{_SAMPLE_MFU.value:.0%} MFU = {sample_s:.1f} s, update {flops["update"]:.2e} FLOPs at '
    f'{_UPDATE_MFU.value:.0%} = {update_s:.1f} s; {step_s:.1f} s a step, '
    f'{run.rows / step_s:.0f} completions/s, '
    f'{config.total_steps * step_s / 60:.0f} min for {config.total_steps} steps'
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  print(
    'An estimate from shapes and FLOP counts, not a measurement; utilizations are assumed '
    f'(sample {_SAMPLE_MFU.value:.0%}, update {_UPDATE_MFU.value:.0%} of '
    f'{ACCELERATORS[_ACCELERATOR.value][0] / 1e12:.0f} TFLOP/s bf16 a device).'
  )
  names = ['config.json'] if _CONFIG_JSON.value else _MODEL.value
  for name in names:
    label, hf_config = _hf_config(name)
    _report(label, hf_config, _RL_CONFIG.value or _RL_CONFIGS.get(name, 'qwen2_5_0_5b_gsm8k'))


if __name__ == '__main__':
  sys.exit(app.run(main))
