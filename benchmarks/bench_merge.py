r"""OTA + FFG merge throughput: in memory vs a bandwidth anchor, and out of core from safetensors.

  python benchmarks/bench_merge.py                                   # CPU-sized (~2 minutes)
  python benchmarks/bench_merge.py --memory_params_m=200 --disk_params_m=1000 --workdir=/big/tmp
  python benchmarks/bench_merge.py --tiny                            # a check that it runs: seconds

One run prints, at the end, the two ratios side by side (targets: exact `ota_ffg` in memory
>= 0.3x the bandwidth anchor; the streaming merge from disk within 2x of one plain read of its
input files, i.e. a ratio >= 0.5). Before timing, every candidate's output is checked against
the others (in memory: bit for bit; from disk: the streamed FFG cutoffs against the in-memory
exact ones, where the model fits in memory), so a fast wrong path cannot pass.

1. In memory: 5 experts, their second moments and a base (bf16 weights, fp32 moments) held as jax
   arrays; OTA with a global FFG mask per expert (density 0.3). Candidates side by side with
   one anchor (interleaved repetitions, median):
   - anchor: one fused, jit'd elementwise op that reads the same bytes (base, 5 experts,
     5 moments) and writes the same output (a moment-weighted average), i.e. memory bandwidth;
   - ffg_mask+ota: the in-memory operators `ffg_mask` (global density: the exact cutoff by a
     two-pass radix select over the saliencies' fp32 bits, then a mask pass) then `ota`;
   - ota_ffg: `ota_ffg`, exact (the same cutoffs, all experts' histograms in one computation
     per radix pass, then one fused pass per tensor that recomputes the masks inline: no mask
     written, the inputs read once by the merge);
   - ota_ffg_sampled: `ota_ffg(quantile='sampled')`, each cutoff from a strided 65k sample;
   - streamed: `merge_streaming` over the same arrays (`TreeReader`): the same two radix
     passes, tensor by tensor, then the fused merge pass.
   GB/s counts the logical bytes (inputs once + output), so the ratio to the anchor is the
   fraction of bandwidth achieved.
2. Out of core: base + 5 experts written as HF-layout safetensors (bf16 model.safetensors, fp32
   export/exp_avg_sq.safetensors), generated tensor by tensor (never a whole model in memory);
   the streaming merge (sharded safetensors output) runs in a child process whose peak RSS
   (VmHWM) is compared to the bytes on disk; its time against a plain sequential read of the
   same files, once with exact FFG cutoffs (3 passes over the inputs: two radix passes, one to
   merge) and once with sampled ones (2). The page cache is warm where the files fit in it
   (they were just written or read).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _timing  # benchmarks/_timing.py, beside this script
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from curvopt import merge

_EXPERTS = flags.DEFINE_integer('experts', 5, 'Experts merged.')
_DENSITY = flags.DEFINE_float('density', 0.3, 'FFG density per expert.')
_MEMORY_M = flags.DEFINE_float('memory_params_m', 16, 'Model size (M params) in memory; 0: skip.')
_DISK_M = flags.DEFINE_float('disk_params_m', 100, 'Model size (M params) on disk; 0: skip.')
_LEAF = flags.DEFINE_float('leaf_params_m', 4, 'M params per tensor (2-D, 1024 columns).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repetitions; the median is reported.')
_TINY = flags.DEFINE_bool(
  'tiny',
  False,
  'A seconds-long check that everything runs and agrees: 0.5M params in memory, 1M on disk, '
  'tensors of 0.1M, one repetition (overrides those flags; the times mean nothing).',
)
_CHECK_DISK_M = flags.DEFINE_float(
  'check_disk_params_m',
  200,
  'Out of core, up to this size (M params): the streamed exact cutoffs are checked against '
  "numpy's k-th largest of all saliencies held in memory.",
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the out-of-core files go (default: /tmp).')
_KEEP = flags.DEFINE_bool('keep', False, 'Keep the generated files.')
_BATCH = flags.DEFINE_integer('batch_bytes', 1 << 28, 'merge_streaming batch_bytes.')
_QUANTILES = flags.DEFINE_list(
  'quantiles',
  ['exact', 'sampled'],
  "Out of core: FFG's global cutoffs timed, exact (2 passes) and/or sampled (1).",
)
_CHILD = flags.DEFINE_string('child_merge', None, 'Internal: run the streaming merge on this dir.')

COLS = 1024


def _sizes():
  """(memory M params, disk M params, M params per tensor, repetitions)."""
  if _TINY.value:
    return 0.5, 1.0, 0.1, 1
  return _MEMORY_M.value, _DISK_M.value, _LEAF.value, _REPEATS.value


def _shapes(params_m, leaf_m):
  per_leaf = max(1, int(leaf_m * 1e6) // COLS)
  total = int(params_m * 1e6)
  shapes, left = {}, total
  for i in range(max(1, -(-total // (per_leaf * COLS)))):
    rows = min(per_leaf, max(1, left // COLS))
    shapes[f'model.layers.{i}.mlp.weight'] = (rows, COLS)
    left -= rows * COLS
  shapes['model.norm.weight'] = (COLS,)
  return shapes


def _leaf(rng, shape, kind, base=None):
  if kind == 'base':
    return rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16)
  if kind == 'expert':
    tau = 0.01 * rng.standard_normal(shape, np.float32)
    return (base.astype(np.float32) + tau).astype(ml_dtypes.bfloat16)
  return (rng.random(shape, np.float32) ** 4 * 1e-6).astype(np.float32)


def _nbytes(shapes, num):
  params = sum(int(np.prod(s)) for s in shapes.values())
  return params * (2 * (num + 1) + 4 * num + 2)  # inputs once + bf16 output


def _assert_same(name, got, want):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(
      np.asarray(g, np.float32),
      np.asarray(w, np.float32),
      err_msg=f'{name} differs at {jax.tree_util.keystr(path)}',
    )


def bench_memory(params_m, leaf_m, num, density, repeats):
  """Prints every candidate against the anchor; returns exact ota_ffg's ratio."""
  shapes = _shapes(params_m, leaf_m)
  rng = np.random.default_rng(0)
  base = {n: jnp.asarray(_leaf(rng, s, 'base')) for n, s in shapes.items()}
  experts = [
    {n: jnp.asarray(_leaf(rng, s, 'expert', np.asarray(base[n]))) for n, s in shapes.items()}
    for _ in range(num)
  ]
  moments = [
    {n: jnp.asarray(_leaf(rng, s, 'moment')) for n, s in shapes.items()} for _ in range(num)
  ]

  @jax.jit
  def anchor(base, experts, moments):
    def one(b, *rest):
      es, vs = rest[:num], rest[num:]
      b32 = b.astype(jnp.float32)
      num_ = sum(v * (e.astype(jnp.float32) - b32) for e, v in zip(es, vs))
      return (b32 + num_ / (sum(vs) + 1e-8)).astype(b.dtype)

    return jax.tree.map(one, base, *experts, *moments)

  def ffg_mask_ota():
    masks = [merge.ffg_mask(base, e, v, density=density) for e, v in zip(experts, moments)]
    return merge.ota(base, experts, moments, masks=masks)

  def ota_ffg(quantile):
    return lambda: merge.ota_ffg(base, experts, moments, density=density, quantile=quantile)

  def streamed():
    writer = merge.MemoryWriter()
    merge.merge_streaming(
      'ota',
      [merge.TreeReader(e) for e in experts],
      writer,
      base=merge.TreeReader(base),
      moments=[merge.TreeReader(v) for v in moments],
      ffg={'density': density},
      prefetch=False,
    )
    return writer.tree()

  fns = {
    'anchor': lambda: anchor(base, experts, moments),
    'ffg_mask+ota': ffg_mask_ota,
    'ota_ffg': ota_ffg('exact'),
    'ota_ffg_sampled': ota_ffg('sampled'),
    'streamed': streamed,
  }
  outs = {k: jax.block_until_ready(fn()) for k, fn in fns.items()}  # compile
  # The exact paths agree bit for bit (the sampled cutoff is another one).
  for k in ('ffg_mask+ota', 'streamed'):
    _assert_same(k, outs[k], outs['ota_ffg'])
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      times[k].append(_timing.seconds_per_call(fn, 1))
  gb = _nbytes(shapes, num) / 1e9
  med = {k: statistics.median(v) for k, v in times.items()}
  print(
    f'[memory] {params_m:g}M params, {num} experts, {gb:.2f} GB logical '
    f'({jax.devices()[0].platform}); outputs of the exact paths equal'
  )
  for k in fns:
    print(
      f'  {k:15s} {med[k]:8.3f} s  {gb / med[k]:7.2f} GB/s  '
      f'ratio to anchor {med["anchor"] / med[k]:.3f}'
    )
  return med['anchor'] / med['ota_ffg']


