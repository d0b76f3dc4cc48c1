"""Deterministic generators of the synthetic exact-match tasks (pure Python, no tfds).

Every example is {'prompt', 'completion', 'answer'} with
  prompt     = 'Q: ...\n'
  completion = worked solution lines, then a final line '#### <answer>' (nothing after it:
               the tokenizer adds EOS),
so a verifier compares the text after the last '#### ' with `answer` exactly.
Splits are generated from fixed seeds; test prompts never occur in train.
"""

import functools
import hashlib
import random
from typing import Callable

TASK_NAMES = ('arithmetic', 'reversal', 'sorting', 'kv_recall', 'format')
SPLIT_SIZES = {'train': 20_000, 'test': 500}
ANSWER_PREFIX = '#### '

# arithmetic: how many operations an expression has (drawn uniformly) and the operand
# range; every intermediate value stays in [0, _ARITH_MAX_VALUE] so no step is negative or
# longer than two digits. Tuned so a ~1M-parameter byte model fine-tuned for a few hundred
# steps solves a minority of them (room for RL to improve).
_ARITH_NUM_OPS = (2, 3, 4)
# The difficulty knob: 'arithmetic_ops{lo}-{hi}' draws lo..hi operations ('arithmetic_ops{n}'
# exactly n). A range must reach 3 operations (only ~200 distinct 1-operation and ~8,700
# 2-operation prompts exist, too few for the 20,500 a task's splits need) and stop at 4
# (5 operations outgrow the SFT configs' 64-token rows).
_ARITH_RANGES = ((1, 3), (1, 4), (2, 3), (3, 3), (3, 4), (4, 4))
_ARITH_OPERANDS = (1, 9)
_ARITH_MAX_VALUE = 99
_OPS = {'+': (1, lambda a, b: a + b), '-': (1, lambda a, b: a - b), '*': (2, lambda a, b: a * b)}

_LETTERS = 'abcdefghijklmnopqrstuvwxyz'
_SORT_WORDS = (
  'ant',
  'bee',
  'cat',
  'dog',
  'elk',
  'fig',
  'gnu',
  'hen',
  'ink',
  'jam',
  'kit',
  'log',
  'map',
  'net',
  'owl',
  'pig',
  'rat',
  'sun',
  'tea',
  'urn',
  'van',
  'wax',
  'yak',
  'zip',
  'arc',
  'bat',
  'cow',
  'den',
  'eel',
  'fox',
  'gum',
  'hat',
  'ice',
  'jet',
  'key',
  'lid',
  'mud',
  'nut',
  'oak',
  'pen',
)

# kv_recall: a fixed table of made-up countries and capitals, asked in these phrasings.
# Each key's train examples use all but _KV_HELD_OUT of them; its test examples use the
# held-out ones, so the test split asks known facts in phrasings seen with other keys.
_KV_NUM_KEYS = 128
_KV_HELD_OUT = 2
_KV_PHRASINGS = (
  'Q: capital of {k}?\n',
  'Q: What is the capital of {k}?\n',
  'Q: {k} has which capital?\n',
  'Q: Name the capital of {k}.\n',
  'Q: {k}: capital?\n',
  'Q: Which city is the capital of {k}?\n',
)
_SYLLABLE_ONSETS = (
  'b',
  'd',
  'f',
  'g',
  'k',
  'l',
  'm',
  'n',
  'p',
  'r',
  's',
  't',
  'v',
  'z',
  'br',
  'tr',
  'st',
  'kl',
  'gr',
  'sh',
)
_SYLLABLE_VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ou')
_COUNTRY_ENDINGS = ('ia', 'land', 'stan', 'ora', 'ania', 'mark')

# format: fill the single '_' of a template with a word.
_FORMAT_KEYS = ('id', 'name', 'city', 'tag', 'key', 'item', 'code', 'user')


def _rng(*parts) -> random.Random:
  # sha256 of the parts: the same stream on every machine, Python version and hash seed.
  digest = hashlib.sha256('/'.join(str(p) for p in ('curvopt_tasks',) + parts).encode())
  return random.Random(int.from_bytes(digest.digest()[:8], 'big'))


def _example(prompt: str, steps: list[str], answer: str) -> dict[str, str]:
  return {
    'prompt': prompt,
    'completion': ''.join(s + '\n' for s in steps) + ANSWER_PREFIX + answer,
    'answer': answer,
  }


