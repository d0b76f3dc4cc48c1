"""Packs tokenized documents into fixed-length LM rows, with a tiny exact resume state.

Row r of every batch reads its own stream: documents at positions r, r + B, r + 2B, ... of
an endless sequence that visits every record once per epoch, in an order reshuffled each
epoch (position p is record perm_{p // N}(p % N)). Each document contributes its tokens
followed by EOS. Consecutive batches overlap by one token per row (batch k, row r holds
the stream's tokens [kT, kT + T + 1)), so every token after the first is a target exactly
once. A row's whole future is fixed by (position, token offset), which is the state.
"""

from collections.abc import Sequence
import operator
from typing import Any

import numpy as np

from curvopt.data import _batch_state
from curvopt.data._permutation import IndexPermutation

_STATE_FORMAT = 'curvopt.PackedBatches/1'


def _check_source(source) -> int:
  if not isinstance(source, Sequence) and not (
    hasattr(source, '__len__') and hasattr(source, '__getitem__')
  ):
    raise TypeError(f'source must support len() and [i], got {type(source).__name__}')
  num_records = len(source)
  if num_records < 1:
    raise ValueError(f'source {source!r:.80} has no records')
  return num_records


def _document_tokens(source, tokenizer, record: int) -> np.ndarray:
  text = source[record]
  if not isinstance(text, str):
    raise TypeError(f'source record {record} is {type(text).__name__}, expected str')
  return tokenizer.encode(text, add_eos=True)


class PackedBatches:
  """An endless, deterministic iterator of packed token batches, np.int32 [B, T + 1].

  inputs = batch[:, :-1], targets = batch[:, 1:]. Rows never need padding; the state
  (`get_state` / `set_state`) is two ints per row plus the settings.
  """

  def __init__(self, source, tokenizer, *, batch_size: int, seq_len: int, seed: int = 0):
    self._source = source
    self._tokenizer = tokenizer
    self._batch_size = _batch_state.positive_int(batch_size, 'batch_size')
    self._seq_len = _batch_state.positive_int(seq_len, 'seq_len')
    try:
      self._seed = operator.index(seed)
    except TypeError:
      raise TypeError(f'seed must be an int, got {type(seed).__name__}: {seed!r}') from None
    self._num_records = _check_source(source)
    self._permutation = IndexPermutation(self._num_records, seed=self._seed)
    # (position, token offset) of each row's next token.
    self._cursors = [(row, 0) for row in range(self._batch_size)]
    self._num_batches = 0
    # The document each row is in, so a long file is tokenized once, not once per batch.
    self._cached_docs: list[tuple[int, np.ndarray] | None] = [None] * self._batch_size

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def seq_len(self) -> int:
    return self._seq_len

  @property
  def seed(self) -> int:
    return self._seed

  @property
  def num_batches(self) -> int:
    """Batches produced so far (carried through the state)."""
    return self._num_batches

  @property
  def epoch(self) -> int:
    """The epoch of the row that is furthest behind (rows advance at different rates)."""
    return min(position for position, _ in self._cursors) // self._num_records

  def record_at(self, position: int) -> int:
    """The record index that stream position `position` reads."""
    epoch, index = divmod(position, self._num_records)
    return self._permutation(epoch, index)

  def _doc(self, row: int, position: int) -> np.ndarray:
    cached = self._cached_docs[row]
    if cached is not None and cached[0] == position:
      return cached[1]
    tokens = _document_tokens(self._source, self._tokenizer, self.record_at(position))
    self._cached_docs[row] = (position, tokens)
    return tokens

  def _fill_row(self, row: int, out_row: np.ndarray) -> tuple[int, int]:
    """Writes row's next T + 1 tokens into out_row; returns its cursor T tokens later."""
    position, offset = self._cursors[row]
    seq_len = self._seq_len
    filled = 0
    next_cursor = None
    while filled < seq_len + 1:
      tokens = self._doc(row, position)
      take = min(len(tokens) - offset, seq_len + 1 - filled)
      out_row[filled : filled + take] = tokens[offset : offset + take]
      if filled <= seq_len < filled + take:
        # The last token is also the next batch's first: resume right at it.
        next_cursor = (position, offset + seq_len - filled)
      filled += take
      offset += take
      if offset == len(tokens):
        position += self._batch_size
        offset = 0
    return next_cursor

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    tokens_BxTplus1 = np.empty((self._batch_size, self._seq_len + 1), np.int32)
    self._cursors = [self._fill_row(row, tokens_BxTplus1[row]) for row in range(self._batch_size)]
    self._num_batches += 1
    return tokens_BxTplus1

  def _settings(self) -> dict[str, Any]:
    return {
      'batch_size': self._batch_size,
      'seq_len': self._seq_len,
      'seed': self._seed,
      'num_records': self._num_records,
      'source': _batch_state.source_id(self._source),
      'vocab_size': int(self._tokenizer.vocab_size),
    }

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serializable dict from which `set_state` resumes exactly."""
    return {
      'format': _STATE_FORMAT,
      **self._settings(),
      'num_batches': self._num_batches,
      'rows': [[position, offset] for position, offset in self._cursors],
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes from `get_state()` of a PackedBatches with the same settings and source."""
    _batch_state.check_state(
      state, state_format=_STATE_FORMAT, settings=self._settings(), fields=('num_batches', 'rows')
    )
    num_batches = state['num_batches']
    rows = state['rows']
    if not isinstance(rows, list) or len(rows) != self._batch_size:
      raise ValueError(
        f'state rows must be a list of {self._batch_size} [position, offset] pairs, got '
        f'{rows!r:.200}'
      )
    cursors = []
    for row, cursor in enumerate(rows):
      if (
        not isinstance(cursor, (list, tuple))
        or len(cursor) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in cursor)
      ):
        raise ValueError(f'state rows[{row}] must be [position, offset] ints, got {cursor!r}')
      position, offset = cursor
      if position < 0 or position % self._batch_size != row:
        raise ValueError(
          f'state rows[{row}] position {position} is not row {row} of a stream of '
          f'batch_size {self._batch_size}'
        )
      cursors.append((position, offset))
    # Offsets are checked against the documents themselves, read here anyway for the
    # next batch; only a fully valid state replaces the current one.
    cached_docs = [None] * self._batch_size
    for row, (position, offset) in enumerate(cursors):
      tokens = _document_tokens(self._source, self._tokenizer, self.record_at(position))
      if not 0 <= offset < len(tokens):
        raise ValueError(
          f'state rows[{row}] offset {offset} outside the {len(tokens)} tokens of the '
          f'document at position {position}'
        )
      cached_docs[row] = (position, tokens)
    self._cursors = cursors
    self._cached_docs = cached_docs
    self._num_batches = num_batches

  def __repr__(self) -> str:
    return (
      f'PackedBatches(batch_size={self._batch_size}, seq_len={self._seq_len}, '
      f'seed={self._seed}, num_records={self._num_records}, '
      f'num_batches={self._num_batches})'
    )


