"""Batches of task examples for supervised fine-tuning, and left-padded prompts for sampling.

A row is one example: [BOS] prompt completion [EOS], right-padded with PAD to seq_len + 1
tokens (no packing: the model sees each example alone from position 0, as when sampling
from `prompt_batch`'s prompts); "[BOS] prompt" is the tokenizer's `encode_prompt`, a chat
turn for a Hugging Face tokenizer with a chat template. Masks are aligned with `tokens`:
`loss_mask[b, t]` is 1 when token t is a completion token or the EOS, so the loss of inputs
tokens[:, :-1] predicting targets tokens[:, 1:] is weighted by loss_mask[:, 1:] (the
convention of lm_loss).

Row r of batch k draws its task from the weights with a hash of (seed, k, r); each task
walks its examples in an order reshuffled every epoch. The state is the batch count plus
one position per task, so resuming is exact.
"""

from collections.abc import Mapping, Sequence
import hashlib
import math
import operator
from typing import Any

import numpy as np

from curvopt.data import _batch_state
from curvopt.data._permutation import IndexPermutation

_STATE_FORMAT = 'curvopt.TaskBatches/1'


def _text(example, field: str, where: str) -> str:
  if isinstance(example, Mapping):
    if field not in example:
      raise ValueError(f'{where} has no {field!r} field; it has {sorted(example)}')
    value = example[field]
  elif field == 'prompt':
    value = example  # prompt_batch also takes bare prompt strings
  else:
    raise TypeError(f'{where} must be a dict with {field!r}, got {type(example).__name__}')
  if not isinstance(value, str):
    raise TypeError(f'{where} {field!r} must be a str, got {type(value).__name__}')
  return value


def example_tokens(example: Mapping[str, str], tokenizer) -> tuple[np.ndarray, int]:
  """(ids of [BOS] prompt completion [EOS], number of leading BOS + prompt tokens)."""
  prompt = tokenizer.encode_prompt(_text(example, 'prompt', 'example'))
  completion = tokenizer.encode(_text(example, 'completion', 'example'), add_eos=True)
  return np.concatenate([prompt, completion]), len(prompt)


def _unit_float(*parts: int) -> float:
  # A uniform draw in [0, 1) that every machine and numpy version computes alike.
  digest = hashlib.blake2b(':'.join(map(str, parts)).encode(), digest_size=8).digest()
  return int.from_bytes(digest, 'little') / 2.0**64


def _task_seed(seed: int, name: str) -> int:
  digest = hashlib.blake2b(f'{seed}:{name}'.encode(), digest_size=8).digest()
  return int.from_bytes(digest, 'little')


