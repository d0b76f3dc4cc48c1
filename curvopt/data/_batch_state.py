"""Validation shared by the batch iterators: their options and their JSON resume states."""

import operator
from typing import Any, Iterable, Mapping


def positive_int(value, name: str) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f'{name} must be an int, got {type(value).__name__}: {value!r}') from None
  if value < 1:
    raise ValueError(f'{name} must be >= 1, got {value}')
  return value


def is_count(value) -> bool:
  """An int >= 0 (not a bool): what JSON gives back for a position or a batch count."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def source_id(source) -> str | None:
  """Names the source when it can say what it is (a TextSource), to catch swapped sources."""
  name, split = getattr(source, 'name', None), getattr(source, 'split', None)
  if isinstance(name, str) and isinstance(split, str):
    return f'{name}/{split}'
  return None


def check_state(
  state: Any, *, state_format: str, settings: Mapping[str, Any], fields: Iterable[str]
) -> None:
  """Raises unless `state` is a get_state() dict of this format, with these settings.

  `fields` are the state's own keys besides 'format' and the settings; their values are the
  caller's to check.
  """
  if not isinstance(state, dict):
    raise ValueError(f'state must be a dict from get_state(), got {type(state).__name__}')
  expected_keys = {'format', *fields, *settings}
  if set(state) != expected_keys:
    raise ValueError(
      f"state keys {sorted(state)} differ from get_state()'s {sorted(expected_keys)}"
    )
  if state['format'] != state_format:
    raise ValueError(f'state format {state["format"]!r} is not {state_format!r}')
  mismatched = {key: (state[key], value) for key, value in settings.items() if state[key] != value}
  if mismatched:
    details = ', '.join(f'{k}: state has {s!r}, this has {v!r}' for k, (s, v) in mismatched.items())
    raise ValueError(f'state was saved with other settings ({details})')
  if not is_count(state['num_batches']):
    raise ValueError(f'state num_batches must be an int >= 0, got {state["num_batches"]!r}')
