"""The synthetic tasks as a tfds data set (one config per task), GSM8K-style JSONL files on disk,
and random access to either."""

from collections.abc import Sequence
import operator
import os

import tensorflow_datasets as tfds

from curvopt.data import _jsonl_tasks
from curvopt.data import _sources
from curvopt.data import _task_generators

TASK_NAMES = _task_generators.TASK_NAMES
ARITHMETIC_TASKS = _task_generators.ARITHMETIC_TASKS
ALL_TASKS = _task_generators.ALL_TASKS
arithmetic_task = _task_generators.arithmetic_task
JSONL_PREFIX = _jsonl_tasks.JSONL_PREFIX
_FIELDS = ('prompt', 'completion', 'answer')


class CurvoptTasks(tfds.core.GeneratorBasedBuilder):
  """Synthetic exact-match tasks; each config is one task with train and test splits."""

  name = 'curvopt_tasks'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=task, description=f'The {task} task.') for task in ALL_TASKS
  ]
  DEFAULT_BUILDER_CONFIG_NAME = TASK_NAMES[0]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'Generated from fixed seeds: a prompt "Q: ...\\n", a completion of worked '
        'solution lines ending in a line "#### <answer>", and the answer string that '
        'exact match compares. No test prompt occurs in train.'
      ),
      features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in _FIELDS}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in ('train', 'test')}

  def _generate_examples(self, split):
    for i, example in enumerate(_task_generators.generate_split(self.builder_config.name, split)):
      yield i, example


class TaskSource(Sequence):
  """`len(src)` examples; `src[i]` is {'prompt', 'completion', 'answer'} as str."""

  def __init__(self, data_source, *, name: str, split: str):
    self._data_source = data_source
    self.name = name
    self.split = split
    self._len = len(data_source)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._len))]
    index = operator.index(index)
    if not -self._len <= index < self._len:
      raise IndexError(f'example {index} outside [0, {self._len}) of {self.name}/{self.split}')
    record = self._data_source[index % self._len]
    return {
      k: v.decode('utf-8') if isinstance(v, bytes) else str(v)
      for k, v in record.items()
      if k in _FIELDS
    }

  def __repr__(self) -> str:
    return f'TaskSource({self.name}/{self.split}, {self._len} examples)'


def jsonl_task_source(
  directory: str,
  split: str,
  *,
  prompt_template: str = _jsonl_tasks.DEFAULT_PROMPT_TEMPLATE,
) -> TaskSource:
  """The examples of `<directory>/<split>.jsonl`, a GSM8K-style question / answer file.

  A directory holds one file per split, named as GSM8K names them: `train.jsonl` and
  `test.jsonl` (any `<split>.jsonl` is a split). Each line is {"question": ..., "answer": ...},
  the answer a worked solution ending in a line `#### <answer>`; see `read_jsonl_tasks` for
  what an example becomes. The whole file is read into memory (GSM8K's train split is 7,473
  lines, 4 MB).

  Args:
    directory: the directory of the split files.
    split: the file name without `.jsonl`.
    prompt_template: each prompt is `prompt_template.format(question=...)`; the default is
      the synthetic tasks' 'Q: {question}\\n'.

  Returns:
    A TaskSource named f'jsonl:{directory}'.

  Raises:
    ValueError: `directory` is not a directory, it has no `<split>.jsonl`, or a line of that
      file is malformed (the message names the file and line).
  """
  directory = os.fspath(directory)
  name = JSONL_PREFIX + directory
  if not directory:
    raise ValueError(f"task {name!r} names no directory; use 'jsonl:/path/to/dir'")
  if not os.path.isdir(directory):
    what = 'a file' if os.path.exists(directory) else 'not found'
    raise ValueError(
      f'task {name!r}: {directory} is {what}; it must be a directory holding <split>.jsonl '
      'files (train.jsonl, test.jsonl)'
    )
  path = os.path.join(directory, f'{split}.jsonl')
  if not os.path.isfile(path):
    splits = sorted(f[: -len('.jsonl')] for f in os.listdir(directory) if f.endswith('.jsonl'))
    raise ValueError(f'task {name!r} has no split {split!r}: no file {path}; valid: {splits}')
  examples = _jsonl_tasks.read_jsonl_tasks(path, prompt_template=prompt_template)
  return TaskSource(examples, name=name, split=split)


def task_source(name: str, split: str, *, data_dir: str | None = None) -> TaskSource:
  """A random-access source of one task's examples, prepared under `data_dir` on first use.

  Args:
    name: one of TASK_NAMES ('arithmetic', 'reversal', 'sorting', 'kv_recall', 'format'), or
      an arithmetic difficulty of ARITHMETIC_TASKS (e.g. 'arithmetic_ops2-3', see
      `arithmetic_task`), or 'jsonl:/path/to/dir': GSM8K-style `<split>.jsonl` files read by
      `jsonl_task_source` with its default prompt template.
    split: 'train' or 'test'.
    data_dir: the tfds data directory; None means tfds' default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets). A 'jsonl:' task ignores it.

  Raises:
    ValueError: unknown task or split.
  """
  if isinstance(name, str) and name.startswith(JSONL_PREFIX):
    return jsonl_task_source(name[len(JSONL_PREFIX) :], split)
  if name not in ALL_TASKS:
    raise ValueError(
      f"unknown task {name!r}; valid: {list(ALL_TASKS)} or '{JSONL_PREFIX}/path/to/dir'"
    )
  if data_dir is not None:
    data_dir = os.fspath(data_dir)
  builder = _sources._prepare_own_builder(CurvoptTasks, name, data_dir)  # pylint: disable=protected-access
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(f'task {name!r} has no split {split!r}; valid: {sorted(splits)}')
  return TaskSource(builder.as_data_source(split=split), name=name, split=split)
