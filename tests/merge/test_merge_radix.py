"""The exact global FFG cutoff (a two-pass radix select over fp32 bit patterns)
equals numpy's k-th largest bit for bit: in memory, on sharded leaves, and
streamed tensor by tensor."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from curvopt import merge
from curvopt.merge import _ffg
from curvopt.merge import _radix

INF_BITS = 0x7F800000


def _canonical(x):
  """fp32 values with NaN, negative values and -0.0 as +0.0, by their bits
  (numpy keeps denormals)."""
  x = np.ravel(np.asarray(x, np.float32))
  bits = x.view(np.int32)
  return np.where((bits > 0) & (bits <= INF_BITS), x, np.float32(0))


def _num_kept(density, n):
  return 0 if density == 0 else min(n, max(1, round(density * n)))


def _kth_largest(leaves, k):
  """The reference: numpy's partition of all entries (+inf for k = 0)."""
  values = np.concatenate([_canonical(x) for x in leaves])
  if k == 0:
    return np.float32(np.inf)
  return np.partition(values, values.size - k)[values.size - k]


def _bits(x):
  return int(np.float32(x).view(np.int32))


def _from_bits(bits):
  return np.asarray(bits, np.int32).view(np.float32)


# name -> rng -> leaves (numpy fp32 arrays)
CASES = {
  'all_equal': lambda rng: [np.full((40, 50), 0.25, np.float32)],
  'all_zero': lambda rng: [np.float32([0.0, -0.0, np.nan, -1.0] * 50).reshape(20, 10)],
  'ties_at_cutoff': lambda rng: [
    rng.choice(np.float32([1.0, 2.0, 3.0]), p=[0.3, 0.4, 0.3], size=(64, 64)).astype(np.float32),
    np.full(100, 2.0, np.float32),
  ],
  # Consecutive bit patterns, shuffled: only the last bits tell them apart.
  'last_bit': lambda rng: [
    _from_bits(_bits(1.0) + rng.permutation(3000)).reshape(30, 100),
  ],
  # One stage-0 bin holds every value: stage 1 alone orders them.
  'one_top_bin': lambda rng: [_from_bits(_bits(1.0) + rng.integers(0, 1 << 15, size=5000))],
  # Patterns on both sides of a stage-0 bin boundary, with repeats.
  'bin_boundary': lambda rng: [_from_bits(_bits(2.0) + rng.integers(-300, 300, size=(50, 40)))],
  'specials': lambda rng: [
    np.float32(
      [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, -2.0, 1e-45, 3e-45, 1e-40, 1.1754942e-38]
      + [1.1754944e-38, 3.4028235e38, 1.0, 1.0, 7.0]
    ),
    np.float32([1e-45, 0.0, np.inf, 5.0]),
  ],
  # Denormals up to huge values, over every exponent.
  'wide': lambda rng: [(10.0 ** rng.uniform(-44, 38, size=(70, 90))).astype(np.float32)],
  'huge_leaf': lambda rng: [
    (rng.random(1 << 19, np.float32) ** 4 * rng.standard_normal(1 << 19) ** 2).astype(np.float32),
    np.float32([3.0]),
  ],
  'tiny_leaves': lambda rng: [
    rng.random(int(rng.integers(1, 5)), np.float32) ** 3 for _ in range(60)
  ],
}
DENSITIES = (0.0, 1e-9, 0.01, 0.3, 0.5, 0.999, 1.0)


@pytest.mark.parametrize('case', sorted(CASES))
def test_ffg_threshold_equals_numpy_bit_for_bit(case):
  leaves = CASES[case](np.random.default_rng(0))
  n = sum(x.size for x in leaves)
  device = [jnp.asarray(x) for x in leaves]
  for density in DENSITIES:
    got = merge.ffg_threshold(device, density=density)
    want = _kth_largest(leaves, _num_kept(density, n))
    assert _bits(got) == _bits(want), (density, got, want)


def test_every_k_of_a_small_set():
  """k from 0 (+inf) to n, all at once: each k is its own search."""
  leaves = [
    np.float32([3.0, 3.0, 0.0, -0.0, np.nan, 1e-45, 1e-40, 2.0, 2.0, 2.0, np.inf, -5.0]),
    np.float32([2.0, 1.0000001, 1.0, 1.0, 3.0000002, 1e-45, 0.5]).reshape(7, 1),
  ]
  n = sum(x.size for x in leaves)

  @functools.partial(jax.jit, static_argnames='stage')
  def count(prefixes, stage):
    def one(prefix):
      return _radix.histograms(
        [_radix.bin_index(x, prefix, stage=stage) for x in leaves], stage=stage
      )

    return jax.vmap(one)(prefixes)

  got = _radix.kth_largest(lambda p, stage: count(p, stage), range(n + 1), [n] * (n + 1))
  want = np.concatenate([[np.inf], np.sort(np.concatenate([_canonical(x) for x in leaves]))[::-1]])
  np.testing.assert_array_equal(got.view(np.int32), want.astype(np.float32).view(np.int32))


def _problem(rng, shapes, num):
  base = {k: rng.normal(size=s).astype(jnp.bfloat16) for k, s in shapes.items()}
  experts = [
    {
      k: (b.astype(np.float32) + 0.01 * rng.normal(size=b.shape)).astype(jnp.bfloat16)
      for k, b in base.items()
    }
    for _ in range(num)
  ]
  moments = [
    {k: (rng.random(s, np.float32) ** 4).astype(np.float32) for k, s in shapes.items()}
    for _ in range(num)
  ]
  return base, experts, moments


