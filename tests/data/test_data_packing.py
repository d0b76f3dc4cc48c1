"""PackedBatches, eval_batches and the per-epoch permutation, against slow references."""

import json
import os
import pathlib
import subprocess
import sys

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import curvopt
from curvopt.data import ByteTokenizer
from curvopt.data import IndexPermutation
from curvopt.data import PackedBatches
from curvopt.data import eval_batches
from curvopt.data import text_source

# Varied lengths: empty, one byte, multi-byte characters, longer than every seq_len below.
_DOCS = ['', 'a', 'é✓🙂', 'def f(x):\n  return x\n', 'z' * 70] + [
  f'doc{i}:' + chr(97 + i % 26) * (i * 7 % 40) for i in range(7)
]
_TOK = ByteTokenizer()

# (batch_size, seq_len, seed): rows longer and shorter than documents, B near / above N.
_SETTINGS = [
  (1, 4, 0),
  (3, 8, 1),
  (4, 64, 2),
  (8, 5, 3),
  (16, 3, 0),
]


class _CountingSource:
  """A virtual source of `n` records that records which ones were read."""

  def __init__(self, n):
    self.n = n
    self.reads = set()

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    self.reads.add(i)
    return f'record {i} ' * (1 + i % 5)


def _reference_batches(docs, batch_size, seq_len, seed, num_batches):
  """Row r = concatenation of docs at positions r, r + B, ... cut every T tokens."""
  perm = IndexPermutation(len(docs), seed=seed)
  out = np.zeros((num_batches, batch_size, seq_len + 1), np.int32)
  for row in range(batch_size):
    stream, position = [], row
    while len(stream) < num_batches * seq_len + 1:
      epoch, index = divmod(position, len(docs))
      stream += list(docs[perm(epoch, index)].encode()) + [_TOK.eos_id]
      position += batch_size
    for k in range(num_batches):
      out[k, row] = stream[k * seq_len : k * seq_len + seq_len + 1]
  return out


def _take(batches, k):
  return np.array([next(batches) for _ in range(k)], np.int32).reshape(
    k, batches.batch_size, batches.seq_len + 1
  )


@pytest.mark.parametrize('n', [1, 2, 3, 5, 64, 1000])
def test_permutation_is_a_bijection_that_changes_per_epoch_and_seed(n):
  perm = IndexPermutation(n, seed=7)
  orders = [[perm(epoch, i) for i in range(n)] for epoch in range(3)]
  for order in orders:
    assert sorted(order) == list(range(n))
  if n >= 5:
    assert orders[0] != orders[1] != orders[2]
    other_seed = IndexPermutation(n, seed=8)
    assert [other_seed(0, i) for i in range(n)] != orders[0]


def test_permutation_golden_values_are_stable():
  # Pinned: every host and every later run must read the same order.
  perm = IndexPermutation(10, seed=0)
  assert [perm(0, i) for i in range(10)] == [1, 7, 8, 3, 6, 9, 4, 2, 5, 0]
  assert [perm(1, i) for i in range(10)] == [3, 0, 4, 9, 5, 2, 7, 6, 1, 8]
  big = IndexPermutation(10**6, seed=42)
  assert [big(0, i) for i in range(5)] == [623613, 833227, 38161, 17135, 640062]


@pytest.mark.parametrize('batch_size, seq_len, seed', _SETTINGS)
def test_batches_match_reference(batch_size, seq_len, seed):
  batches = PackedBatches(_DOCS, _TOK, batch_size=batch_size, seq_len=seq_len, seed=seed)
  got = _take(batches, 12)
  assert got.dtype == np.int32 and got.shape == (12, batch_size, seq_len + 1)
  assert ((got >= 0) & (got < _TOK.vocab_size)).all()
  assert not (got == _TOK.pad_id).any()
  np.testing.assert_array_equal(got, _reference_batches(_DOCS, batch_size, seq_len, seed, 12))
  assert batches.num_batches == 12


def test_deterministic_per_seed_and_different_across_seeds():
  def make(seed):
    return PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=seed)

  np.testing.assert_array_equal(_take(make(5), 6), _take(make(5), 6))
  assert not np.array_equal(_take(make(5), 6), _take(make(6), 6))


def test_rows_of_a_batch_come_from_different_documents():
  long_docs = [chr(97 + i) * 1000 for i in range(8)]
  batches = PackedBatches(long_docs, _TOK, batch_size=4, seq_len=16, seed=0)
  for _ in range(3):
    letters = [set(row.tolist()) for row in next(batches)]
    assert all(len(s) == 1 for s in letters)
    assert len(set.union(*letters)) == 4


def test_each_epoch_visits_every_record_in_a_new_order():
  batches = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=0)
  n = len(_DOCS)
  orders = [[batches.record_at(p) for p in range(e * n, (e + 1) * n)] for e in range(3)]
  assert all(sorted(o) == list(range(n)) for o in orders)
  assert orders[0] != orders[1] != orders[2]


