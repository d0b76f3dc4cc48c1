r"""Peak host memory of `models.load_hf` on a synthetic Hugging Face checkpoint of a few GB.

  python benchmarks/bench_hf_load.py --workdir=/big/tmp                      # ~3.6 GB, 7B shapes
  python benchmarks/bench_hf_load.py --workdir=/tmp/x --num_layers=1 --hidden=256 \
      --intermediate=688 --vocab=1024                                        # a smoke run

A Llama checkpoint with Llama-2-7B's tensor shapes (hidden 4096, intermediate 11008, 32 heads,
vocab 32000) but only `--num_layers` blocks is written as bf16 sharded safetensors with an index
(one tensor generated at a time: the writer never holds the model). A child process then loads
it with `load_hf(dtype='bfloat16', mesh=...)` over every local device (FSDP-sharded, each
device's slice read on its own) and reports its peak resident memory (VmHWM) against the
checkpoint's bytes. On CPU devices the loaded parameters themselves live in host memory, so the
loader's own cost is the peak minus the resident set before loading minus the parameter bytes;
on a GPU the parameters leave the host and the peak is that cost. The loader holds one slice of
one tensor at a time, so the cost follows the largest tensor (the embedding, 250 MiB at 7B in
bf16) far more than the model: 0.59 GiB for 8 blocks (3.5 GiB), 0.96 GiB for all 32 (12.6 GiB;
benchmarks/RESULTS.md).
`--cpu_devices=8` splits the host into 8 CPU devices (the FSDP path) for a CPU-only machine.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np

_WORKDIR = flags.DEFINE_string('workdir', None, 'where the checkpoint is written (needs its size)')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 8, 'blocks of 7B shapes (~0.4 GB each in bf16)')
_HIDDEN = flags.DEFINE_integer('hidden', 4096, 'hidden size')
_INTERMEDIATE = flags.DEFINE_integer('intermediate', 11008, 'MLP width')
_HEADS = flags.DEFINE_integer('heads', 32, 'attention heads (and KV heads)')
_VOCAB = flags.DEFINE_integer('vocab', 32000, 'vocabulary size')
_SHARD_GB = flags.DEFINE_float('shard_gb', 1.0, 'largest safetensors shard, GB')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, '> 0: that many CPU devices in the child')
_KEEP = flags.DEFINE_bool('keep', False, 'keep the checkpoint afterwards')

_CHILD = r"""
import json, sys, time
import jax
from curvopt import models

def status(field):
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ':'))

mesh = jax.make_mesh((len(jax.devices()),), ('fsdp',))
baseline = status('VmRSS')  # after the backend started
start = time.perf_counter()
cfg, params = models.load_hf(sys.argv[1], dtype='bfloat16', mesh=mesh)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
leaves = jax.tree.leaves(params)
print(json.dumps({
  'seconds': seconds,
  'baseline_rss': baseline,
  'peak_rss': status('VmHWM'),
  'param_bytes': sum(x.nbytes for x in leaves),
  'largest_tensor_bytes': max(x.nbytes for x in leaves),
  'devices': len(jax.devices()),
  'platform': jax.devices()[0].platform,
}))
"""


def _config() -> dict:
  return {
    'architectures': ['LlamaForCausalLM'],
    'model_type': 'llama',
    'vocab_size': _VOCAB.value,
    'hidden_size': _HIDDEN.value,
    'intermediate_size': _INTERMEDIATE.value,
    'num_hidden_layers': _NUM_LAYERS.value,
    'num_attention_heads': _HEADS.value,
    'num_key_value_heads': _HEADS.value,
    'hidden_act': 'silu',
    'max_position_embeddings': 4096,
    'rms_norm_eps': 1e-5,
    'rope_theta': 10000.0,
    'tie_word_embeddings': False,
    'torch_dtype': 'bfloat16',
  }


def _specs() -> dict:
  """HF tensor name -> shape, in the order save_pretrained writes them."""
  d, f, v = _HIDDEN.value, _INTERMEDIATE.value, _VOCAB.value
  shapes = {'model.embed_tokens.weight': (v, d)}
  for i in range(_NUM_LAYERS.value):
    p = f'model.layers.{i}.'
    shapes.update(
      {
        p + 'input_layernorm.weight': (d,),
        **{p + f'self_attn.{m}_proj.weight': (d, d) for m in 'qkvo'},
        p + 'post_attention_layernorm.weight': (d,),
        p + 'mlp.gate_proj.weight': (f, d),
        p + 'mlp.up_proj.weight': (f, d),
        p + 'mlp.down_proj.weight': (d, f),
      }
    )
  shapes.update({'model.norm.weight': (d,), 'lm_head.weight': (v, d)})
  return shapes


def _write_checkpoint(path: str) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  from curvopt import merge  # pylint: disable=g-import-not-at-top

  bf16 = ml_dtypes.bfloat16
  specs = {n: jax.ShapeDtypeStruct(s, bf16) for n, s in _specs().items()}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(_config(), f, indent=2)
  rng = np.random.default_rng(0)
  with merge.SafetensorsWriter(path, specs, max_shard_bytes=int(_SHARD_GB.value * 1e9)) as writer:
    for name, spec in specs.items():
      # Row by row keeps the writer's own memory at one bf16 tensor.
      value = np.empty(spec.shape, bf16)
      for row in range(0, spec.shape[0], 1024):
        chunk = value[row : row + 1024]
        chunk[...] = (0.02 * rng.standard_normal(chunk.shape, np.float32)).astype(bf16)
      writer.write(name, value)
      del value
  return writer.total_bytes


def main(argv):
  del argv
  workdir = tempfile.mkdtemp(prefix='hf_load_', dir=_WORKDIR.value)
  try:
    checkpoint_bytes = _write_checkpoint(workdir)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if _CPU_DEVICES.value:
      env['XLA_FLAGS'] = (
        env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={_CPU_DEVICES.value}'
      )
    out = subprocess.run(
      [sys.executable, '-c', _CHILD, workdir], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
      raise SystemExit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
  finally:
    if not _KEEP.value:
      import shutil  # pylint: disable=g-import-not-at-top

      shutil.rmtree(workdir, ignore_errors=True)
  gib = 2.0**30
  on_host = r['param_bytes'] if r['platform'] == 'cpu' else 0
  cost = r['peak_rss'] - r['baseline_rss'] - on_host
  print(f'checkpoint        {checkpoint_bytes / gib:8.2f} GiB ({_NUM_LAYERS.value} layers)')
  print(f'devices           {r["devices"]} x {r["platform"]}')
  print(f'load time         {r["seconds"]:8.1f} s')
  print(f'baseline RSS      {r["baseline_rss"] / gib:8.2f} GiB (imports, backend)')
  print(f'peak RSS          {r["peak_rss"] / gib:8.2f} GiB')
  print(f'params on host    {on_host / gib:8.2f} GiB (CPU devices hold the loaded params)')
  print(f'loader cost       {cost / gib:8.2f} GiB = peak - baseline - params on host')
  print(f'largest tensor    {r["largest_tensor_bytes"] / gib:8.2f} GiB')
  print(f'cost / checkpoint {cost / checkpoint_bytes:8.3f}')


if __name__ == '__main__':
  app.run(main)