def _saliencies(base, expert, moment):
  """Each leaf's saliency as the library computes it (XLA's fp32 rounding)."""
  return [np.asarray(merge.ffg_saliency(base[k], expert[k], moment[k])) for k in base]


def test_ota_ffg_cutoffs_equal_numpy():
  """All experts' cutoffs come from one histogram computation per stage."""
  rng = np.random.default_rng(1)
  shapes = {'a': (64, 96), 'b': (96,), 'c': (3, 5, 7)}
  base, experts, moments = _problem(rng, shapes, 3)
  densities = [1e-9, 0.3, 1.0]
  got = _ffg.exact_cutoffs(
    [jnp.asarray(base[k]) for k in shapes],
    tuple(tuple(jnp.asarray(e[k]) for k in shapes) for e in experts),
    tuple(tuple(jnp.asarray(v[k]) for k in shapes) for v in moments),
    densities,
    score='fisher',
  )
  n = sum(int(np.prod(s)) for s in shapes.values())
  for t, density in enumerate(densities):
    want = _kth_largest(_saliencies(base, experts[t], moments[t]), _num_kept(density, n))
    assert _bits(got[t]) == _bits(want), t


def test_long_leaves_and_many_leaves_split_into_int32_rows(monkeypatch):
  """Rows of at most MAX_ROW entries (2^31 - 1, here 1000): a longer leaf
  splits, and leaves share a row until it would overflow. Shapes unlike any
  other test's, so the patched constant is traced."""
  monkeypatch.setattr(_radix, 'MAX_ROW', 1000)
  rng = np.random.default_rng(2)
  leaves = [
    (rng.random((3, 1201), np.float32) ** 2).astype(np.float32),
    rng.random(401, np.float32),
    rng.random(702, np.float32),
    np.full(97, 0.5, np.float32),
  ]
  device = [jnp.asarray(x) for x in leaves]
  rows = _ffg._value_histograms(device, np.zeros(1, np.int32), stage=0)
  assert rows.shape[1] == 4 + 2  # 3603 entries in 4 rows; 401 | 702 + 97
  n = sum(x.size for x in leaves)
  for density in DENSITIES:
    got = merge.ffg_threshold(device, density=density)
    assert _bits(got) == _bits(_kth_largest(leaves, _num_kept(density, n))), density


@pytest.mark.parametrize('axes', ['explicit', 'auto'])
@pytest.mark.parametrize('max_row', [None, 100])
def test_sharded_leaves_equal_numpy(axes, max_row, mesh8, monkeypatch):
  """Leaves sharded over the fake 8-device mesh: each shard counts its own
  entries (Explicit axes: shard_map and psum; a leaf beyond MAX_ROW: rows
  per shard)."""
  if max_row is not None:
    monkeypatch.setattr(_radix, 'MAX_ROW', max_row)
  mesh = mesh8 if axes == 'explicit' else jax.sharding.Mesh(mesh8.devices, mesh8.axis_names)
  rng = np.random.default_rng(3)
  shape = (16, 24) if max_row is None else (16, 40)
  leaves = [
    (10.0 ** rng.uniform(-30, 5, size=shape)).astype(np.float32),
    np.float32([2.0, 0.0, 7.0]),
  ]
  leaves[0][rng.random(shape) < 0.3] = 0.0
  device = [
    jax.device_put(leaves[0], NamedSharding(mesh, P('data', 'fsdp'))),
    jax.device_put(leaves[1], NamedSharding(mesh, P())),
  ]
  n = sum(x.size for x in leaves)
  for density in (1e-9, 0.25, 0.5, 0.9, 1.0):
    got = merge.ffg_threshold(device, density=density)
    assert _bits(got) == _bits(_kth_largest(leaves, _num_kept(density, n))), density


@pytest.mark.parametrize('max_row', [None, 1000])
def test_streamed_cutoffs_equal_numpy(max_row, monkeypatch):
  """The streaming merge's cutoffs: two passes, each reading every tensor
  once; with MAX_ROW at 1000 a tensor beyond it counts on the host and the
  device totals drain before they could overflow."""
  if max_row is not None:
    monkeypatch.setattr(_radix, 'MAX_ROW', max_row)
  rng = np.random.default_rng(4)
  shapes = (
    {'embed': (37, 29), 'w': (23, 31), 'v': (20, 20), 'b': (31,)}
    if max_row
    else {'w': (40, 24), 'b': (24,)}
  )
  base, experts, moments = _problem(rng, shapes, 3)
  densities = [0.3, 1e-9, 1.0]
  result = merge.merge_streaming(
    'ota',
    [merge.TreeReader(e) for e in experts],
    merge.MemoryWriter(),
    base=merge.TreeReader(base),
    moments=[merge.TreeReader(v) for v in moments],
    ffg={'density': densities},
    batch_bytes=4000,
  )
  n = sum(int(np.prod(s)) for s in shapes.values())
  # Two passes for the cutoffs and one to merge, each reading every input
  # once: the bf16 base and experts, the fp32 moments.
  assert result.passes == 3
  assert result.bytes_read == 3 * n * (2 + 3 * 2 + 3 * 4)
  for t, density in enumerate(densities):
    want = _kth_largest(_saliencies(base, experts[t], moments[t]), _num_kept(density, n))
    assert _bits(result.thresholds[t]) == _bits(want), t
