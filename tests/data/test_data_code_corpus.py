"""The code corpus builder, its splits, and text_source (only the 'mini' config is prepared)."""

import os

import pytest

from curvopt.data import TextSource
from curvopt.data import _code_corpus
from curvopt.data import default_data_dir
from curvopt.data import text_source

_SPLITS = ('train', 'validation')


def _records(data_dir, name='code_corpus/mini'):
  """{split: [(path, text), ...]} in the prepared data set's record order."""
  out = {}
  for split in _SPLITS:
    src = text_source(name, split, data_dir=data_dir)
    paths = [src.record(i)['path'].decode() for i in range(len(src))]
    out[split] = list(zip(paths, [src[i] for i in range(len(src))]))
  return out


@pytest.fixture(scope='module')
def mini_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds_a'))
  text_source('code_corpus/mini', 'train', data_dir=data_dir)
  return data_dir


def test_split_golden_values_are_stable():
  # Pinned: a change would silently move files between splits for existing runs.
  assert _code_corpus.split_of('os.py') == 'train'
  assert _code_corpus.split_of('asyncio/tasks.py') == 'train'
  assert _code_corpus.split_of('collections/abc.py') == 'validation'
  assert _code_corpus.split_of('test/test_unpack_ex.py') == 'validation'


def test_full_split_is_disjoint_covers_every_file_and_is_about_3_percent():
  all_files = _code_corpus.list_stdlib_files()
  files = _code_corpus.corpus_files('full')
  train, validation = set(files['train']), set(files['validation'])
  assert not train & validation
  assert train | validation == set(all_files)
  assert len(all_files) > 500
  assert 0.01 < len(validation) / len(all_files) < 0.06
  assert not any('site-packages' in p or 'dist-packages' in p for p in all_files)
  assert all(p.endswith('.py') and not os.path.isabs(p) for p in all_files)


def test_mini_is_small_and_has_both_splits():
  root = _code_corpus.stdlib_root()
  files = _code_corpus.corpus_files('mini')
  sizes = {s: sum(os.path.getsize(os.path.join(root, p)) for p in files[s]) for s in _SPLITS}
  assert all(files[s] for s in _SPLITS)
  assert 100_000 < sum(sizes.values()) < 1_000_000
  assert set(files['train']) <= set(_code_corpus.corpus_files('full')['train'])
  with pytest.raises(ValueError, match='huge'):
    _code_corpus.corpus_files('huge')


def test_two_builds_give_the_same_records_in_the_same_order(mini_dir, tmp_path):
  first = _records(mini_dir)
  second = _records(str(tmp_path / 'tfds_b'))
  assert first == second
  expected = _code_corpus.corpus_files('mini')
  root = _code_corpus.stdlib_root()
  for split in _SPLITS:
    paths = [p for p, _ in first[split]]
    assert sorted(paths) == expected[split]
    for path, text in first[split]:
      assert _code_corpus.split_of(path) == split
      assert text == _code_corpus.read_source_file(os.path.join(root, path))


def test_builder_reads_a_tree_with_invalid_utf8_and_skips_installed_packages(tmp_path, monkeypatch):
  root = tmp_path / 'lib'
  files = {
    'good.py': 'print("héllo")\n'.encode(),
    'pkg/latin1.py': b'# caf\xe9\nx = 1\n',
    'pkg/deep/empty.py': b'',
    'collections/abc.py': b'# validation by its path hash\n',
    'notes.txt': b'not python',
    'site-packages/installed.py': b'x = 1',
    'dist-packages/installed.py': b'x = 1',
    '__pycache__/cached.py': b'x = 1',
  }
  for relpath, content in files.items():
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_bytes(content)
  monkeypatch.setattr(_code_corpus, 'stdlib_root', lambda: str(root))
  assert _code_corpus.list_stdlib_files() == [
    'collections/abc.py',
    'good.py',
    'pkg/deep/empty.py',
    'pkg/latin1.py',
  ]
  records = _records(str(tmp_path / 'tfds'), name='code_corpus')
  assert records['validation'] == [('collections/abc.py', '# validation by its path hash\n')]
  assert dict(records['train']) == {
    'good.py': 'print("héllo")\n',
    'pkg/latin1.py': '# caf\ufffd\nx = 1\n',
    'pkg/deep/empty.py': '',
  }


def test_text_source_on_prepared_mini(mini_dir):
  src = text_source('code_corpus/mini', 'validation', data_dir=mini_dir)
  assert isinstance(src, TextSource)
  n = len(src)
  assert n == len(_code_corpus.corpus_files('mini')['validation'])
  assert all(isinstance(src[i], str) for i in range(n))
  assert src[-1] == src[n - 1]
  assert src[1:3] == [src[1], src[2]]
  with pytest.raises(IndexError, match=str(n)):
    src[n]  # pylint: disable=pointless-statement
  # The same files through tfds' own registry name, read from the prepared files.
  generic = text_source('curvopt_code_corpus/mini', 'validation', data_dir=mini_dir)
  assert [generic[i] for i in range(n)] == [src[i] for i in range(n)]


@pytest.mark.parametrize(
  'name, split, match',
  [
    ('no_such_dataset_xyz', 'train', 'no_such_dataset_xyz'),
    ('lm1b', 'train', 'not prepared'),
    ('code_corpus/huge', 'train', 'huge'),
    ('code_corpus/mini', 'test', "'test'"),
    ('', 'train', 'non-empty'),
  ],
)
def test_text_source_errors_are_clear(name, split, match, mini_dir):
  with pytest.raises(ValueError, match=match):
    text_source(name, split, data_dir=mini_dir)


def test_unprepared_tfds_dataset_writes_nothing(tmp_path):
  with pytest.raises(ValueError, match='never downloads'):
    text_source('lm1b', 'train', data_dir=str(tmp_path))
  assert not list(tmp_path.iterdir())


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  assert default_data_dir(tmp_path) == os.path.join(str(tmp_path), 'tfds')
  monkeypatch.setenv('TFDS_DATA_DIR', '/data/tfds')
  assert default_data_dir(tmp_path) == '/data/tfds'