def _generate(root, shapes, num):
  """Base + experts (+ export/exp_avg_sq) written tensor by tensor."""
  bf16 = {n: jax.ShapeDtypeStruct(s, jnp.bfloat16) for n, s in shapes.items()}
  f32 = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}
  dirs = ['base'] + [f'expert_{t}' for t in range(num)]
  for d in dirs:
    os.makedirs(os.path.join(root, d, 'export'), exist_ok=True)
  writers = [merge.SafetensorsWriter(os.path.join(root, d), bf16) for d in dirs]
  moments = [
    merge.SafetensorsWriter(os.path.join(root, d, 'export'), f32, stem='exp_avg_sq')
    for d in dirs[1:]
  ]
  rng = np.random.default_rng(0)
  for name, shape in shapes.items():
    base = _leaf(rng, shape, 'base')
    writers[0].write(name, base)
    for t in range(num):
      writers[t + 1].write(name, _leaf(rng, shape, 'expert', base))
      moments[t].write(name, _leaf(rng, shape, 'moment'))
  for w in writers + moments:
    w.close()
  return dirs


def _vm_hwm_bytes():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  return -1


def child_merge(root):
  """Runs in a fresh process: the streaming merge, then prints JSON stats."""
  num = len([d for d in os.listdir(root) if d.startswith('expert_')])
  out = os.path.join(root, 'out')
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  start = time.perf_counter()
  base = merge.SafetensorsReader(os.path.join(root, 'base'))
  experts = [merge.SafetensorsReader(os.path.join(root, f'expert_{t}')) for t in range(num)]
  moments = [merge.exp_avg_sq_reader(os.path.join(root, f'expert_{t}')) for t in range(num)]
  specs = {n: base.spec(n) for n in base.names}
  with merge.SafetensorsWriter(out, specs, max_shard_bytes=1 << 30) as writer:
    result = merge.merge_streaming(
      'ota',
      experts,
      writer,
      base=base,
      moments=moments,
      ffg={'density': _DENSITY.value, 'quantile': _QUANTILES.value[0]},
      batch_bytes=_BATCH.value,
    )
  seconds = time.perf_counter() - start
  print(
    json.dumps(
      {
        'seconds': seconds,
        'peak_rss': _vm_hwm_bytes(),
        'bytes_read': result.bytes_read,
        'passes': result.passes,
        'thresholds': list(result.thresholds),
      }
    )
  )


