"""Verifiable rewards: extract_answer, exact_match_reward, combine_rewards, the registry."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from curvopt import rl

# (completion, answer, expected reward)
EXACT_MATCH_CASES = [
  ('3 + 4 = 7\n#### 7', '7', 1.0),
  ('3 + 4 = 7\n#### 7\n', '7', 1.0),
  ('#### 7', ' 7 \n', 1.0),
  ('work\n####   7   \nmore text after', '7', 1.0),
  ('#### 8\nwait, no\n#### 7', '7', 1.0),  # the last marker counts
  ('#### 7\nwait, no\n#### 8', '7', 0.0),
  ('#### 007', '7', 1.0),  # integers compare as integers
  ('#### +7', '7', 1.0),
  ('#### 7', '007', 1.0),
  ('#### -0', '0', 1.0),
  ('#### -7', '7', 0.0),
  ('#### -12', '-12', 1.0),
  ('#### 7.0', '7', 0.0),
  ('#### 7', '7.0', 0.0),
  ('#### 7.0', '7.0', 1.0),  # non-integers compare as strings
  ('#### 07.0', '7.0', 0.0),
  ('#### 1,000', '1000', 0.0),
  ('#### 1_000', '1000', 0.0),
  ('#### \u0667', '7', 0.0),  # Arabic-Indic seven: not an ASCII integer
  ('#### 7 apples', '7', 0.0),
  ('#### abc', 'abc', 1.0),
  ('#### ABC', 'abc', 0.0),
  ('the answer is 7', '7', 0.0),  # no marker
  ('#### ', '7', 0.0),  # nothing after the marker
  ('####\n7', '7', 0.0),  # the answer must be on the marker's line
  ('', '7', 0.0),
  ('#### 7', '', 0.0),
  ('#### ', '', 0.0),
  ('### 7', '7', 0.0),
  ('#####7', '7', 1.0),  # the last '####' starts at the second '#'
  ('#### 7\r\n', '7', 1.0),
  ('#### 7\ufffd', '7', 0.0),  # a replacement char from undecodable bytes
  ('\ud800 #### 7', '7', 1.0),  # a lone surrogate elsewhere is harmless
  ('#### ' + '9' * 10_000, '9' * 10_000, 1.0),  # past int()'s digit limit
  ('#### ' + '0' * 5_000 + '7', '7', 1.0),
  ('x' * 1_000_000 + '#### 7', '7', 1.0),
  (b'#### 7', '7', 1.0),  # bytes are decoded
  (b'#### \xff7', '7', 0.0),
  (None, '7', 0.0),
  ('#### 7', None, 0.0),
  (7, '7', 0.0),
  ('#### 7', 7, 0.0),
]


@pytest.mark.parametrize(
  'completion, answer, expected',
  EXACT_MATCH_CASES,
  ids=[f'case{i}' for i in range(len(EXACT_MATCH_CASES))],
)
def test_exact_match_cases(completion, answer, expected):
  got = rl.exact_match_reward(['prompt'], [completion], [answer])
  assert got.dtype == np.float32 and got.shape == (1,)
  assert got[0] == expected


def test_exact_match_batch_and_registry():
  completions = [c for c, _, _ in EXACT_MATCH_CASES]
  answers = [a for _, a, _ in EXACT_MATCH_CASES]
  want = np.asarray([e for _, _, e in EXACT_MATCH_CASES], np.float32)
  prompts = [''] * len(completions)
  np.testing.assert_array_equal(rl.exact_match_reward(prompts, completions, answers), want)
  fn = rl.reward_fn('exact_match')
  np.testing.assert_array_equal(fn(tuple(prompts), tuple(completions), tuple(answers)), want)
  assert rl.exact_match_reward([], [], []).shape == (0,)
  assert 'exact_match' in rl.REWARD_NAMES


# text -> extract_answer(text)
EXTRACT_CASES = {
  'a\n#### 42': '42',
  '#### 42\n#### 43 \nend': '43',
  'no marker': None,
  '####': None,
  '####   \nx': None,
  '#### a b #### c': 'c',
  '####x\ny': 'x',
}


@pytest.mark.parametrize('text', EXTRACT_CASES)
def test_extract_answer(text):
  assert rl.extract_answer(text) == EXTRACT_CASES[text]


def test_length_mismatch_and_bad_containers_raise():
  with pytest.raises(ValueError, match='same length'):
    rl.exact_match_reward(['p'], ['#### 1', '#### 2'], ['1', '2'])
  with pytest.raises(ValueError, match='same length'):
    rl.exact_match_reward(['p', 'q'], ['#### 1', '#### 2'], ['1'])
  with pytest.raises(TypeError, match='completions'):
    rl.exact_match_reward(['p'], '#### 1', ['1'])
  with pytest.raises(TypeError, match='answers'):
    rl.exact_match_reward(['p'], ['#### 1'], 1)


def test_unknown_reward_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match="'nope'.*exact_match"):
    rl.reward_fn('nope')
  with pytest.raises(ValueError, match='nope'):
    rl.combine_rewards(['nope'])


def _length_bonus(prompts, completions, answers):
  del prompts, answers
  return np.asarray([min(len(c), 10) / 10 for c in completions])


def test_combine_rewards_is_the_weighted_sum():
  completions = ['#### 7', 'long completion\n#### 8', '#### 9']
  answers, prompts = ['7', '7', '9'], [''] * 3
  combined = rl.combine_rewards(['exact_match', _length_bonus], weights=[2.0, -0.5])
  want = 2.0 * rl.exact_match_reward(prompts, completions, answers) - 0.5 * _length_bonus(
    prompts, completions, answers
  )
  got = combined(prompts, completions, answers)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(
    rl.combine_rewards([rl.exact_match_reward])(prompts, completions, answers), [1, 0, 1]
  )


# name -> (bad reward function, error message fragment)
BAD_FNS = {
  'nan': (lambda p, c, a: np.full(len(c), np.nan), 'non-finite'),
  'inf': (lambda p, c, a: np.asarray([0.0, np.inf]), 'non-finite'),
  'short': (lambda p, c, a: np.zeros(len(c) - 1), 'shape'),
  'scalar': (lambda p, c, a: 1.0, 'shape'),
  '2d': (lambda p, c, a: np.zeros((len(c), 1)), 'shape'),
  'strings': (lambda p, c, a: np.asarray(['1'] * len(c)), 'dtype'),
}


@pytest.mark.parametrize('name', BAD_FNS)
def test_combine_rewards_rejects_bad_outputs(name):
  fn, match = BAD_FNS[name]
  with pytest.raises(ValueError, match=match):
    rl.combine_rewards([fn])(['', ''], ['#### 1', '#### 2'], ['1', '2'])


def test_combine_rewards_validates_its_arguments():
  with pytest.raises(ValueError, match='at least one'):
    rl.combine_rewards([])
  with pytest.raises(ValueError, match='weights'):
    rl.combine_rewards(['exact_match'], weights=[1.0, 2.0])
  with pytest.raises(ValueError, match='finite'):
    rl.combine_rewards(['exact_match'], weights=[float('nan')])
  with pytest.raises(TypeError, match='callable'):
    rl.combine_rewards([3])
  with pytest.raises(ValueError, match='same length'):
    rl.combine_rewards(['exact_match'])([''], ['#### 1', '#### 2'], ['1', '2'])


_TEXT = st.one_of(
  st.text(),
  st.text(alphabet='#0123456789+-. \n\t\r7x', max_size=40),
  st.builds(lambda a, b: f'{a}#### {b}', st.text(max_size=20), st.text(max_size=20)),
  st.binary(max_size=40),
  st.none(),
  st.integers(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_TEXT, _TEXT, _TEXT), max_size=8))
def test_never_raises_and_always_zero_or_one(rows):
  prompts, completions, answers = (list(x) for x in zip(*rows)) if rows else ([], [], [])
  got = rl.exact_match_reward(prompts, completions, answers)
  assert got.shape == (len(rows),) and got.dtype == np.float32
  assert np.all((got == 0.0) | (got == 1.0))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30).filter(lambda s: '\n' not in s and '####' not in s), st.text())
def test_a_stated_answer_always_matches_itself(answer, prefix):
  if not answer.strip():
    return
  completion = f'{prefix}\n#### {answer}\n'
  assert rl.exact_match_reward([''], [completion], [answer])[0] == 1.0
