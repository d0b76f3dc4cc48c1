"""The synthetic tasks (generators, tfds builder), TaskBatches and prompt_batch."""

import collections
import json
import re

import jax
import numpy as np
import pytest

from curvopt import data
from curvopt.data import ByteTokenizer
from curvopt.data import TaskBatches
from curvopt.data import _task_generators
from curvopt.data import prompt_batch
from curvopt.data import task_source

_TOK = ByteTokenizer()
_TASKS = data.TASK_NAMES
_SPLITS = ('train', 'test')
# The most bytes of prompt + completion a task may have (BOS and EOS come on top): the SFT
# configs' seq_len + 1 is 65 tokens for arithmetic and 129 for the rest.
_MAX_BYTES = {'arithmetic': 63, 'reversal': 120, 'sorting': 120, 'kv_recall': 120, 'format': 120}


# Preparing is the same code for every config; two keep the file fast.
_PREPARED = ('reversal', 'kv_recall')


@pytest.fixture(scope='module')
def tasks_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds_tasks'))
  for task in _PREPARED:
    task_source(task, 'test', data_dir=data_dir)
  return data_dir


@pytest.fixture(scope='module')
def examples():
  """{(task, split): [example, ...]} straight from the generators."""
  return {(t, s): _task_generators.generate_split(t, s) for t in _TASKS for s in _SPLITS}


def _key(example):
  return (example['prompt'], example['completion'], example['answer'])


def test_task_names_and_exports():
  assert _TASKS == ('arithmetic', 'reversal', 'sorting', 'kv_recall', 'format')
  assert list(data.__all__) == sorted(data.__all__)


@pytest.mark.parametrize('task', _TASKS)
def test_generation_is_deterministic(task, examples):
  assert _task_generators.generate_split(task, 'test') == examples[task, 'test']
  assert _task_generators.generate_split(task, 'train', 50) == examples[task, 'train'][:50]
  sizes = {s: len(examples[task, s]) for s in _SPLITS}
  assert sizes['train'] == 20_000
  assert sizes['test'] == (256 if task == 'kv_recall' else 500)


@pytest.mark.parametrize('task', _PREPARED)
def test_prepared_data_set_holds_the_generated_examples(task, tasks_dir, examples):
  for split in _SPLITS:
    src = task_source(task, split, data_dir=tasks_dir)
    assert src.name == task and src.split == split
    assert len(src) == len(examples[task, split])
    assert all(isinstance(v, str) for v in src[0].values()) and set(src[0]) == {
      'prompt',
      'completion',
      'answer',
    }
    # tfds stores records in its own (fixed) order: compare as sets, a sample of train.
    indices = range(len(src)) if split == 'test' else range(0, len(src), 97)
    generated = set(map(_key, examples[task, split]))
    read = [_key(src[i]) for i in indices]
    assert set(read) <= generated
    if split == 'test':
      assert set(read) == generated


@pytest.mark.parametrize('task', _TASKS)
def test_train_and_test_prompts_are_disjoint(task, examples):
  train = {e['prompt'] for e in examples[task, 'train']}
  test = [e['prompt'] for e in examples[task, 'test']]
  assert len(set(test)) == len(test)
  assert not train & set(test)
  if task != 'kv_recall':
    assert len(train) == len(examples[task, 'train'])  # no repeats either


@pytest.mark.parametrize('task', _TASKS)
def test_format_contract_and_lengths(task, examples):
  for split in _SPLITS:
    for e in examples[task, split]:
      assert e['prompt'].startswith('Q: ') and e['prompt'].endswith('\n')
      assert e['prompt'].count('\n') == 1
      *steps, last = e['completion'].split('\n')
      assert last == '#### ' + e['answer'], e
      assert steps and all(steps), e  # at least one non-empty worked line
      assert '####' not in ''.join(steps) and '\n' not in e['answer'] and e['answer']
      assert e['answer'] == e['answer'].strip()
      assert len((e['prompt'] + e['completion']).encode()) <= _MAX_BYTES[task], e


def _check_arithmetic(e, num_ops=range(2, 5)):
  expression = re.fullmatch(r'Q: (.*)=\?\n', e['prompt']).group(1)
  assert re.fullmatch(r'[0-9+\-*()]+', expression)
  value = eval(expression)  # pylint: disable=eval-used
  assert e['answer'] == str(value)
  *steps, _ = e['completion'].split('\n')
  assert len(steps) in num_ops and len(steps) == len(re.findall(r'[+\-*]', expression))
  for line in steps:
    lhs, rhs = line.split('=')
    assert re.fullmatch(r'\d+[+\-*]\d+', lhs) and eval(lhs) == int(rhs), line  # pylint: disable=eval-used
  assert int(steps[-1].split('=')[1]) == value


