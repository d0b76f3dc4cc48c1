"""GSM8K-style JSONL task files: jsonl_task_source, task_source('jsonl:...'), their errors."""

import json
import os

import numpy as np
import pytest

from curvopt import data
from curvopt import rl

# Two lines in GSM8K's own layout (calculator annotations, a thousands comma after '####').
GSM8K = [
  {
    'question': 'Natalia sold clips to 48 of her friends in April, and then she sold half as '
    'many clips in May. How many clips did Natalia sell altogether in April and May?',
    'answer': 'Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n'
    'Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72',
  },
  {
    'question': 'A shop sells 1,250 pens a day for 4 days. How many pens does it sell? ',
    'answer': 'It sells 1,250*4 = <<1250*4=5000>>5,000 pens.\n#### 5,000',
  },
]
TEST = [{'question': 'What is 2 + 3?', 'answer': '2 + 3 = <<2+3=5>>5\n#### 5'}]


def _write(path, records):
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) + '\n')


@pytest.fixture
def gsm8k_dir(tmp_path):
  _write(tmp_path / 'train.jsonl', GSM8K)
  _write(tmp_path / 'test.jsonl', TEST)
  return str(tmp_path)


def test_examples_in_the_task_format(gsm8k_dir):
  src = data.jsonl_task_source(gsm8k_dir, 'train')
  assert isinstance(src, data.TaskSource) and len(src) == 2
  assert (src.name, src.split) == (f'jsonl:{gsm8k_dir}', 'train')
  assert src[0] == {
    'prompt': f'Q: {GSM8K[0]["question"]}\n',
    'completion': GSM8K[0]['answer'],
    'answer': '72',
  }
  # The final answer loses its thousands comma, in the answer and on the '####' line; the
  # worked solution keeps its text; the question is stripped.
  assert src[1] == {
    'prompt': 'Q: A shop sells 1,250 pens a day for 4 days. How many pens does it sell?\n',
    'completion': 'It sells 1,250*4 = <<1250*4=5000>>5,000 pens.\n#### 5000',
    'answer': '5000',
  }
  assert src[-1] == src[1] and src[:] == [src[0], src[1]]
  assert len(data.jsonl_task_source(gsm8k_dir, 'test')) == 1


def test_rewards_read_the_completions(gsm8k_dir):
  src = data.jsonl_task_source(gsm8k_dir, 'train')
  examples = src[:]
  assert [rl.extract_answer(e['completion']) for e in examples] == ['72', '5000']
  rewards = rl.exact_match_reward(
    [e['prompt'] for e in examples], [e['completion'] for e in examples], ['72', '5000']
  )
  np.testing.assert_array_equal(rewards, [1.0, 1.0])


def test_task_source_reads_jsonl_names(gsm8k_dir):
  for split in ('train', 'test'):
    via_name = data.task_source(data.JSONL_PREFIX + gsm8k_dir, split, data_dir='/ignored')
    direct = data.jsonl_task_source(gsm8k_dir, split)
    assert via_name[:] == direct[:] and via_name.name == direct.name


def test_prompt_template(gsm8k_dir):
  src = data.jsonl_task_source(
    gsm8k_dir, 'test', prompt_template='Question: {question}\nAnswer with {{#### n}}.\n'
  )
  assert src[0]['prompt'] == 'Question: What is 2 + 3?\nAnswer with {#### n}.\n'


def test_blank_lines_are_skipped(tmp_path):
  _write(tmp_path / 'train.jsonl', ['', json.dumps(TEST[0]), '   '])
  assert len(data.jsonl_task_source(str(tmp_path), 'train')) == 1


# (lines of train.jsonl, error fragment): each names the file and the line.
BAD_LINES = [
  (['{"question": "q", "answer": "a #### 1"', ''], r'train\.jsonl:1: not valid JSON'),
  ([TEST[0], '[1, 2]'], r"train\.jsonl:2: expected a JSON object with \['question', 'answer'\]"),
  ([{'answer': '#### 1'}], r"train\.jsonl:1: no 'question' field \(the object has \['answer'\]\)"),
  ([TEST[0], '', {'question': 'q'}], r"train\.jsonl:3: no 'answer' field"),
  ([{'question': 'q', 'answer': 7}], r"train\.jsonl:1: 'answer' must be a string, got int"),
  ([{'question': 'q', 'answer': 'it is 7'}], r"train\.jsonl:1: answer has no '#### <answer>' line"),
  ([{'question': 'q', 'answer': 'it is 7\n#### '}], r'train\.jsonl:1: answer has nothing after'),
  ([{'question': 'q', 'answer': '#### 7\nmore'}], r'train\.jsonl:1: answer has more than one line'),
  ([''], r'train\.jsonl holds no examples'),
]


@pytest.mark.parametrize('lines,fragment', BAD_LINES)
def test_bad_lines_raise_naming_file_and_line(lines, fragment, tmp_path):
  _write(tmp_path / 'train.jsonl', lines)
  with pytest.raises(ValueError, match=fragment):
    data.jsonl_task_source(str(tmp_path), 'train')


# (task name relative to tmp_path, split, error fragment)
BAD_SOURCES = [
  ('', 'train', "names no directory; use 'jsonl:/path/to/dir'"),
  ('nowhere', 'train', 'nowhere is not found; it must be a directory holding <split>.jsonl'),
  ('train.jsonl', 'train', 'train.jsonl is a file; it must be a directory'),
  ('.', 'validation', r"no split 'validation': no file .*validation\.jsonl; valid: \['test', "),
]


@pytest.mark.parametrize('relative,split,fragment', BAD_SOURCES)
def test_bad_sources_raise(relative, split, fragment, gsm8k_dir):
  name = data.JSONL_PREFIX + (os.path.join(gsm8k_dir, relative) if relative else '')
  with pytest.raises(ValueError, match=fragment):
    data.task_source(name, split)


@pytest.mark.parametrize(
  'template,fragment',
  [('Q: {q}\n', 'only field is {question}'), ('Q:\n', 'has no {question} field')],
)
def test_bad_templates_raise(template, fragment, gsm8k_dir):
  with pytest.raises(ValueError, match=fragment):
    data.jsonl_task_source(gsm8k_dir, 'train', prompt_template=template)


def test_unknown_task_names_the_jsonl_form():
  with pytest.raises(ValueError, match=r"unknown task 'gsm8k'; .* or 'jsonl:/path/to/dir'"):
    data.task_source('gsm8k', 'train')
