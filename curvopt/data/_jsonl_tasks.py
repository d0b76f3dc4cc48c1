"""GSM8K-style question / answer JSONL files as task examples.

One JSON object a line with a `question` and an `answer`, the answer a worked solution whose
last line is `#### <final answer>` (GSM8K's layout, e.g. its `train.jsonl` / `test.jsonl`).
Each line becomes {'prompt', 'completion', 'answer'} in the synthetic tasks' format, so the SFT
and RL trainers and the exact-match rewards read it unchanged.
"""

import json
import os
import re

# `task_source('jsonl:/dir', split)` reads /dir/<split>.jsonl.
JSONL_PREFIX = 'jsonl:'
# The synthetic tasks' prompt format, so that one model can be trained on both.
DEFAULT_PROMPT_TEMPLATE = 'Q: {question}\n'
_MARKER = '####'
_FIELDS = ('question', 'answer')
# A comma between digits followed by exactly three digits: GSM8K writes 1,000 as well as 1000.
_THOUSANDS = re.compile(r'(?<=\d),(?=\d{3}(?!\d))')


def check_prompt_template(template: str) -> str:
  """Returns `template` if `template.format(question=...)` works, else raises ValueError."""
  if not isinstance(template, str):
    raise TypeError(f'prompt_template must be a str, got {type(template).__name__}')
  try:
    filled = template.format(question='\0')
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(
      f'prompt_template {template!r} must be a str.format template whose only field is '
      f'{{question}} (double other braces): {e!r}'
    ) from None
  if '\0' not in filled:
    raise ValueError(f'prompt_template {template!r} has no {{question}} field')
  return template


def split_answer(text: str) -> tuple[str, str]:
  """(worked solution, final answer) of a GSM8K answer; ValueError without a final answer.

  The final answer is what follows the last '####' (one line), stripped, with thousands
  commas removed ('1,000' -> '1000'): the form the exact-match rewards compare against.
  """
  cut = text.rfind(_MARKER)
  if cut < 0:
    raise ValueError(f"answer has no '{_MARKER} <answer>' line: {text[-80:]!r}")
  final = text[cut + len(_MARKER) :].strip()
  if not final:
    raise ValueError(f"answer has nothing after its last '{_MARKER}': {text[-80:]!r}")
  if '\n' in final:
    raise ValueError(f"answer has more than one line after its last '{_MARKER}': {final!r:.80}")
  return text[:cut].rstrip(), _THOUSANDS.sub('', final)


def _example(record, template: str) -> dict[str, str]:
  if not isinstance(record, dict):
    raise ValueError(
      f'expected a JSON object with {list(_FIELDS)}, got a {type(record).__name__}: {record!r:.80}'
    )
  for field in _FIELDS:
    if field not in record:
      raise ValueError(f'no {field!r} field (the object has {sorted(record)})')
    if not isinstance(record[field], str):
      raise ValueError(f'{field!r} must be a string, got {type(record[field]).__name__}')
  solution, answer = split_answer(record['answer'])
  return {
    'prompt': template.format(question=record['question'].strip()),
    # The solution with its final line in the canonical form the reward extracts.
    'completion': f'{solution}\n{_MARKER} {answer}' if solution else f'{_MARKER} {answer}',
    'answer': answer,
  }


def read_jsonl_tasks(
  path: str, *, prompt_template: str = DEFAULT_PROMPT_TEMPLATE
) -> list[dict[str, str]]:
  """The examples of one GSM8K-style JSONL file, in file order (blank lines are skipped).

  Args:
    path: a `.jsonl` file of {"question": str, "answer": str} objects.
    prompt_template: each prompt is `prompt_template.format(question=...)`.

  Returns:
    [{'prompt', 'completion', 'answer'}, ...]: the completion is the worked solution ending in
    the line `#### <answer>`; the answer is the text after GSM8K's '####', commas removed.

  Raises:
    ValueError: a missing or empty file, or a line that is not JSON, not an object, lacks a
      string `question` or `answer`, or whose answer has no '#### <answer>' line; the message
      names the file and the line number.
  """
  path = os.fspath(path)
  check_prompt_template(prompt_template)
  if not os.path.isfile(path):
    raise ValueError(f'no JSONL file {path}')
  examples = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not valid JSON ({e})') from None
      try:
        examples.append(_example(record, prompt_template))
      except ValueError as e:
        raise ValueError(f'{path}:{number}: {e}') from None
  if not examples:
    raise ValueError(f'{path} holds no examples')
  return examples