def _check_reversal(e):
  word = re.fullmatch(r'Q: reverse ([a-z]+)\n', e['prompt']).group(1)
  assert e['answer'] == word[::-1]


def _check_sorting(e):
  items = re.fullmatch(r'Q: sort (.*)\n', e['prompt']).group(1).split(' ')
  assert e['answer'] == ' '.join(sorted(items))


def _check_format(e):
  template, word = re.fullmatch(r'Q: fill (.*) with ([a-z]+)\n', e['prompt']).groups()
  assert template.count('_') == 1
  assert e['answer'] == template.replace('_', word)


_CHECKS = {
  'arithmetic': _check_arithmetic,
  'reversal': _check_reversal,
  'sorting': _check_sorting,
  'format': _check_format,
}


@pytest.mark.parametrize('task', sorted(_CHECKS))
def test_answers_are_correct(task, examples):
  for split in _SPLITS:
    for e in examples[task, split]:
      _CHECKS[task](e)


def test_kv_recall_asks_one_fixed_table_in_held_out_phrasings(examples):
  table = _task_generators.kv_table()
  assert table == _task_generators.kv_table()
  capital_of = {country: capital for country, capital, _ in table}
  assert len(capital_of) == len(table) == 128

  def country_and_phrasing(prompt):
    for i, phrasing in enumerate(_task_generators._KV_PHRASINGS):
      before, after = phrasing.split('{k}')
      if prompt.startswith(before) and prompt.endswith(after):
        country = prompt[len(before) : len(prompt) - len(after)]
        if country in capital_of:
          return country, i
    raise AssertionError(f'no phrasing fits {prompt!r}')

  seen = collections.defaultdict(set)
  for split in _SPLITS:
    for e in examples['kv_recall', split]:
      country, phrasing = country_and_phrasing(e['prompt'])
      assert e['answer'] == capital_of[country]
      seen[split, country].add(phrasing)
  for country, _, held_out in table:
    assert seen['test', country] == set(held_out)  # every key is tested ...
    assert seen['train', country] == set(range(6)) - set(held_out)  # ... and learnable


# ----------------------------------------------------------- arithmetic's difficulty knob


def _num_ops(example):
  return len(example['completion'].split('\n')) - 1  # one worked line per operation


@pytest.mark.parametrize(
  'min_ops, max_ops', [(2, 4), (1, 3), (1, 4), (2, 3), (3, 3), (3, 4), (4, 4)]
)
def test_arithmetic_difficulty_draws_its_operation_counts(min_ops, max_ops):
  task = data.arithmetic_task(min_ops, max_ops)
  assert task in data.ARITHMETIC_TASKS and task in data.ALL_TASKS
  assert _task_generators.arithmetic_num_ops(task) == tuple(range(min_ops, max_ops + 1))
  test = _task_generators.generate_split(task, 'test')
  counts = collections.Counter(map(_num_ops, test))
  assert set(counts) == set(range(min_ops, max_ops + 1)), counts
  for e in test:
    _check_arithmetic(e, num_ops=range(min_ops, max_ops + 1))
    assert len((e['prompt'] + e['completion']).encode()) <= _MAX_BYTES['arithmetic'], e
  train = {e['prompt'] for e in _task_generators.generate_split(task, 'train', 500)}
  assert not train & {e['prompt'] for e in test}


def test_the_default_difficulty_is_the_arithmetic_task(examples):
  assert data.arithmetic_task(2, 4) == 'arithmetic' and data.ARITHMETIC_TASKS[0] == 'arithmetic'
  mean_ops = {
    task: np.mean([_num_ops(e) for e in _task_generators.generate_split(task, 'test')])
    for task in ('arithmetic_ops1-3', 'arithmetic_ops2-3', 'arithmetic_ops3-4')
  }
  mean_ops['arithmetic'] = np.mean([_num_ops(e) for e in examples['arithmetic', 'test']])
  order = ('arithmetic_ops1-3', 'arithmetic_ops2-3', 'arithmetic', 'arithmetic_ops3-4')
  assert [mean_ops[t] for t in order] == sorted(mean_ops.values()), mean_ops
  for bad in ((1, 2), (2, 2), (0, 3), (3, 5)):  # too few distinct prompts, or rows too long
    with pytest.raises(ValueError, match=r'no arithmetic task with .* valid \(min_ops, max_ops\)'):
      data.arithmetic_task(*bad)
  with pytest.raises(ValueError, match="'reversal' is not an arithmetic task"):
    _task_generators.arithmetic_num_ops('reversal')


def test_unknown_task_or_split_raises(tasks_dir):
  with pytest.raises(ValueError, match="unknown task 'algebra'"):
    task_source('algebra', 'train', data_dir=tasks_dir)
  with pytest.raises(ValueError, match="no split 'validation'"):
    task_source('reversal', 'validation', data_dir=tasks_dir)


# ------------------------------------------------------------------------------ batches


