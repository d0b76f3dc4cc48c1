r"""Update-only benchmark of the optimizers on GPT-2-small shapes.

Times one optimizer update (no model) for optax.adamw, optax.contrib.muon
(consistent_rms=0.2, embeddings/head/vectors on AdamW, as D-Muon), curvopt
dmuon and curvopt lanton (plus cheaper noise-estimate variants), side by side
in one process: repetitions are interleaved and the median is reported. Also
prints optimizer-state bytes per parameter, the fused kernels in each compiled
update (a proxy for kernel launches on a GPU) and, in a subprocess on a fake
8-device CPU mesh, the collectives XLA emits for one update of FSDP-sharded
matrices and the MiB they return: optax's per-matrix Newton-Schulz (before)
against curvopt's same-shape batching and layout strategies (after).

  python benchmarks/bench_optim.py                 # 12 layers, 3 repetitions
  python benchmarks/bench_optim.py --quick         # 2 layers, 2 repetitions
  python benchmarks/bench_optim.py --nocollectives --reps=5
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

from curvopt import optim

_LAYERS = flags.DEFINE_integer('layers', 12, 'Transformer blocks.')
_D_MODEL = flags.DEFINE_integer('d_model', 768, 'Model width.')
_D_FF = flags.DEFINE_integer('d_ff', 2048, 'SwiGLU width (gate/up/down).')
_VOCAB = flags.DEFINE_integer('vocab', 50304, 'Vocabulary (untied head).')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed repetitions per optimizer.')
_QUICK = flags.DEFINE_bool('quick', False, '2 layers, 2 repetitions.')
_VARIANTS = flags.DEFINE_list(
  'variants',
  ['adamw', 'optax_muon', 'dmuon', 'lanton', 'lanton_ns2', 'lanton_every4', 'lanton_every4_ns4'],
  'Optimizers to time.',
)
_NS_DTYPE = flags.DEFINE_string('ns_dtype', 'auto', 'curvopt NewtonSchulz dtype.')
_COLLECTIVES = flags.DEFINE_bool('collectives', True, 'Count collectives on a fake 8-device mesh.')
_COLLECTIVES_ONLY = flags.DEFINE_bool(
  'collectives_only', False, 'Internal: the subprocess that counts them.'
)
_COLLECTIVE_LAYERS = flags.DEFINE_integer(
  'collective_layers', 1, 'Blocks in the collectives check.'
)

LR = 0.02
_KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_HLO_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  'bf16': 2,
  'f16': 2,
  's16': 2,
  'u16': 2,
  'f32': 4,
  's32': 4,
  'u32': 4,
  'f64': 8,
  's64': 8,
  'u64': 8,
}
# Synchronous ops, and of async pairs only the -done (its result is the output alone; a -start's
# tuple also holds the operand).
_COLLECTIVE = re.compile(r'\s(' + '|'.join(_KINDS) + r')(?:-done)?\(')


def gpt2_shapes(layers, d, d_ff, vocab):
  """The reference decoder's tree: Flax [d_in, d_out] kernels, untied head."""
  shapes = {
    'embed': {'embedding': (vocab, d)},
    'head': {'kernel': (d, vocab)},
    'final_norm': {'scale': (d,)},
  }
  for i in range(layers):
    shapes[f'layers_{i}'] = {
      'attn': {n: {'kernel': (d, d)} for n in 'qkvo'},
      'mlp': {
        'gate': {'kernel': (d, d_ff)},
        'up': {'kernel': (d, d_ff)},
        'down': {'kernel': (d_ff, d)},
      },
      'attn_norm': {'scale': (d,)},
      'mlp_norm': {'scale': (d,)},
    }
  return shapes


def make_tree(shapes, seed, scale=0.02):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(scale * rng.standard_normal(s, np.float32)),
    shapes,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def optax_muon_dims(params):
  """optax muon on hidden matrices only; None = AdamW (D-Muon's grouping)."""
  labels = optim.param_groups(params)
  return jax.tree.map(lambda label: MuonDimensionNumbers() if label == 'hidden' else None, labels)


# LANTON with cheaper noise estimates: refreshed every k-th step, fewer Newton-Schulz steps.
_LANTON_VARIANTS = {
  'lanton': {},
  'lanton_ns2': {'noise_ns_steps': 2},
  'lanton_every4': {'noise_every': 4},
  'lanton_every8': {'noise_every': 8},
  'lanton_every4_ns2': {'noise_every': 4, 'noise_ns_steps': 2},
  'lanton_every4_ns4': {'noise_every': 4, 'noise_ns_steps': 4},
}
_NAMES = ('adamw', 'optax_muon', 'dmuon', 'dmuon_fp32', *_LANTON_VARIANTS)
_FP32 = optim.NewtonSchulz(dtype='float32')


def _fp32(sharding):
  return _FP32._replace(sharding=sharding)


