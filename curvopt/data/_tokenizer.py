"""The tokenizer interface, and the byte-level tokenizer (ids 0..255 are raw UTF-8 bytes, a
few ids above are specials)."""

from collections.abc import Sequence
from typing import Optional, Protocol, runtime_checkable

import numpy as np

# Specials sit right after the 256 byte ids. The unused ones keep the vocabulary at a
# multiple of 8 (shards evenly over the mesh) and leave room for later tasks without
# changing vocab_size, which would invalidate checkpoints.
_SPECIALS = (
  '<pad>',
  '<bos>',
  '<eos>',
  '<sep>',
  '<unused_0>',
  '<unused_1>',
  '<unused_2>',
  '<unused_3>',
)
_NUM_BYTES = 256


@runtime_checkable
class Tokenizer(Protocol):
  """What the batch builders, the samplers and the trainers ask of a tokenizer.

  `ByteTokenizer` (our models) and `HFTokenizer` (a Hugging Face `tokenizer.json`) implement it.
  """

  @property
  def vocab_size(self) -> int:
    """1 + the largest id `encode` can return (a model's vocabulary may be larger)."""

  @property
  def pad_id(self) -> int:
    """Fills rows after their end; never a target of the losses that mask by it."""

  @property
  def bos_id(self) -> Optional[int]:
    """Starts a sequence; None for tokenizers without one (e.g. Qwen2's)."""

  @property
  def eos_id(self) -> int:
    """Ends a document or a completion; the samplers stop at it."""

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """int32 ids of `text`, optionally with BOS before and EOS after."""

  def encode_prompt(self, text: str) -> np.ndarray:
    """int32 ids a model is prompted with: BOS + text, or the text in the chat template."""

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
    """The text of `ids`, special tokens dropped (or written out)."""


class ByteTokenizer:
  """Maps text to UTF-8 byte ids plus special ids (PAD=256, BOS=257, EOS=258, SEP=259)."""

  def __init__(self):
    self._special_names = _SPECIALS

  @property
  def vocab_size(self) -> int:
    return _NUM_BYTES + len(self._special_names)

  @property
  def pad_id(self) -> int:
    return _NUM_BYTES + self._special_names.index('<pad>')

  @property
  def bos_id(self) -> int:
    return _NUM_BYTES + self._special_names.index('<bos>')

  @property
  def eos_id(self) -> int:
    return _NUM_BYTES + self._special_names.index('<eos>')

  @property
  def sep_id(self) -> int:
    return _NUM_BYTES + self._special_names.index('<sep>')

  @property
  def special_ids(self) -> dict[str, int]:
    """Name of every special token (e.g. '<eos>') to its id."""
    return {name: _NUM_BYTES + i for i, name in enumerate(self._special_names)}

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """Returns the int32 ids of `text`'s UTF-8 bytes, optionally wrapped in BOS / EOS."""
    if not isinstance(text, str):
      raise TypeError(f'encode expects a str, got {type(text).__name__}: {text!r:.80}')
    # 'surrogatepass' keeps lone surrogates (legal in a Python str) encodable; decode
    # then replaces them instead of raising.
    ids = np.frombuffer(text.encode('utf-8', errors='surrogatepass'), dtype=np.uint8)
    ids = ids.astype(np.int32)
    if add_bos or add_eos:
      parts = ([np.array([self.bos_id], np.int32)] if add_bos else []) + [ids]
      if add_eos:
        parts.append(np.array([self.eos_id], np.int32))
      ids = np.concatenate(parts)
    return ids

  def encode_prompt(self, text: str) -> np.ndarray:
    """BOS + the ids of `text`: how our models see a prompt in SFT rows and when sampling."""
    return self.encode(text, add_bos=True)

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
    """Returns the text of `ids`; invalid UTF-8 becomes U+FFFD, specials are dropped or named."""
    ids = check_ids(ids, self.vocab_size)
    is_special = ids >= _NUM_BYTES
    if skip_special:
      return ids[~is_special].astype(np.uint8).tobytes().decode('utf-8', errors='replace')
    # Decode each run of bytes between specials on its own so that a special never
    # glues two halves of a multi-byte character together.
    pieces = []
    start = 0
    for i in np.flatnonzero(is_special).tolist() + [len(ids)]:
      pieces.append(ids[start:i].astype(np.uint8).tobytes().decode('utf-8', errors='replace'))
      if i < len(ids):
        pieces.append(self._special_names[int(ids[i]) - _NUM_BYTES])
      start = i + 1
    return ''.join(pieces)

  def __repr__(self) -> str:
    return f'ByteTokenizer(vocab_size={self.vocab_size})'


def check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
  """`ids` as a 1-D integer array in [0, vocab_size); raises naming what is wrong."""
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f'decode expects a 1-D sequence of ids, got shape {ids.shape}')
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f'decode expects integer ids, got dtype {ids.dtype}')
  out_of_range = ids[(ids < 0) | (ids >= vocab_size)]
  if out_of_range.size:
    raise ValueError(f'ids outside [0, {vocab_size}): {out_of_range[:8].tolist()}')
  return ids