def _sequential_read(files):
  start = time.perf_counter()
  total = 0
  buf = bytearray(64 << 20)
  for path in files:
    with open(path, 'rb', buffering=0) as f:
      while n := f.readinto(buf):
        total += n
  return time.perf_counter() - start, total


def _check_cutoffs(root, num, density, thresholds):
  """The streamed exact cutoffs against numpy's k-th largest of each
  expert's saliencies (computed by `ffg_saliency`, all held in memory)."""
  base = merge.SafetensorsReader(os.path.join(root, 'base'))
  names = base.names
  base = base.read(names)
  for t in range(num):
    expert = merge.SafetensorsReader(os.path.join(root, f'expert_{t}')).read(names)
    moment = merge.exp_avg_sq_reader(os.path.join(root, f'expert_{t}')).read(names)
    s = np.concatenate(
      [np.ravel(merge.ffg_saliency(base[n], expert[n], moment[n], name=n)) for n in names]
    )
    s = np.where(s > 0, s, np.float32(0))
    k = 0 if density == 0 else max(1, round(density * s.size))
    want = np.float32(np.inf) if k == 0 else np.partition(s, s.size - k)[s.size - k]
    if np.float32(thresholds[t]).view(np.int32) != want.view(np.int32):
      raise AssertionError(f'expert {t}: streamed cutoff {thresholds[t]!r}, numpy {want!r}')


