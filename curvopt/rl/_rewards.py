"""Verifiable rewards for RL on tasks with exact answers.

Answer format: a completion is a worked solution followed by a final line
`#### <answer>` (then EOS). A reward function follows TRL's protocol,
`fn(prompts, completions, answers) -> [N] float32`, so rewards compose and
swap by name.
"""

import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], np.ndarray]

_MARKER = '####'
# ASCII digits only: int() would also take '٧' or '1_000', and a digit count
# past sys.get_int_max_str_digits() would raise.
_INTEGER = re.compile(r'([+-]?)([0-9]+)')


def extract_answer(text: str) -> Optional[str]:
  """The final answer of a completion: what follows the last '####'.

  Args:
    text: the decoded completion.

  Returns:
    The text after the last '####' up to the first newline, stripped; None
    when there is no '####', nothing after it on that line, or `text` is not
    a string.
  """
  if not isinstance(text, str):
    return None
  cut = text.rfind(_MARKER)
  if cut < 0:
    return None
  answer = text[cut + len(_MARKER) :].split('\n', 1)[0].strip()
  return answer or None


def _canonical_integer(text: str) -> Optional[str]:
  """'-007' -> '-7', '+0' -> '0'; None if `text` is not an integer."""
  match = _INTEGER.fullmatch(text)
  if match is None:
    return None
  sign, digits = match.groups()
  digits = digits.lstrip('0') or '0'
  return '-' + digits if sign == '-' and digits != '0' else digits


def _as_text(value: Any) -> Optional[str]:
  """A str, or bytes decoded leniently; None for anything else."""
  if isinstance(value, str):
    return value
  if isinstance(value, (bytes, bytearray)):
    return bytes(value).decode('utf-8', errors='replace')
  return None


def _answer_matches(completion: Any, answer: Any) -> bool:
  predicted = extract_answer(_as_text(completion))
  answer = _as_text(answer)
  if predicted is None or answer is None:
    return False
  answer = answer.strip()
  target = _canonical_integer(answer)
  if target is None:
    return predicted == answer
  return _canonical_integer(predicted) == target


def _check_lengths(prompts: Any, completions: Any, answers: Any) -> int:
  lengths = {}
  for name, value in (('prompts', prompts), ('completions', completions), ('answers', answers)):
    if isinstance(value, (str, bytes)):
      raise TypeError(
        f'{name} must be a sequence of strings, got a single {type(value).__name__}: {value[:50]!r}'
      )
    try:
      lengths[name] = len(value)
    except TypeError as e:
      raise TypeError(f'{name} must be a sequence, got {type(value).__name__}') from e
  if len(set(lengths.values())) > 1:
    raise ValueError(f'prompts, completions and answers must have the same length, got {lengths}')
  return lengths['completions']


def exact_match_reward(
  prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
) -> np.ndarray:
  """1.0 where a completion's final answer equals the reference, else 0.0.

  The prediction is `extract_answer(completion)`, the reference
  `answer.strip()`. When the reference is an integer (ASCII digits with an
  optional sign) both compare as integers, so '007' and '+7' match '7' (but
  '7.0' does not); otherwise as strings. Anything malformed (no '####',
  nothing after it, None or non-string entries) scores 0.0; bytes are decoded
  as UTF-8 with replacement.

  Args:
    prompts: N prompts (unused, part of the protocol).
    completions: N decoded completions.
    answers: N reference answers.

  Returns:
    float32 [N] of 0.0 / 1.0.

  Raises:
    ValueError: the three sequences differ in length.
  """
  n = _check_lengths(prompts, completions, answers)
  return np.fromiter(
    (float(_answer_matches(c, a)) for c, a in zip(completions, answers)), dtype=np.float32, count=n
  )


_REWARD_FNS = {
  'exact_match': exact_match_reward,
}

REWARD_NAMES = tuple(sorted(_REWARD_FNS))


def reward_fn(name: str) -> RewardFn:
  """The reward function registered as `name` (see REWARD_NAMES)."""
  if name not in _REWARD_FNS:
    raise ValueError(f'unknown reward function {name!r}; valid: {list(REWARD_NAMES)}')
  return _REWARD_FNS[name]


def combine_rewards(fns: Sequence[RewardFn], weights: Optional[Sequence[float]] = None) -> RewardFn:
  """The weighted sum of reward functions, as one reward function.

  Args:
    fns: reward functions (or registered names, see `reward_fn`).
    weights: one finite weight per function; default all 1.

  Returns:
    `fn(prompts, completions, answers) -> float32 [N]`, which raises a
    ValueError naming the offending function when one returns anything but a
    finite [N] array.
  """
  fns = [reward_fn(f) if isinstance(f, str) else f for f in fns]
  if not fns:
    raise ValueError('combine_rewards needs at least one reward function')
  for f in fns:
    if not callable(f):
      raise TypeError(f'reward functions must be callable, got {f!r}')
  if weights is None:
    weights = [1.0] * len(fns)
  weights = [float(w) for w in weights]
  if len(weights) != len(fns):
    raise ValueError(f'got {len(weights)} weights for {len(fns)} reward functions: {weights}')
  if not all(np.isfinite(w) for w in weights):
    raise ValueError(f'reward weights must be finite, got {weights}')

  def combined(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
  ) -> np.ndarray:
    n = _check_lengths(prompts, completions, answers)
    total = np.zeros(n, np.float32)
    for f, w in zip(fns, weights):
      name = getattr(f, '__name__', repr(f))
      values = np.asarray(f(prompts, completions, answers))
      if values.shape != (n,):
        raise ValueError(f'reward function {name} returned shape {values.shape}, expected ({n},)')
      if values.dtype != np.bool_ and (
        not np.issubdtype(values.dtype, np.number)
        or np.issubdtype(values.dtype, np.complexfloating)
      ):
        raise ValueError(f'reward function {name} returned non-real dtype {values.dtype}')
      values = values.astype(np.float32)
      bad = np.flatnonzero(~np.isfinite(values))
      if bad.size:
        raise ValueError(
          f'reward function {name} returned non-finite '
          f'rewards {values[bad[:5]].tolist()} at indices '
          f'{bad[:5].tolist()}'
        )
      total += np.float32(w) * values
    return total

  return combined