def eval_batches(
  source, tokenizer, *, batch_size: int, seq_len: int, num_batches: int
) -> list[np.ndarray]:
  """Fixed evaluation batches: records 0, 1, 2, ... packed in order, each token a target once.

  Row j of the stream (batch j // B, row j % B) holds the stream's tokens [jT, jT + T + 1).
  Reads only the records it needs. When the source runs out, the last batch is padded
  with `tokenizer.pad_id` and fewer than `num_batches` batches come back; records are
  never repeated, so no text is counted twice.

  Returns:
    A list of at most `num_batches` np.int32 arrays of shape [batch_size, seq_len + 1].
  """
  batch_size = _batch_state.positive_int(batch_size, 'batch_size')
  seq_len = _batch_state.positive_int(seq_len, 'seq_len')
  num_batches = _batch_state.positive_int(num_batches, 'num_batches')
  num_records = _check_source(source)
  wanted = num_batches * batch_size * seq_len + 1
  docs = []
  length = 0
  for record in range(num_records):
    if length >= wanted:
      break
    tokens = _document_tokens(source, tokenizer, record)
    docs.append(tokens)
    length += len(tokens)
  stream = np.concatenate(docs)[:wanted]
  num_rows = -(-(len(stream) - 1) // seq_len)  # Rows holding at least one target.
  num_out = -(-num_rows // batch_size)
  padded = np.full(num_out * batch_size * seq_len + 1, tokenizer.pad_id, np.int32)
  padded[: len(stream)] = stream
  # Rows overlap by one token: row j = padded[jT : jT + T + 1].
  rows = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len]
  rows = np.ascontiguousarray(rows, dtype=np.int32)
  return [rows[b * batch_size : (b + 1) * batch_size] for b in range(num_out)]