# ---------------------------------------------------------------------------- arithmetic


def _arith_tree(rng: random.Random, num_ops: int):
  """A random binary tree with `num_ops` internal nodes; leaves are operand ints."""
  if num_ops == 0:
    return rng.randint(*_ARITH_OPERANDS)
  left_ops = rng.randint(0, num_ops - 1)
  return (rng.choice('+-*'), _arith_tree(rng, left_ops), _arith_tree(rng, num_ops - 1 - left_ops))


def _render(node) -> tuple[str, int]:
  """(text, precedence); a right operand of equal precedence is parenthesized, so Python's
  left-to-right evaluation visits the operations in the tree's post-order."""
  if isinstance(node, int):
    return str(node), 3
  op, left, right = node
  prec = _OPS[op][0]
  left_text, left_prec = _render(left)
  right_text, right_prec = _render(right)
  if left_prec < prec:
    left_text = f'({left_text})'
  if right_prec <= prec:
    right_text = f'({right_text})'
  return f'{left_text}{op}{right_text}', prec


def _evaluate(node, steps: list[str]) -> int | None:
  """Value of the tree, appending 'a<op>b=c' per operation in post-order; None if out of range."""
  if isinstance(node, int):
    return node
  op, left, right = node
  a = _evaluate(left, steps)
  b = _evaluate(right, steps) if a is not None else None
  if b is None:
    return None
  value = _OPS[op][1](a, b)
  if not 0 <= value <= _ARITH_MAX_VALUE:
    return None
  steps.append(f'{a}{op}{b}={value}')
  return value


def arithmetic_example(
  rng: random.Random, num_ops: tuple[int, ...] = _ARITH_NUM_OPS
) -> dict[str, str]:
  """An expression of rng.choice(num_ops) operations, its worked solution and value."""
  while True:
    tree = _arith_tree(rng, rng.choice(num_ops))
    steps = []
    value = _evaluate(tree, steps)
    if value is not None:
      return _example(f'Q: {_render(tree)[0]}=?\n', steps, str(value))


def arithmetic_task(min_ops: int, max_ops: int) -> str:
  """The task name of arithmetic with min_ops..max_ops operations a prompt.

  2..4 is 'arithmetic' itself; the other valid ranges are those of ARITHMETIC_TASKS.
  """
  if (min_ops, max_ops) == (_ARITH_NUM_OPS[0], _ARITH_NUM_OPS[-1]):
    return 'arithmetic'
  if (min_ops, max_ops) not in _ARITH_RANGES:
    raise ValueError(
      f'no arithmetic task with {min_ops}..{max_ops} operations; valid (min_ops, max_ops): '
      f'{sorted(_ARITH_RANGES + ((2, 4),))}'
    )
  return f'arithmetic_ops{min_ops}' + (f'-{max_ops}' if max_ops != min_ops else '')


def arithmetic_num_ops(task: str) -> tuple[int, ...]:
  """The operation counts an arithmetic task draws from (ValueError for other tasks)."""
  if task == 'arithmetic':
    return _ARITH_NUM_OPS
  for low, high in _ARITH_RANGES:
    if task == arithmetic_task(low, high):
      return tuple(range(low, high + 1))
  raise ValueError(f'{task!r} is not an arithmetic task; valid: {list(ARITHMETIC_TASKS)}')


ARITHMETIC_TASKS = ('arithmetic',) + tuple(arithmetic_task(lo, hi) for lo, hi in _ARITH_RANGES)


# ------------------------------------------------------------------- reversal and sorting


def reversal_example(rng: random.Random) -> dict[str, str]:
  word = ''.join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 9)))
  answer = word[::-1]
  return _example(f'Q: reverse {word}\n', [' '.join(answer)], answer)


def sorting_example(rng: random.Random) -> dict[str, str]:
  if rng.random() < 0.5:
    items = [str(rng.randint(0, 9)) for _ in range(rng.randint(4, 7))]
  else:
    items = rng.sample(_SORT_WORDS, rng.randint(3, 5))
  answer = ' '.join(sorted(items))
  return _example(f'Q: sort {" ".join(items)}\n', [f'n={len(items)}'], answer)


# --------------------------------------------------------------------------- kv_recall


