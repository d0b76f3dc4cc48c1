"""The method packages stand alone: someone who pip-installs curvopt into another project uses
optim, rl and merge on any pytree without pulling in the experiment plumbing."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'curvopt'
PLUMBING = ('curvopt.models', 'curvopt.data', 'curvopt.train')


def _imported_modules(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f'{node.module}.{alias.name}' for alias in node.names)


@pytest.mark.parametrize('package', ['optim', 'rl', 'merge'])
def test_method_packages_never_import_the_plumbing(package):
  files = sorted((PACKAGE / package).glob('*.py'))
  assert files
  for path in files:
    bad = [m for m in _imported_modules(path) if m.startswith(PLUMBING)]
    assert not bad, f'{path.name} imports {bad}'
