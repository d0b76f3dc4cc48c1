"""benchmarks/estimate_hf_memory.py: its parameter count is the Decoder's, and the script runs."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from curvopt import models
from curvopt import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SCRIPT = os.path.join(REPO, 'benchmarks', 'estimate_hf_memory.py')


def _load_script():
  spec = importlib.util.spec_from_file_location('estimate_hf_memory', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


estimate = _load_script()

# name -> DecoderConfig fields beyond the tiny shapes: every branch of the formula.
TINY = {
  'qwen2_tied': dict(qkv_bias=True, tie_embeddings=True),
  'llama_untied': dict(tie_embeddings=False),
  'llama_attention_bias': dict(qkv_bias=True, out_bias=True, tie_embeddings=False),
  'explicit_head_size': dict(head_size=12, qkv_bias=True),
}


@pytest.mark.parametrize('name', sorted(TINY))
def test_param_count_equals_the_decoders_params(name):
  cfg = models.DecoderConfig(
    vocab_size=96,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    d_ff=56,
    max_len=16,
    **TINY[name],
  )
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(models.Decoder(cfg).init, jax.random.key(0), tokens)['params']
  assert estimate.param_count(cfg) == models.count_params(shapes)


# built-in shapes -> the published parameter count
PUBLISHED = {'qwen2.5-0.5b': 494_032_768, 'qwen2.5-1.5b': 1_543_714_304}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_builtin_qwen_shapes(name):
  cfg = models.config_from_hf(estimate.BUILTIN[name], max_len=1024)
  assert cfg.qkv_bias and cfg.tie_embeddings and not cfg.out_bias
  assert estimate.param_count(cfg) == PUBLISHED[name]


def test_memory_parts_of_the_0_5b_config():
  config = train.load_config(os.path.join(REPO, 'configs', 'rl.py'), 'qwen2_5_0_5b_gsm8k')
  run = estimate.Run.from_config(config)
  assert (run.rows, run.prompt_len, run.new_tokens) == (256, 320, 512)
  assert (run.param_dtype, run.compute_dtype, run.remat, run.reference) == (
    'float32',
    'bfloat16',
    True,
    False,
  )
  cfg = models.config_from_hf(estimate.BUILTIN['qwen2.5-0.5b'], max_len=1024)
  parts = estimate.memory(cfg, run)
  n = PUBLISHED['qwen2.5-0.5b']
  assert parts['params'] == 4 * n and parts['AdamW mu + nu'] == 8 * n and parts['grads'] == 4 * n
  assert 'reference params' not in parts  # loss.beta = 0
  # k and v, 24 layers, 256 rows of 832 positions, 2 KV heads of 64, bf16.
  assert parts['rollout KV cache'] == 2 * 24 * 256 * 832 * 2 * 64 * 2
  flops = estimate.step_flops(n, run)
  assert flops['update'] == 3 * flops['sample'] == 6 * n * 256 * 832


def test_script_prints_the_table():
  done = subprocess.run(
    [sys.executable, _SCRIPT, '--model=qwen2.5-0.5b', '--devices=32', '--prompts_per_step=128'],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    check=False,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert '494,032,768 parameters' in done.stdout and '1024 completions a step' in done.stdout
  assert 'ESTIMATE on 32 x h200' in done.stdout and 'not a measurement' in done.stdout