@pytest.mark.parametrize('consumed', [0, 1, 4, 25])
def test_resume_through_json_reproduces_the_next_batches(consumed):
  original = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=1)
  _take(original, consumed)
  state = json.loads(json.dumps(original.get_state()))
  resumed = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=1)
  resumed.set_state(state)
  assert resumed.num_batches == consumed
  np.testing.assert_array_equal(_take(resumed, 30), _take(original, 30))


def test_resume_while_rows_straddle_an_epoch_boundary():
  n = len(_DOCS)
  original = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=2)
  for _ in range(500):
    epochs = {position // n for position, _ in original.get_state()['rows']}
    if len(epochs) > 1:
      break
    next(original)
  assert len(epochs) > 1, 'no batch had rows in two epochs'
  state = json.loads(json.dumps(original.get_state()))
  resumed = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=2)
  resumed.set_state(state)
  np.testing.assert_array_equal(_take(resumed, 40), _take(original, 40))
  assert original.epoch > min(epochs)


def _corrupt(state, **changes):
  return {**json.loads(json.dumps(state)), **changes}


_BAD_STATES = {
  'not_a_dict': lambda s: [1, 2],
  'missing_key': lambda s: {k: v for k, v in s.items() if k != 'rows'},
  'extra_key': lambda s: _corrupt(s, extra=1),
  'format': lambda s: _corrupt(s, format='other/9'),
  'seed': lambda s: _corrupt(s, seed=99),
  'batch_size': lambda s: _corrupt(s, batch_size=4),
  'seq_len': lambda s: _corrupt(s, seq_len=9),
  'num_records': lambda s: _corrupt(s, num_records=11),
  'source': lambda s: _corrupt(s, source='lm1b/train'),
  'num_batches': lambda s: _corrupt(s, num_batches=-1),
  'rows_length': lambda s: _corrupt(s, rows=s['rows'][:2]),
  'row_position_of_other_row': lambda s: _corrupt(s, rows=[[1, 0], [1, 0], [2, 0]]),
  'negative_offset': lambda s: _corrupt(s, rows=[[0, -1], [1, 0], [2, 0]]),
  'offset_past_document': lambda s: _corrupt(s, rows=[[0, 10**6], [1, 0], [2, 0]]),
  'float_position': lambda s: _corrupt(s, rows=[[0.0, 0], [1, 0], [2, 0]]),
}


@pytest.mark.parametrize('corrupt', list(_BAD_STATES.values()), ids=list(_BAD_STATES))
def test_bad_state_raises_and_leaves_batches_untouched(corrupt):
  batches = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=1)
  reference = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=1)
  _take(batches, 2)
  _take(reference, 2)
  with pytest.raises(ValueError):
    batches.set_state(corrupt(batches.get_state()))
  np.testing.assert_array_equal(_take(batches, 3), _take(reference, 3))


def test_state_from_other_settings_names_the_mismatch():
  state = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=1).get_state()
  other = PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=2)
  with pytest.raises(ValueError, match='seed: state has 1, this has 2'):
    other.set_state(state)


@pytest.mark.parametrize(
  'kwargs, error, match',
  [
    (dict(batch_size=0, seq_len=8), ValueError, 'batch_size'),
    (dict(batch_size=2, seq_len=-1), ValueError, 'seq_len'),
    (dict(batch_size=2.5, seq_len=8), TypeError, '2.5'),
    (dict(batch_size=2, seq_len=8, seed='a'), TypeError, 'seed'),
  ],
)
def test_bad_settings_raise(kwargs, error, match):
  with pytest.raises(error, match=match):
    PackedBatches(_DOCS, _TOK, **kwargs)


def test_empty_source_raises():
  with pytest.raises(ValueError, match='no records'):
    PackedBatches([], _TOK, batch_size=2, seq_len=4)
  with pytest.raises(ValueError, match='no records'):
    eval_batches([], _TOK, batch_size=2, seq_len=4, num_batches=1)


def test_large_virtual_source_reads_only_needed_records():
  source = _CountingSource(5_000_000)
  batches = PackedBatches(source, _TOK, batch_size=4, seq_len=32, seed=0)
  _take(batches, 5)
  assert 4 <= len(source.reads) <= 40
  resumed = PackedBatches(source, _TOK, batch_size=4, seq_len=32, seed=0)
  resumed.set_state(batches.get_state())
  np.testing.assert_array_equal(next(resumed), next(batches))


def _reference_eval(docs, batch_size, seq_len):
  """Every batch eval_batches can make: records in order, rows every T tokens, padded."""
  stream = [t for d in docs for t in list(d.encode()) + [_TOK.eos_id]]
  rows = []
  for start in range(0, len(stream) - 1, seq_len):
    row = stream[start : start + seq_len + 1]
    rows.append(row + [_TOK.pad_id] * (seq_len + 1 - len(row)))
  while len(rows) % batch_size:
    rows.append([_TOK.pad_id] * (seq_len + 1))
  return np.array(rows, np.int32).reshape(-1, batch_size, seq_len + 1)