def _syllables(rng: random.Random, count: int) -> str:
  return ''.join(rng.choice(_SYLLABLE_ONSETS) + rng.choice(_SYLLABLE_VOWELS) for _ in range(count))


def kv_table() -> list[tuple[str, str, tuple[int, ...]]]:
  """The fixed facts: (country, capital, held-out phrasing indices) for every key."""
  rng = _rng('kv_recall', 'table')
  countries, capitals, table = set(), set(), []
  while len(table) < _KV_NUM_KEYS:
    country = (_syllables(rng, rng.randint(1, 2)) + rng.choice(_COUNTRY_ENDINGS)).capitalize()
    capital = _syllables(rng, rng.randint(2, 3)).capitalize()
    if country in countries or capital in capitals:
      continue
    countries.add(country)
    capitals.add(capital)
    held_out = tuple(sorted(rng.sample(range(len(_KV_PHRASINGS)), _KV_HELD_OUT)))
    table.append((country, capital, held_out))
  return table


def _kv_example(country: str, capital: str, phrasing: int) -> dict[str, str]:
  return _example(
    _KV_PHRASINGS[phrasing].format(k=country), [f'The capital of {country} is {capital}.'], capital
  )


def kv_recall_examples(split: str, size: int) -> list[dict[str, str]]:
  """Train: `size` draws over (key, seen phrasing); test: every (key, held-out phrasing)."""
  table = kv_table()
  if split == 'test':
    pairs = [(c, v, p) for c, v, held in table for p in held]
    _rng('kv_recall', 'test').shuffle(pairs)
    return [_kv_example(*pair) for pair in pairs[:size]]
  pairs = [(c, v, p) for c, v, held in table for p in range(len(_KV_PHRASINGS)) if p not in held]
  rng = _rng('kv_recall', split)
  return [_kv_example(*rng.choice(pairs)) for _ in range(size)]


# ------------------------------------------------------------------------------ format


def _format_template(rng: random.Random) -> str:
  key = rng.choice(_FORMAT_KEYS)
  return rng.choice(
    (
      '{"%s": "_"}' % key,
      f'<{key}>_</{key}>',
      f'[{key}=_]',
      f'{key}: _;',
      f'({key} _)',
      f'{key.upper()}="_"',
    )
  )


def format_example(rng: random.Random) -> dict[str, str]:
  template = _format_template(rng)
  word = ''.join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 7)))
  return _example(
    f'Q: fill {template} with {word}\n', [f'value {word}'], template.replace('_', word)
  )


# ------------------------------------------------------------------------------ splits

_GENERATORS: dict[str, Callable[[random.Random], dict[str, str]]] = {
  'arithmetic': arithmetic_example,
  'reversal': reversal_example,
  'sorting': sorting_example,
  'format': format_example,
  **{
    task: functools.partial(arithmetic_example, num_ops=arithmetic_num_ops(task))
    for task in ARITHMETIC_TASKS[1:]
  },
}
# Every name a task split can be generated for: the capabilities, then arithmetic's variants.
ALL_TASKS = TASK_NAMES + ARITHMETIC_TASKS[1:]


def generate_split(task: str, split: str, size: int | None = None) -> list[dict[str, str]]:
  """The examples of one split, in order; deterministic. Test prompts are unique and
  never occur in train (train prompts are unique too, except kv_recall's, which repeat
  its fixed facts)."""
  if task not in ALL_TASKS:
    raise ValueError(f'unknown task {task!r}; valid: {list(ALL_TASKS)}')
  if split not in SPLIT_SIZES:
    raise ValueError(f'unknown split {split!r} of task {task!r}; valid: {sorted(SPLIT_SIZES)}')
  size = SPLIT_SIZES[split] if size is None else size
  if task == 'kv_recall':
    return kv_recall_examples(split, size)
  generator = _GENERATORS[task]
  # Train rejects the test split's prompts, so test is generated first whatever is asked.
  taken = set()
  if split == 'train':
    taken = {e['prompt'] for e in generate_split(task, 'test')}
  rng = _rng(task, split)
  examples = []
  attempts = 0
  while len(examples) < size:
    attempts += 1
    if attempts > 50 * size + 1000:
      raise ValueError(f'task {task!r} cannot produce {size} distinct {split} prompts')
    example = generator(rng)
    if example['prompt'] not in taken:
      taken.add(example['prompt'])
      examples.append(example)
  return examples
