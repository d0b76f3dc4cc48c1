r"""Train-step throughput of the reference decoder, and model-FLOPs utilization on accelerators.

  python benchmarks/bench_train_step.py                       # tiny and small on this machine
  python benchmarks/bench_train_step.py --models=gpt2s --batch_size=16 --seq_len=1024   # GPU

For each model it times, side by side in one process, the full train step (forward, backward,
AdamW update, norms: what train_lm runs) and its anchor, a bare forward + backward of the same
model, and prints tokens/s and their ratio. On an accelerator it also prints MFU: model FLOPs
(6 N + 12 L d T per token, the PaLM count) over the chip's peak bf16 rate.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvopt import models
from curvopt import train
import _timing  # benchmarks/_timing.py, beside this script

_MODELS = flags.DEFINE_list('models', None, 'Model sizes (default: tiny,small on CPU, gpt2s else).')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Sequences per step (default per model).')
_SEQ = flags.DEFINE_integer('seq_len', None, 'Tokens per sequence (default per model).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per repetition.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repetitions; the median is reported.')
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Peak bf16 TFLOP/s (default: by device kind).')

# Dense bf16 peaks from the vendors' datasheets (no sparsity).
_PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'TPU v4': 275.0, 'TPU v5': 459.0}
_DEFAULTS = {'tiny': (16, 128), 'small': (16, 256), 'gpt2s': (16, 1024)}


def _peak_tflops():
  if _PEAK.value:
    return _PEAK.value
  kind = jax.devices()[0].device_kind
  return next((v for k, v in _PEAK_TFLOPS.items() if k in kind), None)



def bench(name: str):
  batch_size, seq_len = _DEFAULTS[name]
  batch_size, seq_len = _BATCH.value or batch_size, _SEQ.value or seq_len
  dtype = train.resolve_dtype('auto')
  cfg = models.model_config(name, dtype=dtype, max_len=max(seq_len, 8))
  model = models.Decoder(cfg)
  optimizer = optax.adamw(1e-3, weight_decay=0.1)
  state = jax.jit(train.make_init_state(model, optimizer, seq_len=seq_len))(jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      0, min(cfg.vocab_size, 256), (batch_size, seq_len + 1)), jnp.int32)

  def logits_fn(params, inputs):
    return model.apply({'params': params}, inputs)[0]

  step = jax.jit(train.make_train_step(logits_fn, optimizer, pad_id=-1,
                                       learning_rate=lambda s: 1e-3), donate_argnums=0)
  grad = jax.jit(jax.grad(lambda p, t: train.lm_loss(logits_fn(p, t[:, :-1]), t[:, 1:], -1)[0]))

  holder = {'state': state}

  def run_step():
    holder['state'], metrics = step(holder['state'], tokens)
    return metrics['loss']

  def run_grad():
    return grad(holder['state'].params, tokens)

  run_step(), run_grad()  # compile
  jax.block_until_ready(holder['state'])
  times = {'train_step': [], 'fwd_bwd': []}
  for _ in range(_REPEATS.value):
    times['train_step'].append(_timing.seconds_per_call(run_step, _STEPS.value))
    times['fwd_bwd'].append(_timing.seconds_per_call(run_grad, _STEPS.value))
  t_step, t_grad = np.median(times['train_step']), np.median(times['fwd_bwd'])
  tokens_per_step = batch_size * seq_len
  n_params = models.count_params(holder['state'].params)
  line = (f'{name:6s} params {n_params / 1e6:7.2f}M  batch {batch_size}x{seq_len}  {dtype:8s} '
          f'train step {tokens_per_step / t_step:10.0f} tok/s  fwd+bwd {tokens_per_step / t_grad:10.0f} '
          f'tok/s  step/fwd+bwd time ratio {t_step / t_grad:.3f}')
  peak = _peak_tflops()
  if jax.default_backend() != 'cpu' and peak:
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.d_model * seq_len
    mfu = flops_per_token * tokens_per_step / t_step / (peak * 1e12)
    line += f'  MFU {100 * mfu:.1f}% of {peak:.0f} TFLOP/s'
  print(line, flush=True)


def main(argv):
  del argv
  names = _MODELS.value or (['tiny', 'small'] if jax.default_backend() == 'cpu' else ['gpt2s'])
  print(f'backend {jax.default_backend()}, device {jax.devices()[0].device_kind}, '
        f'{jax.device_count()} device(s); median of {_REPEATS.value} x {_STEPS.value} steps')
  for name in names:
    bench(name)


if __name__ == '__main__':
  app.run(main)
