"""FFG's global cutoff over saliencies streamed leaf by leaf: two passes.

`ffg_threshold` bisects over fp32 bit patterns and needs the saliencies 31
times; streamed from disk that is 31 reads of every expert. Here the same
cutoff comes from a two-pass radix select. The fp32 bit patterns of
non-negative values sort like the values, so
- pass 1 histograms the top 16 bits of every saliency (sign, exponent and 7
  mantissa bits: 2^15 bins) and finds the bin holding the cutoff;
- pass 2 histograms the low 16 bits of the values inside that bin.
The k-th largest value (density) is then exact: the same cutoff that
`ffg_threshold` returns on the same values. For a mass target the bin sums
accumulate in float64 on the host, so the cutoff equals the in-memory one
up to the rounding of the fp32 sums `ffg_threshold` compares against (a
relative 1e-7 of the mass at the boundary).
Memory: two histograms of at most 2^16 bins per expert.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _options
from curvopt.merge import _topk

_HI_BINS = 1 << 15
_LO_BINS = 1 << 16


@functools.partial(jax.jit, static_argnames=('top',))
def _bin_index(values, bin_, *, top):
  """Each value's histogram bin: its top 16 bits (pass 1), or its low 16
  bits inside bin `bin_` and _LO_BINS outside it (pass 2); with the value,
  -0.0 folded into +0.0. Computed where the values live (device, shards)."""
  s = jnp.ravel(values).astype(jnp.float32)
  s = jnp.where(s > 0, s, 0.0)
  bits = jax.lax.bitcast_convert_type(s, jnp.int32)
  if top:
    return bits >> 16, s
  return jnp.where((bits >> 16) == bin_, bits & 0xFFFF, _LO_BINS), s


class StreamedCutoff:
  """One expert's global FFG cutoff, fed its saliency leaves in two passes.

  Usage: `add(s)` for every leaf, `end_pass()`; while `done` is False,
  repeat over the same leaves. Then `threshold` holds the cutoff (+inf:
  keep nothing). Leaves may come in any order and any grouping.
  """

  def __init__(self, *, total: int, density: float | None = None, mass: float | None = None):
    """Args: total: the number of saliency entries over all leaves;
    density / mass: exactly one, in [0, 1] (see `ffg_threshold`)."""
    if (density is None) == (mass is None):
      raise ValueError(
        f'give exactly one of density and mass; got density={density!r}, mass={mass!r}'
      )
    kind = 'density' if density is not None else 'mass'
    self._kind = kind
    self._value = float(_options.density(density if kind == 'density' else mass, 1, what=kind)[0])
    self.threshold: float | None = None
    self._bin: int | None = None
    self._need = 0.0
    self.passes = 0
    if self._value == 0 or total == 0:
      self.threshold = float('inf')
    elif kind == 'density':
      self._need = float(_topk.num_kept(self._value, int(total)))
    self._reset()

  @property
  def done(self) -> bool:
    return self.threshold is not None

  def _reset(self):
    size = _HI_BINS if self._bin is None else _LO_BINS
    self._counts = np.zeros(size, np.int64)
    self._sums = np.zeros(size, np.float64)

  def add(self, saliency: Any) -> None:
    """Accumulates one leaf's saliencies (>= 0) into this pass."""
    if self.done:
      return
    top = self._bin is None
    index, s = _bin_index(saliency, np.int32(self._bin or 0), top=top)
    size = self._counts.size
    # One extra bin collects pass 2's values outside the chosen bin.
    index = np.asarray(index)
    self._counts += np.bincount(index, minlength=size + 1)[:size]
    if self._kind == 'mass':
      self._sums += np.bincount(index, weights=np.asarray(s), minlength=size + 1)[:size]

  def end_pass(self) -> None:
    """Narrows the cutoff to a bin (pass 1) or to a value (pass 2)."""
    if self.done:
      return
    self.passes += 1
    weights = self._counts if self._kind == 'density' else self._sums
    if self._bin is None and self._kind == 'mass':
      self._need = self._value * float(np.sum(self._sums))
      if self._need <= 0:
        self.threshold = float('inf')
        return
    # Cumulative weight from the top bin down; the cutoff's bin is the
    # first where it reaches what is still needed.
    from_top = np.cumsum(weights[::-1])
    hit = int(np.searchsorted(from_top, self._need, side='left'))
    hit = min(hit, weights.size - 1)
    chosen = weights.size - 1 - hit
    if self._bin is None:
      above = float(from_top[hit - 1]) if hit > 0 else 0.0
      self._need -= above
      self._bin = chosen
      self._reset()
      return
    bits = np.int32((self._bin << 16) | chosen)
    self.threshold = float(bits.view(np.float32))
