"""Random-access text sources over tfds data sets prepared as array_record (no TensorFlow)."""

from collections.abc import Sequence
import operator
import os

from absl import logging
import tensorflow_datasets as tfds

from curvopt.data import _code_corpus

# curvopt's own builders, by the name `text_source` knows them; prepared on first use.
_OWN_BUILDERS = {
  'code_corpus': _code_corpus.CodeCorpus,
}
_FILE_FORMAT = 'array_record'


def default_data_dir(workdir: str) -> str:
  """$TFDS_DATA_DIR if set, else `<workdir>/tfds`."""
  from_env = os.environ.get('TFDS_DATA_DIR')
  if from_env:
    return from_env
  return os.path.join(os.fspath(workdir), 'tfds')


class TextSource(Sequence):
  """`len(src)` records; `src[i]` is record i's text as a str (invalid UTF-8 replaced)."""

  def __init__(self, data_source, *, name: str, split: str, text_key: str = 'text'):
    self._data_source = data_source
    self.name = name
    self.split = split
    self.text_key = text_key
    self._len = len(data_source)

  def __len__(self) -> int:
    return self._len

  def record(self, index: int) -> dict:
    """Record `index` with all its features, as tfds decodes them (text as bytes)."""
    index = operator.index(index)  # numpy integers too; floats raise TypeError.
    if not -self._len <= index < self._len:
      raise IndexError(f'record {index} outside [0, {self._len}) of {self.name}/{self.split}')
    return self._data_source[index % self._len]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._len))]
    record = self.record(index)
    if self.text_key not in record:
      raise ValueError(
        f'{self.name}/{self.split} records have no {self.text_key!r} feature; they have '
        f'{sorted(record)}; pass text_key='
      )
    text = record[self.text_key]
    if isinstance(text, bytes):
      return text.decode('utf-8', errors='replace')
    return str(text)

  def __repr__(self) -> str:
    return f'TextSource({self.name}/{self.split}, {self._len} records)'


def _prepare_own_builder(builder_cls, config: str | None, data_dir: str | None):
  """Returns a prepared builder of one of our own data sets, preparing it if needed."""
  if config is not None and config not in builder_cls.builder_configs:
    raise ValueError(
      f'unknown config {config!r} of {builder_cls.name}; valid: '
      f'{sorted(builder_cls.builder_configs)}'
    )
  builder = builder_cls(config=config, data_dir=data_dir, file_format=_FILE_FORMAT)
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare(
      download_dir=os.path.join(os.fspath(builder.data_dir_root), 'downloads'),
      file_format=_FILE_FORMAT,
    )
  except OSError:
    # Another process (e.g. another host on a shared file system) may have finished
    # first: tfds' final rename onto its directory then fails here.
    builder = builder_cls(config=config, data_dir=data_dir, file_format=_FILE_FORMAT)
    if not builder.is_prepared():
      raise
    logging.info('%s was prepared concurrently by another process', builder.info.full_name)
  else:
    # Reload so that info (splits, sizes) is read back from the prepared files.
    builder = builder_cls(config=config, data_dir=data_dir, file_format=_FILE_FORMAT)
  return builder


def _prepared_tfds_builder(name: str, data_dir: str | None):
  """Returns the builder of a tfds data set already prepared under `data_dir`; never downloads."""
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    # tfds' own message lists hundreds of names; keep ours to the point.
    raise ValueError(
      f"unknown dataset {name!r}: not one of curvopt's ({sorted(_OWN_BUILDERS)}) and "
      f'not a tfds data set whose code or prepared files are found under '
      f'data_dir={data_dir!r}'
    ) from None
  if not builder.is_prepared():
    raise ValueError(
      f'dataset {name!r} is not prepared under {os.fspath(builder.data_dir)!r} and curvopt '
      f'never downloads; prepare it elsewhere with `tfds build {name} '
      f'--file_format={_FILE_FORMAT}` and copy it under data_dir={data_dir!r} '
      f'(or $TFDS_DATA_DIR)'
    )
  return builder


def text_source(
  name: str, split: str, *, data_dir: str | None = None, text_key: str = 'text'
) -> TextSource:
  """A random-access source of texts: `len(src)`, `src[i] -> str`.

  Args:
    name: 'code_corpus' (or 'code_corpus/mini'), prepared here on first use and reused
      after; any other name ('lm1b', 'c4/en', 'curvopt_code_corpus/mini', ...) is read
      through tfds' registry from files already prepared under `data_dir`.
    split: a split of the data set, e.g. 'train' or 'validation'.
    data_dir: the tfds data directory; None means tfds' default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    text_key: the feature holding the text.

  Returns:
    A TextSource over the split.

  Raises:
    ValueError: unknown name, config or split, or a data set that is not prepared (or not
      prepared as array_record).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'dataset name must be a non-empty str, got {name!r}')
  if data_dir is not None:
    data_dir = os.fspath(data_dir)
  base, _, config = name.partition('/')
  if base in _OWN_BUILDERS:
    builder = _prepare_own_builder(_OWN_BUILDERS[base], config or None, data_dir)
  else:
    builder = _prepared_tfds_builder(name, data_dir)
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(f'dataset {name!r} has no split {split!r}; valid: {sorted(splits)}')
  try:
    data_source = builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise ValueError(
      f'dataset {name!r} under {os.fspath(builder.data_dir)!r} is stored as '
      f'{builder.info.file_format}, which has no random access; prepare it with '
      f'--file_format={_FILE_FORMAT}'
    ) from e
  return TextSource(data_source, name=name, split=split, text_key=text_key)
