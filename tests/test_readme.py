"""Every ```python block of README.md runs as written, each in a fresh interpreter.

A block runs with the repository's curvopt first on the path, in an empty temporary working
directory (also its TMPDIR), without the suite's fake 8-device flag, as a user would run it.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r'^```python\n(.*?)^```$', re.MULTILINE | re.DOTALL)


def python_blocks(markdown: str) -> list[str]:
  """The source of every ```python fenced block, in order."""
  return _BLOCK.findall(markdown)


def run_block(source: str, cwd: pathlib.Path, timeout: float = 240) -> None:
  """Runs one block in a fresh interpreter; fails with the block's text and its stderr."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(
    PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu', TFDS_DATA_DIR=str(cwd / 'tfds'), TMPDIR=str(cwd)
  )  # tempfile.mkdtemp() in a block lands in the test's tmp_path
  out = subprocess.run(
    [sys.executable, '-c', source],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  if out.returncode:
    numbered = '\n'.join(f'{i:3d}  {line}' for i, line in enumerate(source.splitlines(), 1))
    pytest.fail(
      f'README block failed (exit {out.returncode}):\n{numbered}\n\n--- stderr ---\n'
      f'{out.stderr[-4000:]}',
      pytrace=False,
    )


def test_readme_has_python_blocks():
  assert python_blocks((REPO / 'README.md').read_text())


@pytest.mark.parametrize('index', range(len(python_blocks((REPO / 'README.md').read_text()))))
def test_readme_block_runs(index, tmp_path):
  run_block(python_blocks((REPO / 'README.md').read_text())[index], tmp_path)


def test_a_broken_block_fails(tmp_path):
  with pytest.raises(pytest.fail.Exception, match=r'(?s)prnt\(1\).*NameError'):
    run_block('x = 1\nprnt(1)\n', tmp_path, timeout=60)