def _fake_source(name, n):
  return [
    {
      'prompt': f'Q: {name} {i}?\n',
      'completion': f'{name[:1]}{"x" * (i % 5)}\n#### {i}',
      'answer': str(i),
    }
    for i in range(n)
  ]


_SOURCES = {
  'alpha': _fake_source('alpha', 7),
  'beta': _fake_source('beta', 3),
  'gamma': _fake_source('gamma', 11),
}


@pytest.mark.parametrize('batch_size, seq_len, seed', [(1, 24, 0), (4, 32, 1), (16, 40, 2)])
def test_rows_and_masks_match_a_reference(batch_size, seq_len, seed):
  batches = TaskBatches(_SOURCES, _TOK, batch_size=batch_size, seq_len=seq_len, seed=seed)
  for k in range(6):
    batch = next(batches)
    assert set(batch) == {'tokens', 'loss_mask', 'prompt_mask'}
    for v in batch.values():
      assert v.shape == (batch_size, seq_len + 1) and v.dtype == np.int32
    for row in range(batch_size):
      tokens = batch['tokens'][row]
      name = batches.row_task(k, row)
      # Reference: the row is BOS prompt completion EOS, right-padded.
      text = _TOK.decode(tokens, skip_special=False)
      assert text.startswith('<bos>Q: ' + name)
      prompt, rest = text[len('<bos>') :].split('\n', 1)
      completion = rest.split('<eos>')[0]
      assert set(rest.split('<eos>', 1)[1].replace('<pad>', '')) == set()
      example = next(e for e in _SOURCES[name] if e['prompt'] == prompt + '\n')
      assert completion == example['completion']
      n_prompt, n_all = 1 + len(prompt) + 1, 1 + len(prompt) + 1 + len(completion) + 1
      column = np.arange(seq_len + 1)
      np.testing.assert_array_equal(batch['prompt_mask'][row], column < n_prompt)
      np.testing.assert_array_equal(
        batch['loss_mask'][row], (column >= n_prompt) & (column < n_all)
      )
      # lm_loss's convention: input t predicts target t + 1; the weighted targets are
      # exactly the completion and its EOS.
      targets = tokens[1:][batch['loss_mask'][row, 1:] == 1]
      assert _TOK.decode(targets, skip_special=False) == example['completion'] + '<eos>'