@pytest.mark.parametrize(
  'batch_size, seq_len, num_batches',
  [
    (2, 8, 3),  # fewer batches than the source holds
    (3, 5, 100),  # the source runs out: padded, fewer batches
    (1, 1000, 2),  # one row holds the whole source
  ],
)
def test_eval_batches_match_reference(batch_size, seq_len, num_batches):
  got = eval_batches(_DOCS, _TOK, batch_size=batch_size, seq_len=seq_len, num_batches=num_batches)
  expected = _reference_eval(_DOCS, batch_size, seq_len)[:num_batches]
  assert len(got) == len(expected) <= num_batches
  for batch, want in zip(got, expected):
    assert batch.dtype == np.int32 and batch.shape == (batch_size, seq_len + 1)
    np.testing.assert_array_equal(batch, want)
  again = eval_batches(_DOCS, _TOK, batch_size=batch_size, seq_len=seq_len, num_batches=num_batches)
  np.testing.assert_array_equal(np.stack(again), np.stack(got))


def test_eval_batches_count_every_token_once_and_read_only_what_they_need():
  got = np.stack(eval_batches(_DOCS, _TOK, batch_size=3, seq_len=5, num_batches=100))
  targets = got[:, :, 1:].reshape(-1)
  stream = np.concatenate([_TOK.encode(d, add_eos=True) for d in _DOCS])
  np.testing.assert_array_equal(targets[targets != _TOK.pad_id], stream[1:])
  source = _CountingSource(1_000_000)
  eval_batches(source, _TOK, batch_size=2, seq_len=16, num_batches=2)
  assert source.reads == set(range(len(source.reads))) and len(source.reads) < 20


def test_global_batch_shards_over_the_mesh(mesh8):
  # Every process builds the same global batch and keeps its own rows.
  batch = next(PackedBatches(_DOCS, _TOK, batch_size=8, seq_len=6, seed=0))
  again = next(PackedBatches(_DOCS, _TOK, batch_size=8, seq_len=6, seed=0))
  sharding = NamedSharding(mesh8, P(('data', 'fsdp'), None))
  array = jax.make_array_from_callback(batch.shape, sharding, lambda index: again[index])
  np.testing.assert_array_equal(np.asarray(array), batch)
  assert len(array.addressable_shards) == 8
  for shard in array.addressable_shards:
    assert shard.data.shape == (1, 7)
    np.testing.assert_array_equal(np.asarray(shard.data), batch[shard.index])


def test_batches_do_not_depend_on_the_hash_seed():
  script = (
    'import json, sys\n'
    'from curvopt.data import ByteTokenizer, PackedBatches\n'
    'docs = json.loads(sys.argv[1])\n'
    'b = PackedBatches(docs, ByteTokenizer(), batch_size=3, seq_len=8, seed=4)\n'
    'print(json.dumps([next(b).tolist() for _ in range(4)]))\n'
  )
  repo_root = str(pathlib.Path(curvopt.__file__).resolve().parents[1])
  env = {**os.environ, 'PYTHONHASHSEED': '12345', 'PYTHONPATH': repo_root}
  result = subprocess.run(
    [sys.executable, '-c', script, json.dumps(_DOCS)],
    env=env,
    capture_output=True,
    text=True,
    check=True,
    timeout=120,
  )
  here = _take(PackedBatches(_DOCS, _TOK, batch_size=3, seq_len=8, seed=4), 4)
  np.testing.assert_array_equal(np.array(json.loads(result.stdout)), here)


def test_packed_batches_on_the_mini_corpus(tmp_path):
  source = text_source('code_corpus/mini', 'train', data_dir=str(tmp_path))
  batches = PackedBatches(source, _TOK, batch_size=4, seq_len=128, seed=0)
  first = _take(batches, 3)
  assert first.shape == (3, 4, 129) and first.dtype == np.int32
  assert ((first >= 0) & (first < _TOK.vocab_size)).all()
  state = json.loads(json.dumps(batches.get_state()))
  assert state['source'] == 'code_corpus/mini/train'
  resumed = PackedBatches(source, _TOK, batch_size=4, seq_len=128, seed=0)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed), next(batches))
  # A state saved on another source of the same length is refused.
  stand_in = [source[i] for i in range(len(source))]
  with pytest.raises(ValueError, match='source'):
    PackedBatches(stand_in, _TOK, batch_size=4, seq_len=128, seed=0).set_state(state)
  # Row 0 starts with the corpus file at its first stream position.
  expected = _TOK.encode(source[batches.record_at(0)], add_eos=True)[:129]
  np.testing.assert_array_equal(first[0, 0, : len(expected)], expected)
