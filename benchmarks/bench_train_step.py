r"""Train-step throughput of the reference decoder, and model-FLOPs utilization on accelerators.

  python benchmarks/bench_train_step.py                       # tiny and small on this machine
  python benchmarks/bench_train_step.py --models=tiny --optimizers=dmuon,lanton,lanton_mean
  python benchmarks/bench_train_step.py --models=gpt2s --batch_size=16 --seq_len=1024   # GPU

For each model it times, side by side in one process (interleaved repetitions, median), the
trainer's full train step (forward, backward, optimizer update, norms: what train_lm runs) for each
registry optimizer named, and their anchor, a bare forward + backward of the same model; it prints
tokens/s and time ratios against the anchor and against the first optimizer. On an accelerator it
also prints MFU: model FLOPs (6 N + 12 L d T per token, the PaLM count) over the chip's peak bf16
rate.
"""

import ast
import os

import _timing  # benchmarks/_timing.py, beside this script
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from curvopt import models
from curvopt import train

_MODELS = flags.DEFINE_list('models', None, 'Model sizes (default: tiny,small on CPU, gpt2s else).')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Sequences per step (default per model).')
_SEQ = flags.DEFINE_integer('seq_len', None, 'Tokens per sequence (default per model).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per repetition.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repetitions; the median is reported.')
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Peak bf16 TFLOP/s (default: by device kind).')
_OPTIMIZERS = flags.DEFINE_list(
  'optimizers',
  ['adamw'],
  'Registry optimizers to time, ratios against the first; '
  'NAME+field=value sets config.optimizer.field (lanton+lanton_noise_every=4).',
)
_ATTENTION = flags.DEFINE_enum(
  'attention_impl',
  None,
  ['xla', 'cudnn'],
  "jax.nn.dot_product_attention implementation (default: JAX's).",
)
_LM_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'lm.py')

# Dense bf16 peaks from the vendors' datasheets (no sparsity).
_PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'TPU v4': 275.0, 'TPU v5': 459.0}
_DEFAULTS = {'tiny': (16, 128), 'small': (16, 256), 'gpt2s': (16, 1024)}


def _peak_tflops():
  if _PEAK.value:
    return _PEAK.value
  kind = jax.devices()[0].device_kind
  return next((v for k, v in _PEAK_TFLOPS.items() if k in kind), None)


def _make_step(model, spec, seq_len, logits_fn):
  """The trainer's own step for the optimizer `spec` (NAME[+field=value...]), with its state."""
  lm = train.load_config(_LM_CONFIG, 'tiny')
  lm.optimizer.name, *overrides = spec.split('+')
  for override in overrides:
    field, _, value = override.partition('=')
    if field not in lm.optimizer:
      raise ValueError(f'{spec!r}: config.optimizer has no field {field!r}')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a string, e.g. a mapping name
    lm.optimizer[field] = value  # ConfigDict checks the type
  opt = train.make_optimizer(lm.optimizer, 1000, lm.schedule)
  state = jax.jit(train.make_init_state(model, opt.tx, seq_len=seq_len))(jax.random.key(0))
  step = jax.jit(
    train.make_train_step(
      logits_fn, opt.tx, pad_id=-1, learning_rate=opt.learning_rate, optimizer_stats=opt.stats
    ),
    donate_argnums=0,
  )
  return step, state


def bench(name: str):
  batch_size, seq_len = _DEFAULTS[name]
  batch_size, seq_len = _BATCH.value or batch_size, _SEQ.value or seq_len
  dtype = train.resolve_dtype('auto')
  cfg = models.model_config(
    name, dtype=dtype, max_len=max(seq_len, 8), attention_impl=_ATTENTION.value
  )
  model = models.Decoder(cfg)
  tokens = jnp.asarray(
    np.random.default_rng(0).integers(0, min(cfg.vocab_size, 256), (batch_size, seq_len + 1)),
    jnp.int32,
  )

  def logits_fn(params, inputs):
    return model.apply({'params': params}, inputs)[0]

  states, calls = {}, {}
  for opt_name in _OPTIMIZERS.value:
    step, states[opt_name] = _make_step(model, opt_name, seq_len, logits_fn)

    def run_step(step=step, opt_name=opt_name):
      states[opt_name], metrics = step(states[opt_name], tokens)
      return metrics['loss']

    calls[opt_name] = run_step
  # A copy: the steps donate their states, parameters included.
  anchor_params = jax.tree.map(jnp.copy, states[_OPTIMIZERS.value[0]].params)
  grad = jax.jit(jax.grad(lambda p, t: train.lm_loss(logits_fn(p, t[:, :-1]), t[:, 1:], -1)[0]))
  calls['fwd+bwd'] = lambda: grad(anchor_params, tokens)

  for call in calls.values():  # compile
    jax.block_until_ready(call())
  times = {k: [] for k in calls}
  for _ in range(_REPEATS.value):
    for key, call in calls.items():
      times[key].append(_timing.seconds_per_call(call, _STEPS.value))
  median = {k: float(np.median(v)) for k, v in times.items()}
  tokens_per_step = batch_size * seq_len
  n_params = models.count_params(anchor_params)
  print(
    f'{name}: {n_params / 1e6:.2f}M params, batch {batch_size}x{seq_len}, {dtype}, '
    f'attention {_ATTENTION.value or "default"}'
  )
  first = _OPTIMIZERS.value[0]
  peak = _peak_tflops()
  for key, t in median.items():
    line = (
      f'  {key:36s} {tokens_per_step / t:10.0f} tok/s  time / fwd+bwd '
      f'{t / median["fwd+bwd"]:.3f}  time / {first} {t / median[first]:.3f}'
    )
    if key != 'fwd+bwd' and jax.default_backend() != 'cpu' and peak:
      flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.d_model * seq_len
      line += f'  MFU {100 * flops_per_token * tokens_per_step / t / (peak * 1e12):.1f}%'
    print(line, flush=True)


def main(argv):
  del argv
  names = _MODELS.value or (['tiny', 'small'] if jax.default_backend() == 'cpu' else ['gpt2s'])
  print(
    f'backend {jax.default_backend()}, device {jax.devices()[0].device_kind}, '
    f'{jax.device_count()} device(s); median of {_REPEATS.value} x {_STEPS.value} steps'
  )
  for name in names:
    bench(name)


if __name__ == '__main__':
  app.run(main)
