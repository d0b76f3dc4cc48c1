"""FFG's global cutoff over saliencies fed leaf by leaf: two passes.

The same two-pass radix select as `ffg_threshold` (`_radix`), with the
leaves handed over one at a time, in any order, once per pass:
- for a density the bins count values (on the device, no host round trip
  per leaf), and the cutoff is exactly `ffg_threshold`'s;
- for a mass the bins weigh the values themselves, summed in float64 on
  the host, so the cutoff equals the in-memory one up to the rounding of
  the fp32 sums `ffg_threshold` compares against (a relative 1e-7 of the
  mass at the boundary).
Memory: one histogram of at most 2^16 bins per expert.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.merge import _options
from curvopt.merge import _radix
from curvopt.merge import _topk


@functools.partial(jax.jit, static_argnames=('stage',))
def _rows(values, prefix, *, stage):
  return _radix.histograms([_radix.bin_index(values, prefix, stage=stage)], stage=stage)


@functools.partial(jax.jit, static_argnames=('stage',), donate_argnums=0)
def _add_rows(totals, values, prefix, *, stage):
  return totals + _rows(values, prefix, stage=stage)


@functools.partial(jax.jit, static_argnames=('stage',))
def _bins_and_values(values, prefix, *, stage):
  """Each value's bin (`_radix.bin_index`) and the value it counts as."""
  bits = _radix.canonical_bits(values)
  return (
    jnp.ravel(_radix.bin_index(values, prefix, stage=stage)),
    jnp.ravel(jax.lax.bitcast_convert_type(bits, jnp.float32)),
  )


class _MassSelect(_radix.Select):
  """`_radix.Select` for a mass target: the bins weigh their values, and
  the weight needed is known once stage 0 has summed them all."""

  def __init__(self, mass: float):  # pylint: disable=super-init-not-called
    # Select's state, less the count bookkeeping: `done` and `value` read only these.
    self.stage = 0
    self.prefix = 0
    self.bits = None
    self._mass = mass
    self._need = 0.0

  def feed(self, sums: np.ndarray) -> None:
    if self.stage == 0:
      self._need = self._mass * float(np.sum(sums))
      if self._need <= 0:
        self.bits = _radix.INF_BITS
        return
    chosen, above = _radix.pick(sums, self._need)
    if self.stage == 0:
      self.stage, self.prefix, self._need = 1, chosen, self._need - float(above)
    else:
      self.bits = (self.prefix << _radix.SHIFT) | chosen


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
    value = float(_options.density(density if kind == 'density' else mass, 1, what=kind)[0])
    total = int(total)
    self.threshold: float | None = None
    self.passes = 0
    if value == 0 or total == 0:
      self.threshold = float('inf')
    elif kind == 'density':
      self._select = _radix.Select(int(_topk.num_kept(value, total)), total)
    else:
      self._select = _MassSelect(value)
    self._reset()

  @property
  def done(self) -> bool:
    return self.threshold is not None

  def _reset(self):
    if self.done:
      return
    size = _radix.bins(self._select.stage)
    if isinstance(self._select, _MassSelect):
      self._sums = np.zeros(size, np.float64)
    else:
      self._counts = _radix.Totals(1, size)

  def add(self, saliency: Any) -> None:
    """Accumulates one leaf's saliencies (>= 0) into this pass."""
    if self.done:
      return
    stage, prefix = self._select.stage, np.int32(self._select.prefix)
    if isinstance(self._select, _MassSelect):
      index, values = jax.device_get(_bins_and_values(saliency, prefix, stage=stage))
      # One extra bin collects the values not counted (zeros, other bins).
      size = self._sums.size
      self._sums += np.bincount(index, weights=values, minlength=size + 1)[:size]
      return
    entries = int(np.size(saliency))
    if entries > _radix.MAX_ROW:
      self._counts.add_host(0, _rows(saliency, prefix, stage=stage))
    else:
      device = _add_rows(self._counts.device(entries), saliency, prefix, stage=stage)
      self._counts.update(device)

  def end_pass(self) -> None:
    """Narrows the cutoff to a bin (pass 1) or to a value (pass 2)."""
    if self.done:
      return
    self.passes += 1
    weights = self._sums if isinstance(self._select, _MassSelect) else self._counts.result()[0]
    self._select.feed(weights)
    if self._select.done:
      self.threshold = float(self._select.value)
    self._reset()
