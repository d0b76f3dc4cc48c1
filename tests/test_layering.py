"""The package layering: the method packages stand alone (someone who pip-installs curvopt into
another project uses optim, rl and merge on any pytree without the experiment plumbing), the
trainer never depends on the studies built on it, and packages meet only at public names."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'curvopt'
PACKAGES = sorted(p.parent.name for p in PACKAGE.glob('*/__init__.py'))
_PLUMBING = ('curvopt.models', 'curvopt.data', 'curvopt.train', 'curvopt.studies')

# package -> module prefixes none of its modules may import.
NEVER_IMPORTS = {
  'optim': _PLUMBING,
  'rl': _PLUMBING,
  'merge': _PLUMBING,
  'train': ('curvopt.studies',),
}


def _imported_modules(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f'{node.module}.{alias.name}' for alias in node.names)


def _modules(package):
  files = sorted((PACKAGE / package).glob('*.py'))
  assert files, f'no modules in curvopt/{package}'
  return files


def _is_prefix(prefix, module):
  return module == prefix or module.startswith(prefix + '.')


@pytest.mark.parametrize(
  'package, forbidden', sorted(NEVER_IMPORTS.items()), ids=sorted(NEVER_IMPORTS)
)
def test_package_never_imports(package, forbidden):
  for path in _modules(package):
    bad = sorted({m for m in _imported_modules(path) if any(_is_prefix(f, m) for f in forbidden)})
    assert not bad, f'curvopt/{package}/{path.name} imports {bad}'


def _private_module_of_another_package(module, package):
  parts = module.split('.')
  return (
    len(parts) > 2
    and parts[0] == 'curvopt'
    and parts[1] != package
    and any(p.startswith('_') for p in parts[2:])
  )


@pytest.mark.parametrize('package', PACKAGES)
def test_package_imports_other_packages_by_public_names_only(package):
  for path in _modules(package):
    bad = sorted(
      {m for m in _imported_modules(path) if _private_module_of_another_package(m, package)}
    )
    assert not bad, f'curvopt/{package}/{path.name} imports private {bad}'


def test_the_table_names_existing_packages():
  assert set(NEVER_IMPORTS) <= set(PACKAGES)
  for prefixes in NEVER_IMPORTS.values():
    assert {p.split('.')[1] for p in prefixes} <= set(PACKAGES)
