"""The exact k-th largest of non-negative fp32 values: a two-pass radix select.

Values in [0, inf] order like their fp32 bit patterns read as int32, so the
k-th largest of N values (over any number of leaves) comes from two
histograms of those bits, each counting every value once:
- stage 0 counts the top 16 of the 31 magnitude bits (bits 30..15: the
  exponent and 7 mantissa bits, 2^16 bins). Summed over all leaves, the
  cumulative count from the top bin down names the bin that holds the k-th
  largest, and how many of that bin's values are still needed;
- stage 1 counts the low 15 bits (2^15 bins) of the values inside that bin.
  Its bin is the answer's exact bit pattern.
16 + 15 bits: two passes whatever the values (ties, all equal, one huge
leaf or many tiny ones), where a bisection over the bit patterns counts 31
times (~20 from a sampled bracket). 2^11 bins would need three passes; 2^16
int32 bins are 256 KB, small beside the leaves, and a bin count is one
scatter-add per value: bandwidth-bound on a GPU, ~2 counting passes on
XLA's CPU. Every value is read once per pass, so leaves may be sharded
(each shard counts its own values, `psum` adds them up) or streamed from
disk tensor by tensor (`Totals` adds the histograms up across calls).

Conventions: NaN, negative values and -0.0 count as +0.0 (FFG saliencies
are >= 0; a NaN never passes s >= t). Denormals keep their bits (integer
histograms do not flush them to zero as XLA CPU's float compares do), so
the answer equals a sort's k-th largest bit for bit; k = 0 gives +inf.
Zeros are not scattered (dropped as out of range): they are the bulk of a
sparse task vector's saliencies, one hot bin for a GPU's atomics, and their
count is known on the host (the entries minus those counted). An int32
histogram counts at most 2^31 - 1 entries exactly; leaves are grouped (and
a longer one split) so that no histogram row counts more, and rows add up
on the host in int64.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from curvopt.merge import _topk

INF_BITS = 0x7F800000
SHIFT = 15
HI_BINS = 1 << 16  # stage 0: bits 30..15
LO_BINS = 1 << SHIFT  # stage 1: bits 14..0
MAX_ROW = (1 << 31) - 1  # entries one int32 histogram row counts exactly


def bins(stage: int) -> int:
  return HI_BINS if stage == 0 else LO_BINS


def canonical_bits(values):
  """int32 bit patterns of `values` as fp32, in [0, INF_BITS]: NaN,
  negative values and -0.0 map to 0 (+0.0). Integer ops only, so denormals
  survive on backends that flush them in float arithmetic."""
  bits = jax.lax.bitcast_convert_type(jnp.asarray(values).astype(jnp.float32), jnp.int32)
  return jnp.where((bits > 0) & (bits <= INF_BITS), bits, 0)


def bin_index(values, prefix, *, stage: int):
  """Each value's bin in `stage`; `bins(stage)` (out of range, not counted)
  for zeros and, in stage 1, for values outside the stage-0 bin `prefix`."""
  bits = canonical_bits(values)
  if stage == 0:
    index = bits >> SHIFT
  else:
    index = jnp.where((bits >> SHIFT) == prefix, bits & (LO_BINS - 1), LO_BINS)
  return jnp.where(bits == 0, bins(stage), index)


def _count_into(hist, index):
  return hist.at[jnp.ravel(index)].add(1, mode='drop')


def _rows(index, size):
  """[r, size] histograms of an unsharded index array, each row counting
  at most MAX_ROW entries (r = 1 below that)."""
  flat = jnp.ravel(index)
  return jnp.stack(
    [
      _count_into(jnp.zeros(size, jnp.int32), flat[start : start + MAX_ROW])
      for start in range(0, max(flat.size, 1), MAX_ROW)
    ]
  )


def _sharded_rows(index, size, spec):
  """`_rows` of an index array sharded over Explicit mesh axes (which
  refuse a scatter from a sharded operand): each shard counts its own
  entries; rows add up over the mesh (psum) while they fit a row, else
  come back one set per shard. Replicated either way."""
  axes = tuple(a for entry in spec if entry is not None for a in np.atleast_1d(entry).tolist())
  mesh = jax.typeof(index).sharding.mesh
  shards = int(np.prod([mesh.shape[a] for a in axes]))

  def local(x):
    rows = _rows(x, size)
    if index.size > MAX_ROW:
      # Each shard's rows in its own slot; the psum then only gathers.
      slot = jax.lax.axis_index(axes) * rows.shape[0]
      rows = jax.lax.dynamic_update_slice(
        jnp.zeros((shards * rows.shape[0], size), jnp.int32), rows, (slot, 0)
      )
    return jax.lax.psum(rows, axes)

  return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=P())(index)


def histograms(indices, *, stage: int):
  """[r, bins(stage)] int32 histograms of `bin_index` arrays (traceable).

  Leaves are counted into shared rows while a row's entries stay within
  MAX_ROW (one row below 2^31 entries in all); the rows sum to the
  histogram of all leaves (`Totals`, in int64).
  """
  size = bins(stage)
  rows, row, used = [], None, 0
  for index in indices:
    n = int(np.size(index))
    if n == 0:
      continue
    spec = _topk.explicit_spec(index)
    if n > MAX_ROW:
      rows.append(_rows(index, size) if spec is None else _sharded_rows(index, size, spec))
      continue
    if row is not None and used + n > MAX_ROW:
      rows.append(row[None])
      row, used = None, 0
    if spec is None:
      # Scattered into the running row in place: no per-leaf histogram.
      row = _count_into(jnp.zeros(size, jnp.int32) if row is None else row, index)
    else:
      counts = _sharded_rows(index, size, spec)[0]
      row = counts if row is None else row + counts
    used += n
  if row is not None:
    rows.append(row[None])
  if not rows:
    return jnp.zeros((1, size), jnp.int32)
  return jnp.concatenate(rows) if len(rows) > 1 else rows[0]


def pick(weights: np.ndarray, need):
  """(bin, weight above it): the bin where the weight summed from the top
  bin down first reaches `need` (> 0)."""
  from_top = np.cumsum(weights[::-1])
  hit = int(np.searchsorted(from_top, need, side='left'))
  # Float weights (a mass) may fall short of `need` by rounding.
  hit = min(hit, weights.size - 1)
  return weights.size - 1 - hit, from_top[hit - 1] if hit else weights.dtype.type(0)


class Select:
  """Host side of one search for the k-th largest of `total` values:
  `feed` it the summed stage-0 histogram, then the stage-1 one."""

  def __init__(self, k: int, total: int):
    if not 0 <= k <= total:
      raise ValueError(f'k must be in [0, total={total}], got {k}')
    self.stage = 0
    self.prefix = 0  # the stage-0 bin, once found
    self.bits = INF_BITS if k == 0 else None
    self._need = int(k)
    self._in_bin = int(total)  # values in the bin searched (stage 0: all)

  @property
  def done(self) -> bool:
    return self.bits is not None

  @property
  def value(self) -> np.float32:
    """The k-th largest (+inf for k = 0)."""
    return np.int32(self.bits).view(np.float32)

  def feed(self, counts: np.ndarray) -> None:
    """Narrows to a bin (stage 0), then to the value (stage 1). `counts`:
    the int64 histogram of all values, zeros not counted (`bin_index`)."""
    if self.done:
      return
    counts = np.asarray(counts, np.int64).copy()
    zeros = self._in_bin - int(counts.sum())
    if zeros < 0:
      raise RuntimeError(
        f'stage {self.stage} counted {int(counts.sum())} values in a bin of {self._in_bin}: '
        'the values changed between passes'
      )
    counts[0] += zeros
    chosen, above = pick(counts, self._need)
    if self.stage == 0:
      self.prefix, self._need, self._in_bin = chosen, self._need - int(above), int(counts[chosen])
      self.stage = 1
    else:
      self.bits = (self.prefix << SHIFT) | chosen


class Totals:
  """Exact int64 sums of int32 device histograms [num, bins], added up on
  the device (no host round trip per call) while they cannot overflow."""

  def __init__(self, num: int, size: int):
    self._host = np.zeros((num, size), np.int64)
    self._device = None
    self._used = 0

  def device(self, entries: int):
    """The device accumulator to add histograms of `entries` values to
    (those of one call); pass the sum back with `update`."""
    if self._device is not None and self._used + entries > MAX_ROW:
      self._drain()
    if self._device is None:
      self._device = jnp.zeros(self._host.shape, jnp.int32)
    self._used += entries
    return self._device

  def update(self, device) -> None:
    self._device = device

  def add_host(self, index: int, rows) -> None:
    """Adds [r, bins] rows (each within int32) to search `index`."""
    self._host[index] += np.asarray(jax.device_get(rows), np.int64).sum(axis=0)

  def _drain(self):
    if self._device is not None:
      self._host += np.asarray(jax.device_get(self._device), np.int64)
    self._device, self._used = None, 0

  def result(self) -> np.ndarray:
    self._drain()
    return self._host


def kth_largest(count, ks, totals) -> np.ndarray:
  """The k-th largest of each of several value sets, in two passes.

  Args:
    count: (prefixes, stage) -> [num, r, bins(stage)] int32 histograms
      (`histograms`) of each set's `bin_index`es; prefixes: [num] int32.
    ks: k per set, 0 <= k <= total (0: +inf).
    totals: the number of values per set.

  Returns:
    [num] float32: the k-th largest, bit for bit a sort's (module docstring).
  """
  selects = [Select(int(k), int(n)) for k, n in zip(ks, totals)]
  for stage in (0, 1):
    if all(s.done for s in selects):
      break
    prefixes = np.asarray([s.prefix for s in selects], np.int32)
    hists = np.asarray(jax.device_get(count(prefixes, stage)), np.int64).sum(axis=1)
    for select, hist in zip(selects, hists):
      select.feed(hist)
  return np.asarray([s.value for s in selects], np.float32)
