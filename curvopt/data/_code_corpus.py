"""tfds builder over the running interpreter's standard-library `.py` files."""

import hashlib
import os
import platform
import sysconfig

import tensorflow_datasets as tfds

# Out of every _SPLIT_BUCKETS hash buckets, this many go to validation (~3%).
_SPLIT_BUCKETS = 10_000
_VALIDATION_BUCKETS = 300
_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})

# The 'mini' config: small files, taken in hash order until each split's byte budget is
# reached, so that both splits are non-empty and the build takes about a second.
_MINI_MAX_FILE_BYTES = 16_384
_MINI_SPLIT_BYTES = {'train': 256_000, 'validation': 40_000}


def stdlib_root() -> str:
  """The standard-library directory of the running interpreter."""
  return sysconfig.get_paths()['stdlib']


def _path_digest(relpath: str) -> bytes:
  # sha256 rather than hash(): the split must not depend on PYTHONHASHSEED or machine.
  return hashlib.sha256(relpath.encode('utf-8')).digest()


def split_of(relpath: str) -> str:
  """'train' or 'validation' for a corpus file, from a stable hash of its relative path."""
  bucket = int.from_bytes(_path_digest(relpath)[:8], 'big') % _SPLIT_BUCKETS
  return 'validation' if bucket < _VALIDATION_BUCKETS else 'train'


def list_stdlib_files(root: str | None = None) -> list[str]:
  """Sorted relative ('/'-separated) paths of every `.py` file under the stdlib root."""
  root = stdlib_root() if root is None else root
  relpaths = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Installed packages are not the standard library and vary between machines.
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for filename in filenames:
      if filename.endswith('.py'):
        relpath = os.path.relpath(os.path.join(dirpath, filename), root)
        relpaths.append(relpath.replace(os.sep, '/'))
  return sorted(relpaths)


def corpus_files(config_name: str, root: str | None = None) -> dict[str, list[str]]:
  """{'train': [...], 'validation': [...]}: the relative paths a config holds, sorted."""
  root = stdlib_root() if root is None else root
  relpaths = list_stdlib_files(root)
  if config_name == 'full':
    chosen = relpaths
  elif config_name == 'mini':
    budget = dict(_MINI_SPLIT_BYTES)
    chosen = []
    for relpath in sorted(relpaths, key=_path_digest):
      size = os.path.getsize(os.path.join(root, relpath))
      split = split_of(relpath)
      if size <= _MINI_MAX_FILE_BYTES and size <= budget[split]:
        chosen.append(relpath)
        budget[split] -= size
  else:
    raise ValueError(f"unknown code corpus config {config_name!r}; valid: 'full', 'mini'")
  files = {'train': [], 'validation': []}
  for relpath in sorted(chosen):
    files[split_of(relpath)].append(relpath)
  return files


def read_source_file(path: str) -> str:
  """The text of a source file; bytes that are not valid UTF-8 become U+FFFD."""
  with open(path, 'rb') as f:
    return f.read().decode('utf-8', errors='replace')


class CodeCorpus(tfds.core.GeneratorBasedBuilder):
  """The `.py` files of the running interpreter's standard library (no site-packages)."""

  name = 'curvopt_code_corpus'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name='full', description='Every stdlib .py file (about 30 MB).'),
    tfds.core.BuilderConfig(
      name='mini', description='A fixed subset of small files (about 300 KB), for tests.'
    ),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'full'

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'Python standard-library source files of the interpreter that prepared the '
        'data set, split into train / validation by a sha256 hash of the relative path.'
      ),
      features=tfds.features.FeaturesDict(
        {
          'path': tfds.features.Text(),
          'text': tfds.features.Text(),
        }
      ),
      # Which interpreter produced the files; another Python version gives another corpus.
      metadata=tfds.core.MetadataDict(
        python_version=platform.python_version(), stdlib_root=stdlib_root()
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    root = stdlib_root()
    files = corpus_files(self.builder_config.name, root)
    # tfds refuses to write an empty split (possible for a tiny or unusual stdlib tree).
    return {
      split: self._generate_examples(root, relpaths)
      for split, relpaths in files.items()
      if relpaths
    }

  def _generate_examples(self, root, relpaths):
    for relpath in relpaths:
      yield relpath, {'path': relpath, 'text': read_source_file(os.path.join(root, relpath))}