def bench_disk(params_m, leaf_m, num, repeats):
  """Prints the streaming merge against a plain read of its input files;
  returns {quantile: (ratio to one read, passes)}."""
  shapes = _shapes(params_m, leaf_m)
  root = tempfile.mkdtemp(prefix='bench_merge_', dir=_WORKDIR.value)
  try:
    start = time.perf_counter()
    dirs = _generate(root, shapes, num)
    gen_s = time.perf_counter() - start
    files = [os.path.join(root, dirs[0], 'model.safetensors')]
    for d in dirs[1:]:
      files += [
        os.path.join(root, d, 'model.safetensors'),
        os.path.join(root, d, 'export', 'exp_avg_sq.safetensors'),
      ]
    disk = sum(os.path.getsize(f) for f in files)
    print(
      f'[disk] {params_m:g}M params, {num} experts: {disk / 1e9:.2f} GB of inputs '
      f'generated in {gen_s:.0f} s'
    )
    reads, merges = [], {q: [] for q in _QUANTILES.value}
    for _ in range(repeats):
      reads.append(_sequential_read(files)[0])
      for quantile in _QUANTILES.value:
        child = subprocess.run(
          [
            sys.executable,
            __file__,
            f'--child_merge={root}',
            f'--density={_DENSITY.value}',
            f'--batch_bytes={_BATCH.value}',
            f'--quantiles={quantile}',
          ],
          capture_output=True,
          text=True,
          check=True,
        )
        merges[quantile].append(json.loads(child.stdout.strip().splitlines()[-1]))
    if 'exact' in merges and params_m <= _CHECK_DISK_M.value:
      _check_cutoffs(root, num, _DENSITY.value, merges['exact'][0]['thresholds'])
      print("  streamed exact cutoffs equal numpy's k-th largest saliency of each expert")
    read_s = statistics.median(reads)
    print(f'  sequential read  {read_s:8.2f} s  {disk / read_s / 1e9:6.2f} GB/s')
    ratios = {}
    for quantile, runs in merges.items():
      merge_s = statistics.median(m['seconds'] for m in runs)
      rss = max(m['peak_rss'] for m in runs)
      passes = runs[0]['passes']
      ratios[quantile] = (read_s / merge_s, passes)
      print(
        f'  streaming merge, {quantile} cutoffs  {merge_s:8.2f} s  '
        f'{disk / merge_s / 1e9:6.2f} GB/s of inputs ({passes} passes: '
        f'{runs[0]["bytes_read"] / merge_s / 1e9:.2f} GB/s read), ratio to the read '
        f'{read_s / merge_s:.3f} (to {passes} reads {passes * read_s / merge_s:.3f}); '
        f'peak RSS {rss / 1e9:.2f} GB = {rss / disk:.3f} x the bytes on disk '
        f'(batch_bytes {_BATCH.value / 2**20:.0f} MiB)'
      )
    return ratios
  finally:
    if not _KEEP.value:
      shutil.rmtree(root, ignore_errors=True)


def main(argv):
  del argv
  if _CHILD.value:
    child_merge(_CHILD.value)
    return
  memory_m, disk_m, leaf_m, repeats = _sizes()
  memory = disk = None
  if memory_m > 0:
    memory = bench_memory(memory_m, leaf_m, _EXPERTS.value, _DENSITY.value, repeats)
  if disk_m > 0:
    disk = bench_disk(disk_m, leaf_m, _EXPERTS.value, repeats)
  print('[summary] candidate / anchor, as a ratio of speeds (1.0: as fast as the anchor)')
  if memory is not None:
    print(
      f'  exact ota_ffg in memory ({memory_m:g}M params)   {memory:.3f} x the bandwidth '
      'anchor (target >= 0.3)'
    )
  if disk is not None and 'exact' in disk:
    ratio, passes = disk['exact']
    print(
      f'  streaming merge from disk ({disk_m:g}M params, exact cutoffs, {passes} passes)   '
      f'{ratio:.3f} x one read of its input files (target >= 0.5: within 2x)'
    )


if __name__ == '__main__':
  app.run(main)