def test_each_task_walks_every_example_once_per_epoch():
  batches = TaskBatches(_SOURCES, _TOK, batch_size=5, seq_len=32, seed=3)
  drawn = collections.defaultdict(list)
  for k in range(40):
    batch = next(batches)
    for row in range(5):
      name = batches.row_task(k, row)
      drawn[name].append(_TOK.decode(batch['tokens'][row]).split('\n')[0])
  assert batches.tasks == {n: len(v) for n, v in drawn.items()}
  for name, prompts in drawn.items():
    n = len(_SOURCES[name])
    for epoch in range(len(prompts) // n):
      chunk = prompts[epoch * n : (epoch + 1) * n]
      assert sorted(chunk) == sorted(e['prompt'][:-1] for e in _SOURCES[name])


def test_resume_from_state_is_exact():
  weights = {'alpha': 2.0, 'beta': 1.0, 'gamma': 1.0}
  straight = TaskBatches(_SOURCES, _TOK, batch_size=6, seq_len=32, seed=5, weights=weights)
  expected = [next(straight) for _ in range(12)]
  first = TaskBatches(_SOURCES, _TOK, batch_size=6, seq_len=32, seed=5, weights=weights)
  for _ in range(7):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = TaskBatches(_SOURCES, _TOK, batch_size=6, seq_len=32, seed=5, weights=weights)
  resumed.set_state(state)
  assert resumed.num_batches == 7 and resumed.get_state() == state
  for k in range(7, 12):
    got = next(resumed)
    for key in got:
      np.testing.assert_array_equal(got[key], expected[k][key])


@pytest.mark.parametrize(
  'change, match',
  [
    (dict(seed=6), 'seed'),
    (dict(batch_size=3), 'batch_size'),
    (dict(weights={'alpha': 1.0, 'beta': 1.0, 'gamma': 1.0}), 'weights'),
  ],
)
def test_set_state_refuses_other_settings(change, match):
  settings = dict(
    batch_size=6, seq_len=32, seed=5, weights={'alpha': 2.0, 'beta': 1.0, 'gamma': 1.0}
  )
  batches = TaskBatches(_SOURCES, _TOK, **settings)
  next(batches)
  state = batches.get_state()
  other = TaskBatches(_SOURCES, _TOK, **{**settings, **change})
  with pytest.raises(ValueError, match=match):
    other.set_state(state)
  bad = dict(state, positions={'alpha': 1, 'beta': 1, 'gamma': 1})
  with pytest.raises(ValueError, match='do not add up'):
    batches.set_state(bad)


def test_mixture_weights_are_respected():
  weights = {'alpha': 0.6, 'beta': 0.3, 'gamma': 0.1, 'delta': 0.0}
  sources = dict(_SOURCES, delta=_fake_source('delta', 2))
  batches = TaskBatches(sources, _TOK, batch_size=32, seq_len=32, seed=0, weights=weights)
  num_rows = 32 * 150
  counts = collections.Counter(batches.row_task(k, r) for k in range(150) for r in range(32))
  assert counts['delta'] == 0
  for name in ('alpha', 'beta', 'gamma'):
    p = weights[name]
    sigma = np.sqrt(num_rows * p * (1 - p))
    assert abs(counts[name] - num_rows * p) < 5 * sigma, (name, counts)
  for _ in range(3):
    next(batches)
  assert sum(batches.tasks.values()) == 96 and batches.tasks['delta'] == 0


@pytest.mark.parametrize(
  'kwargs, error, match',
  [
    (dict(weights={'alpha': 1.0}), ValueError, 'weights name tasks'),
    (dict(weights=[1.0, -1.0, 1.0]), ValueError, "weight of task 'beta'"),
    (dict(weights=[0.0, 0.0, 0.0]), ValueError, 'must not all be 0'),
    (dict(batch_size=0), ValueError, 'batch_size must be >= 1'),
    (dict(seq_len=2.5), TypeError, 'seq_len must be an int'),
  ],
)
def test_bad_arguments_raise(kwargs, error, match):
  settings = dict(batch_size=2, seq_len=32, seed=0)
  with pytest.raises(error, match=match):
    TaskBatches(_SOURCES, _TOK, **{**settings, **kwargs})


def test_too_long_example_raises_naming_it():
  batches = TaskBatches({'alpha': _SOURCES['alpha']}, _TOK, batch_size=2, seq_len=10)
  with pytest.raises(ValueError, match=r"task 'alpha' has \d+ tokens"):
    next(batches)


def test_real_tasks_batch_from_prepared_sources(tasks_dir):
  sources = {t: task_source(t, 'train', data_dir=tasks_dir) for t in _PREPARED}
  batches = TaskBatches(sources, _TOK, batch_size=64, seq_len=128, seed=0)
  batch = next(batches)
  assert batch['loss_mask'].sum() > 0
  assert sorted(batches.tasks) == sorted(_PREPARED)


def test_batches_shard_over_the_mesh(mesh8):
  from curvopt import train  # pylint: disable=g-import-not-at-top

  sharding = train.batch_sharding(mesh8)
  batch = next(TaskBatches(_SOURCES, _TOK, batch_size=16, seq_len=32, seed=0))
  placed = {k: train.put_global_batch(v, sharding) for k, v in batch.items()}
  for k, v in placed.items():
    assert len(v.addressable_shards) == 8
    np.testing.assert_array_equal(jax.device_get(v), batch[k])


# ------------------------------------------------------------------------ prompt_batch


def test_prompt_batch_left_pads_with_bos():
  examples = [{'prompt': 'Q: 1+2=?\n'}, 'Q: reverse abc\n', {'prompt': 'Q: é\n', 'answer': 'x'}]
  prompts, mask = prompt_batch(examples, _TOK, max_prompt_len=20)
  assert prompts.shape == mask.shape == (3, 20) and prompts.dtype == np.int32
  for row, example in enumerate(examples):
    text = example['prompt'] if isinstance(example, dict) else example
    ids = _TOK.encode(text, add_bos=True)
    np.testing.assert_array_equal(prompts[row, 20 - len(ids) :], ids)
    assert (prompts[row, : 20 - len(ids)] == _TOK.pad_id).all()
    np.testing.assert_array_equal(mask[row], np.arange(20) >= 20 - len(ids))
  with pytest.raises(ValueError, match=r'examples\[1\] prompt has 16 tokens'):
    prompt_batch(examples, _TOK, max_prompt_len=15)
  with pytest.raises(TypeError, match='sequence of examples'):
    prompt_batch('Q: 1+2=?\n', _TOK, max_prompt_len=20)


def test_prompt_batch_matches_task_batches_prompts():
  batches = TaskBatches(_SOURCES, _TOK, batch_size=4, seq_len=32, seed=0)
  batch = next(batches)
  # Rows drawn from one task read its positions 0, 1, ...: rebuild them in order.
  positions = collections.Counter()
  rows = []
  for r in range(4):
    name = batches.row_task(0, r)
    rows.append(batches.example_at(name, positions[name]))
    positions[name] += 1
  prompts, mask = prompt_batch(rows, _TOK, max_prompt_len=32)
  for r in range(4):
    n = int(batch['prompt_mask'][r].sum())
    np.testing.assert_array_equal(prompts[r][mask[r] == 1], batch['tokens'][r, :n])