def make_optimizer(name, params, ns_dtype):
  if name == 'adamw':
    return optax.adamw(LR, b2=0.95, weight_decay=0.1)
  if name == 'optax_muon':
    return optax.contrib.muon(
      LR,
      weight_decay=0.1,
      adam_weight_decay=0.1,
      adam_b2=0.95,
      consistent_rms=0.2,
      muon_weight_dimension_numbers=optax_muon_dims(params),
    )
  if name == 'dmuon':
    return optim.dmuon(LR, newton_schulz=optim.NewtonSchulz(dtype=ns_dtype))
  if name == 'dmuon_fp32':  # the same-shape batching alone, without bf16 Newton-Schulz
    return optim.dmuon(LR, newton_schulz=_FP32)
  if name in _LANTON_VARIANTS:
    return optim.lanton(
      LR, newton_schulz=optim.NewtonSchulz(dtype=ns_dtype), **_LANTON_VARIANTS[name]
    )
  raise ValueError(f'unknown optimizer {name!r}; valid: {sorted(_NAMES)}')


def state_bytes(opt, params):
  abstract = jax.eval_shape(opt.init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def time_updates(names, layers, reps, ns_dtype):
  """Median and mean seconds per update, interleaving the optimizers."""
  shapes = gpt2_shapes(layers, _D_MODEL.value, _D_FF.value, _VOCAB.value)
  params = make_tree(shapes, 0)
  grads = make_tree(shapes, 1, scale=1.0)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  runs = {}
  for name in names:
    opt = make_optimizer(name, params, ns_dtype)
    start = time.perf_counter()
    state = opt.init(params)
    update = jax.jit(opt.update, donate_argnums=(1,)).lower(grads, state, params).compile()
    for _ in range(2):  # two steps: from the second, LANTON samples noise
      _, state = update(grads, state, params)
    jax.block_until_ready(state)
    runs[name] = dict(
      update=update,
      state=state,
      times=[],
      warmup_s=time.perf_counter() - start,
      bytes_per_param=state_bytes(opt, params) / n_params,
      fusions=count_fusions(update.as_text()),
      temp_mib=temp_mib(update),
    )
  for _ in range(reps):
    for name in names:
      run = runs[name]
      start = time.perf_counter()
      out, run['state'] = run['update'](grads, run['state'], params)
      jax.block_until_ready((out, run['state']))
      run['times'].append(time.perf_counter() - start)
      del out
  return n_params, {
    name: dict(
      median_s=statistics.median(r['times']),
      mean_s=statistics.fmean(r['times']),
      times=r['times'],
      warmup_s=r['warmup_s'],
      bytes_per_param=r['bytes_per_param'],
      fusions=r['fusions'],
      temp_mib=r['temp_mib'],
    )
    for name, r in runs.items()
  }


def temp_mib(compiled):
  """Scratch memory XLA allocates for one update (NaN where it does not say)."""
  analysis = compiled.memory_analysis()
  size = getattr(analysis, 'temp_size_in_bytes', None) if analysis else None
  return math.nan if size is None else size / 2**20


def count_fusions(text):
  """Fused kernels in a compiled program (each a launch on a GPU)."""
  return sum(1 for line in text.splitlines() if ' fusion(' in line and 'calls=' in line)


def count_collectives(text):
  """{kind: count} of collectives, and 'MiB': the data they return, summed."""
  counts = {}
  mib = 0.0
  for line in text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      counts[m.group(1)] = counts.get(m.group(1), 0) + 1
      result_type = line[line.index('=') + 1 : m.start()]
      for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', result_type):
        size = int(np.prod([int(d) for d in dims.split(',') if d]))
        mib += size * _HLO_BYTES[dtype] / 2**20
  if counts:
    counts['MiB'] = round(mib, 1)
  return counts


def collectives_report(layers):
  """Collectives in one compiled update on the fake 8-device mesh."""
  d, d_ff = _D_MODEL.value, _D_FF.value
  cases = {
    'one [768, 3072] matrix': {'layers_0': {'mlp': {'up': {'kernel': (d, 4 * d)}}}},
    f'{layers} block(s), 7 matrices each': {
      f'layers_{i}': {
        'attn': {n: {'kernel': (d, d)} for n in 'qkvo'},
        'mlp': {
          'gate': {'kernel': (d, d_ff)},
          'up': {'kernel': (d, d_ff)},
          'down': {'kernel': (d_ff, d)},
        },
      }
      for i in range(layers)
    },
  }
  setups = [
    (
      'optax_muon (per matrix)',
      AxisType.Auto,
      lambda p: optax.contrib.muon(LR, consistent_rms=0.2),
    ),
    (
      'dmuon ns_sharding=none',
      AxisType.Auto,
      lambda p: optim.dmuon(LR, newton_schulz=_fp32('none')),
    ),
    (
      'dmuon ns_sharding=replicated',
      AxisType.Auto,
      lambda p: optim.dmuon(LR, newton_schulz=_fp32('replicated')),
    ),
    (
      'dmuon ns_sharding=batch',
      AxisType.Auto,
      lambda p: optim.dmuon(LR, newton_schulz=_fp32('batch')),
    ),
    ('lanton ns_sharding=batch', AxisType.Auto, lambda p: optim.lanton(LR, newton_schulz=_FP32)),
    (
      'dmuon ns_sharding=replicated [explicit axes]',
      AxisType.Explicit,
      lambda p: optim.dmuon(LR, newton_schulz=_fp32('replicated')),
    ),
    (
      'dmuon ns_sharding=batch [explicit axes]',
      AxisType.Explicit,
      lambda p: optim.dmuon(LR, newton_schulz=_fp32('batch')),
    ),
    (
      'lanton ns_sharding=batch [explicit axes]',
      AxisType.Explicit,
      lambda p: optim.lanton(LR, newton_schulz=_FP32),
    ),
  ]
  report = {}
  for case, shapes in cases.items():
    for label, axis_type, make in setups:
      mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(axis_type,) * 2)
      # FSDP: each matrix's first axis over 'fsdp', replicated over 'data'.
      to_mesh = lambda t, mesh=mesh: jax.tree.map(  # noqa: E731
        lambda x: jax.device_put(x, NamedSharding(mesh, P('fsdp'))), t
      )
      params = to_mesh(make_tree(shapes, 0))
      grads = to_mesh(make_tree(shapes, 1))
      opt = make(params)
      try:
        state = opt.init(params)
        text = jax.jit(opt.update).lower(grads, state, params).compile().as_text()
        report[f'{case} | {label}'] = count_collectives(text)
      except Exception as e:  # pylint: disable=broad-except
        report[f'{case} | {label}'] = {'error': f'{type(e).__name__}: {str(e)[:120]}'}
  return report