class TaskBatches:
  """An endless, deterministic iterator of SFT batches over a weighted mixture of tasks.

  Each batch is a dict of np.int32 arrays of shape [batch_size, seq_len + 1]:
    tokens:      [BOS] prompt completion [EOS] PAD ... per row,
    loss_mask:   1 on the completion tokens and the EOS,
    prompt_mask: 1 on BOS and the prompt tokens.
  `tasks` counts the rows drawn from each task so far (also in the state).
  """

  def __init__(
    self,
    sources: Mapping[str, Any],
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    weights: Mapping[str, float] | Sequence[float] | None = None,
  ):
    if not isinstance(sources, Mapping) or not sources:
      raise TypeError(
        f'sources must be a non-empty dict of task name -> source, got {sources!r:.100}'
      )
    self._names = tuple(sources)
    self._sources = dict(sources)
    self._tokenizer = tokenizer
    self._batch_size = _batch_state.positive_int(batch_size, 'batch_size')
    self._seq_len = _batch_state.positive_int(seq_len, 'seq_len')
    try:
      self._seed = operator.index(seed)
    except TypeError:
      raise TypeError(f'seed must be an int, got {type(seed).__name__}: {seed!r}') from None
    self._weights = self._normalized_weights(weights)
    self._cumulative = np.cumsum(self._weights)
    self._sizes = {}
    self._permutations = {}
    for name in self._names:
      size = len(self._sources[name])
      if size < 1:
        raise ValueError(f'task source {name!r} has no examples')
      self._sizes[name] = size
      self._permutations[name] = IndexPermutation(size, seed=_task_seed(self._seed, name))
    self._positions = {name: 0 for name in self._names}
    self._num_batches = 0

  def _normalized_weights(self, weights) -> np.ndarray:
    if weights is None:
      values = [1.0] * len(self._names)
    elif isinstance(weights, Mapping):
      unknown = sorted(set(weights) - set(self._names))
      missing = sorted(set(self._names) - set(weights))
      if unknown or missing:
        raise ValueError(
          f'weights name tasks {sorted(weights)} but sources are {sorted(self._names)}'
        )
      values = [weights[name] for name in self._names]
    else:
      values = list(weights)
      if len(values) != len(self._names):
        raise ValueError(f'{len(values)} weights for {len(self._names)} sources')
    for name, value in zip(self._names, values):
      if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f'weight of task {name!r} must be a finite number >= 0, got {value!r}')
    total = float(sum(values))
    if total <= 0:
      raise ValueError(f'task weights must not all be 0, got {values}')
    return np.asarray(values, np.float64) / total

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def seq_len(self) -> int:
    return self._seq_len

  @property
  def names(self) -> tuple[str, ...]:
    return self._names

  @property
  def weights(self) -> dict[str, float]:
    return dict(zip(self._names, self._weights.tolist()))

  @property
  def num_batches(self) -> int:
    return self._num_batches

  @property
  def tasks(self) -> dict[str, int]:
    """Rows drawn from each task so far."""
    return dict(self._positions)

  def row_task(self, batch: int, row: int) -> str:
    """The task that row `row` of batch number `batch` (0-based) draws from."""
    u = _unit_float(self._seed, batch, row)
    index = int(np.searchsorted(self._cumulative, u * self._cumulative[-1], side='right'))
    # Zero-weight tasks have empty intervals; the clip guards u * total rounding to total.
    return self._names[min(index, len(self._names) - 1)]

  def example_at(self, name: str, position: int) -> dict:
    """The example that position `position` of task `name`'s stream reads."""
    epoch, index = divmod(position, self._sizes[name])
    return self._sources[name][self._permutations[name](epoch, index)]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    shape = (self._batch_size, self._seq_len + 1)
    tokens = np.full(shape, self._tokenizer.pad_id, np.int32)
    loss_mask = np.zeros(shape, np.int32)
    prompt_mask = np.zeros(shape, np.int32)
    positions = dict(self._positions)
    for row in range(self._batch_size):
      name = self.row_task(self._num_batches, row)
      position = positions[name]
      ids, prompt_len = example_tokens(self.example_at(name, position), self._tokenizer)
      if len(ids) > shape[1]:
        raise ValueError(
          f'example at position {position} of task {name!r} has {len(ids)} tokens (with '
          f'BOS and EOS), more than seq_len + 1 = {shape[1]}; raise seq_len'
        )
      positions[name] = position + 1
      tokens[row, : len(ids)] = ids
      prompt_mask[row, :prompt_len] = 1
      loss_mask[row, prompt_len : len(ids)] = 1
    self._positions = positions
    self._num_batches += 1
    return {'tokens': tokens, 'loss_mask': loss_mask, 'prompt_mask': prompt_mask}

  def _settings(self) -> dict[str, Any]:
    return {
      'batch_size': self._batch_size,
      'seq_len': self._seq_len,
      'seed': self._seed,
      'weights': self.weights,
      'sizes': dict(self._sizes),
      'sources': {name: _batch_state.source_id(self._sources[name]) for name in self._names},
      'vocab_size': int(self._tokenizer.vocab_size),
    }

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serializable dict from which `set_state` resumes exactly."""
    return {
      'format': _STATE_FORMAT,
      **self._settings(),
      'num_batches': self._num_batches,
      'positions': dict(self._positions),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes from `get_state()` of a TaskBatches with the same settings and sources."""
    _batch_state.check_state(
      state,
      state_format=_STATE_FORMAT,
      settings=self._settings(),
      fields=('num_batches', 'positions'),
    )
    num_batches = state['num_batches']
    positions = state['positions']
    if (
      not isinstance(positions, dict)
      or set(positions) != set(self._names)
      or not all(_batch_state.is_count(v) for v in positions.values())
    ):
      raise ValueError(
        f'state positions must map every task {sorted(self._names)} to an '
        f'int >= 0, got {positions!r:.200}'
      )
    if sum(positions.values()) != num_batches * self._batch_size:
      raise ValueError(
        f'state positions {positions} do not add up to num_batches '
        f'{num_batches} x batch_size {self._batch_size}'
      )
    self._positions = {name: positions[name] for name in self._names}
    self._num_batches = num_batches

  def __repr__(self) -> str:
    return (
      f'TaskBatches(tasks={self.weights}, batch_size={self._batch_size}, '
      f'seq_len={self._seq_len}, seed={self._seed}, num_batches={self._num_batches})'
    )


def prompt_batch(
  examples: Sequence[Mapping[str, str] | str], tokenizer, *, max_prompt_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """LEFT-padded [BOS] prompt ids of each example, for sampling a completion after them.

  Args:
    examples: dicts with a 'prompt' (e.g. a TaskSource's examples) or prompt strings.
    tokenizer: the tokenizer; each prompt is its `encode_prompt` (BOS + text, or a chat
      turn), as in TaskBatches' rows.
    max_prompt_len: P, the width of the result (static shapes for jit); a longer prompt
      raises.

  Returns:
    (prompts [B, P] np.int32 padded with PAD on the left, prompt_mask [B, P] np.int32 with
    1 on real tokens). Pass `positions_from_mask(prompt_mask)` to the model so that every
    prompt starts at position 0, as in training.
  """
  max_prompt_len = _batch_state.positive_int(max_prompt_len, 'max_prompt_len')
  if isinstance(examples, (str, Mapping)):
    raise TypeError(
      'examples must be a sequence of examples or prompt strings, got one '
      f'{type(examples).__name__}'
    )
  if len(examples) < 1:
    raise ValueError('prompt_batch needs at least one example')
  prompts = np.full((len(examples), max_prompt_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(examples), max_prompt_len), np.int32)
  for i, example in enumerate(examples):
    ids = tokenizer.encode_prompt(_text(example, 'prompt', f'examples[{i}]'))
    if len(ids) > max_prompt_len:
      raise ValueError(
        f'examples[{i}] prompt has {len(ids)} tokens with BOS, more than '
        f'max_prompt_len={max_prompt_len}'
      )
    prompts[i, max_prompt_len - len(ids) :] = ids
    mask[i, max_prompt_len - len(ids) :] = 1
  return prompts, mask
