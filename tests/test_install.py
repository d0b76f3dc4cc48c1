"""The lean install: the method packages and the model need only setup.py's core requirements.

`pip install curvopt` (no extras) must give working `curvopt.optim`, `curvopt.rl`,
`curvopt.merge` and `curvopt.models`; the data and trainer stack (tensorflow-datasets,
ml_collections, ...) is the [train] extra. (absl.flags is not checked: optax and orbax import it.)
"""

import ast
import json
import os
import pathlib
import runpy
import subprocess
import sys
from unittest import mock

import pytest
import setuptools

REPO = pathlib.Path(__file__).resolve().parent.parent
HEAVY = (
  'tensorflow_datasets',
  'ml_collections',
  'tensorflow',
  'matplotlib',
  'tensorboardX',
  'chex',
)
# import name -> the distribution that provides it
DISTRIBUTIONS = {
  'jax': 'jax',
  'flax': 'flax',
  'optax': 'optax',
  'orbax': 'orbax-checkpoint',
  'safetensors': 'safetensors',
  'numpy': 'numpy',
}


def _setup_kwargs():
  with mock.patch.object(setuptools, 'setup') as setup:
    runpy.run_path(str(REPO / 'setup.py'), run_name='__main__')
  return setup.call_args.kwargs


def _requirement_names(requirements):
  return {
    req.split(';')[0].split('[')[0].split('>')[0].split('<')[0].split('=')[0].strip().lower()
    for req in requirements
  }


def _third_party_imports(package, *, lazy=False):
  """Third-party modules `package` imports at module level (lazy: only inside functions)."""
  names = set()
  for path in sorted((REPO / 'curvopt' / package).glob('*.py')):
    tree = ast.parse(path.read_text())
    inside = {
      id(n)
      for f in ast.walk(tree)
      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
      for n in ast.walk(f)
    }
    for node in ast.walk(tree):
      if (id(node) in inside) != lazy:
        continue
      if isinstance(node, ast.Import):
        names.update(alias.name.split('.')[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names.add(node.module.split('.')[0])
  return {n for n in names if n not in sys.stdlib_module_names and n != 'curvopt'}


# Optional readers a method or model package imports inside the function that needs them, each
# from an extra (module -> distribution).
OPTIONAL = {'torch': 'torch', 'transformers': 'transformers', 'yaml': 'pyyaml'}


@pytest.mark.parametrize('package', ['optim', 'rl', 'merge', 'models'])
def test_lazy_imports_are_optional_extras(package):
  extras = set().union(*(_requirement_names(r) for r in _setup_kwargs()['extras_require'].values()))
  lazy = _third_party_imports(package, lazy=True) - set(DISTRIBUTIONS)
  unknown = lazy - set(OPTIONAL)
  assert not unknown, f'curvopt/{package} imports {sorted(unknown)} lazily, in no extra'
  assert {OPTIONAL[n] for n in lazy} <= extras, sorted(lazy)


def test_fresh_import_of_the_method_packages_pulls_in_no_heavy_dependency():
  script = '\n'.join(
    [
      'import json, sys',
      'import curvopt.optim, curvopt.rl, curvopt.merge',
      f'heavy = {HEAVY!r}',
      'print(json.dumps({"file": sys.modules["curvopt"].__file__,',
      '                  "heavy": [m for m in heavy if m in sys.modules]}))',
    ]
  )
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  out = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert pathlib.Path(result['file']).resolve().is_relative_to(REPO), result['file']
  assert not result['heavy'], f'importing optim, rl, merge loaded {result["heavy"]}'


def test_bare_import_of_curvopt_loads_no_third_party_module():
  script = (
    'import sys, curvopt\nprint(sorted(m for m in ("jax", "numpy", "flax") if m in sys.modules))'
  )
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert out.stdout.strip() == '[]', out.stdout


@pytest.mark.parametrize('package', ['optim', 'rl', 'merge', 'models'])
def test_core_requirements_cover_the_package(package):
  core = _requirement_names(_setup_kwargs()['install_requires'])
  imports = _third_party_imports(package)
  assert imports, package
  unknown = imports - set(DISTRIBUTIONS)
  assert not unknown, (
    f'curvopt/{package} imports {sorted(unknown)}, not a core requirement '
    '(a new core dependency goes into install_requires and DISTRIBUTIONS)'
  )
  missing = {DISTRIBUTIONS[n] for n in imports} - core
  assert not missing, f'curvopt/{package} needs {sorted(missing)}, not in install_requires'


def test_extras_nest_and_the_core_stays_lean():
  kwargs = _setup_kwargs()
  core = _requirement_names(kwargs['install_requires'])
  extras = {name: _requirement_names(reqs) for name, reqs in kwargs['extras_require'].items()}
  assert core == set(DISTRIBUTIONS.values())
  assert extras['train'] <= extras['experiments'] <= extras['test']
  assert {'tensorflow-datasets', 'ml_collections', 'absl-py'} <= extras['train']
  assert 'matplotlib' in extras['experiments']
  assert extras['hf'] == {'tokenizers', 'jinja2'} and extras['hf'] <= extras['test']
  assert {'pytest', 'hypothesis', 'chex', 'ruff'} <= extras['test']
  assert kwargs['license'] == 'Apache-2.0'