def run_collectives_subprocess(layers):
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    '--collectives_only',
    f'--collective_layers={layers}',
    f'--d_model={_D_MODEL.value}',
    f'--d_ff={_D_FF.value}',
  ]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _COLLECTIVES_ONLY.value:
    print(json.dumps(collectives_report(_COLLECTIVE_LAYERS.value)))
    return
  layers = 2 if _QUICK.value else _LAYERS.value
  reps = 2 if _QUICK.value else _REPS.value
  names = _VARIANTS.value
  print(
    f'backend={jax.default_backend()} devices={jax.device_count()} '
    f'layers={layers} d_model={_D_MODEL.value} d_ff={_D_FF.value} '
    f'vocab={_VOCAB.value} reps={reps} ns_dtype={_NS_DTYPE.value}'
  )
  n_params, results = time_updates(names, layers, reps, _NS_DTYPE.value)
  print(f'parameters: {n_params / 1e6:.1f}M')
  base = results.get('optax_muon', {}).get('median_s')
  dmuon_s = results.get('dmuon', {}).get('median_s')
  print(
    f'{"optimizer":<18}{"median ms":>11}{"mean ms":>10}{"/muon":>8}'
    f'{"/dmuon":>8}{"state B/param":>15}{"compile+2 s":>13}{"fusions":>9}'
    f'{"temp MiB":>10}'
  )
  for name, r in results.items():
    ratio = f'{r["median_s"] / base:8.2f}' if base else f'{"-":>8}'
    vs_dmuon = f'{r["median_s"] / dmuon_s:8.2f}' if dmuon_s else f'{"-":>8}'
    print(
      f'{name:<18}{1e3 * r["median_s"]:11.1f}{1e3 * r["mean_s"]:10.1f}'
      f'{ratio}{vs_dmuon}{r["bytes_per_param"]:15.2f}'
      f'{r["warmup_s"]:13.1f}{r["fusions"]:9d}{r["temp_mib"]:10.1f}'
    )
  if base and dmuon_s:
    cpu = jax.default_backend() == 'cpu'
    print(
      f'targets ({"CPU" if cpu else "accelerator"}): dmuon/optax_muon = '
      f'{dmuon_s / base:.2f} (<= {1.0 if cpu else 0.25}); '
      + ', '.join(
        f'{n}/dmuon = {results[n]["median_s"] / dmuon_s:.2f}'
        for n in results
        if n.startswith('lanton')
      )
      + ' (<= 1.25)'
    )
  if _COLLECTIVES.value:
    layers_c = 1 if _QUICK.value else _COLLECTIVE_LAYERS.value
    print(
      '\ncollectives in one compiled update, FSDP-sharded matrices on a '
      'fake 8-device mesh (2 data x 4 fsdp):'
    )
    for key, counts in run_collectives_subprocess(layers_c).items():
      total = sum(v for k, v in counts.items() if k in _KINDS)
      print(f'  {key:<70} total={total:<4} {counts}')


if __name__ == '__main__':
  app.run(main)
