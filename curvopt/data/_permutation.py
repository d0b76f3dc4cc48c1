"""A seeded permutation of range(n) evaluated one index at a time, in O(1) memory.

A materialized permutation of a source with hundreds of millions of records would cost
gigabytes per epoch; a keyed Feistel network with cycle walking maps any index to its
shuffled position directly. It uses only integer arithmetic and blake2b, so every process
and machine computes the same order (no numpy stream, hash seed or dict order involved).
"""

import hashlib

_MASK64 = (1 << 64) - 1
_NUM_ROUNDS = 6
# Rows of a batch sit in at most a couple of neighbouring epochs at once.
_MAX_CACHED_EPOCHS = 8


def _mix64(x: int) -> int:
  """splitmix64's finalizer: a cheap 64-bit mixing function with full avalanche."""
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


class IndexPermutation:
  """`perm(epoch, i)`: where position i of `epoch` points into range(n); a new order per epoch."""

  def __init__(self, n: int, *, seed: int):
    if not isinstance(n, int) or n < 1:
      raise ValueError(f'IndexPermutation needs n >= 1, got {n!r}')
    if not isinstance(seed, int):
      raise TypeError(f'seed must be an int, got {type(seed).__name__}: {seed!r}')
    self.n = n
    self.seed = seed
    # Smallest even bit width covering n: the walk below then needs < 4 steps on average.
    self._half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    self._half_mask = (1 << self._half_bits) - 1
    self._keys_by_epoch = {}

  def _round_keys(self, epoch: int) -> tuple[int, ...]:
    keys = self._keys_by_epoch.get(epoch)
    if keys is None:
      digest = hashlib.blake2b(
        f'curvopt.IndexPermutation:{self.seed}:{epoch}'.encode(), digest_size=8 * _NUM_ROUNDS
      ).digest()
      keys = tuple(int.from_bytes(digest[8 * r : 8 * r + 8], 'little') for r in range(_NUM_ROUNDS))
      if len(self._keys_by_epoch) >= _MAX_CACHED_EPOCHS:
        self._keys_by_epoch.clear()
      self._keys_by_epoch[epoch] = keys
    return keys

  def _feistel(self, x: int, keys: tuple[int, ...]) -> int:
    left, right = x >> self._half_bits, x & self._half_mask
    for key in keys:
      left, right = right, left ^ (_mix64(right ^ key) & self._half_mask)
    return (left << self._half_bits) | right

  def __call__(self, epoch: int, i: int) -> int:
    if not 0 <= i < self.n:
      raise ValueError(f'index {i} outside [0, {self.n})')
    keys = self._round_keys(epoch)
    # The Feistel network permutes [0, 4**half_bits) ⊇ [0, n); following the cycle until
    # it re-enters [0, n) restricts it to a permutation of [0, n).
    y = self._feistel(i, keys)
    while y >= self.n:
      y = self._feistel(y, keys)
    return y
