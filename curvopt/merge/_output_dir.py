"""A merge's output directory: written aside, renamed into place, never half there.

A merge writes into a hidden sibling `.NAME.partial-PID/` that is renamed to
NAME once complete, so a reader never sees a complete-looking half output.
An exception, Ctrl-C, or SIGTERM (a job scheduler's stop) removes the
partial directory; SIGKILL cannot be caught, so the next merge into the same
parent removes the partials of processes that are gone. Beside the weights,
the output gets the files that make it loadable by transformers (and by
`curvopt.models`' HF loader): the config, tokenizer and generation files of
the base model (else of the first expert), as mergekit copies them.
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import threading
from typing import Iterator, Sequence

# Files of an HF model directory that describe it rather than hold weights.
MODEL_FILES = (
  'config.json',
  'generation_config.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'added_tokens.json',
  'tokenizer.model',
  'vocab.json',
  'vocab.txt',
  'merges.txt',
  'chat_template.jinja',
  'chat_template.json',
)
_HOST_FILE = '.partial-host'


class Interrupted(KeyboardInterrupt):
  """SIGTERM during a merge, raised like Ctrl-C's KeyboardInterrupt."""

  def __init__(self, signum: int):
    super().__init__(f'signal {signal.Signals(signum).name}')
    self.signum = signum


def _partial_name(output: str, pid: int) -> str:
  return os.path.join(os.path.dirname(output), f'.{os.path.basename(output)}.partial-{pid}')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def remove_stale_partials(output: str) -> list[str]:
  """Removes `.NAME.partial-PID/` siblings of `output` left by dead processes.

  Only partials written on this host (a `.partial-host` file inside names
  it) are judged: a PID means nothing on another machine sharing the disk.
  A partial of this very process is stale too (a merge that was killed
  before it could clean up cannot be running).

  Returns:
    The directories removed.
  """
  parent = os.path.dirname(output)
  pattern = re.compile(re.escape(f'.{os.path.basename(output)}.partial-') + r'(\d+)$')
  host = socket.gethostname()
  removed = []
  for entry in os.listdir(parent) if os.path.isdir(parent) else ():
    found = pattern.match(entry)
    path = os.path.join(parent, entry)
    if not found or not os.path.isdir(path):
      continue
    pid = int(found.group(1))
    try:
      with open(os.path.join(path, _HOST_FILE)) as f:
        written_on = f.read().strip()
    except OSError:
      written_on = host  # created, killed before the host file was written
    if written_on != host or (pid != os.getpid() and _alive(pid)):
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
  """SIGTERM raises `Interrupted` while the merge runs, so the cleanup that
  Ctrl-C gets runs too. Only where SIGTERM would otherwise kill the process
  at once (its default action) and only on the main thread (signal handlers
  live there): a handler the caller installed is left alone."""
  if (
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
  ):
    yield
    return

  def handler(signum, frame):
    del frame
    raise Interrupted(signum)

  signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _os_error(what: str, path: str, error: OSError) -> ValueError:
  reason = error.strerror or str(error)
  return ValueError(f'cannot {what} {path}: {reason}')


def check_output(output: str, *, overwrite: bool) -> None:
  """Fails early, in one line, for an output that cannot be written."""
  if os.path.lexists(output):
    if not overwrite:
      raise ValueError(
        f'the output {output} exists; pass overwrite (the --overwrite flag) to replace it'
      )
    if not os.path.isdir(output) or os.path.islink(output):
      raise ValueError(f'the output {output} exists and is not a directory; remove it first')
  parent = os.path.dirname(output)
  probe = parent
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f'cannot create the output {output}: {probe} is a file, not a directory')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f'cannot create the output {output}: {probe} is not writable')


@contextlib.contextmanager
def partial_output(output: str, *, overwrite: bool) -> Iterator[str]:
  """Yields an empty temporary directory that becomes `output` on success.

  On any exception, Ctrl-C or SIGTERM the temporary directory is removed and
  the exception propagates; an existing `output` is only replaced (with
  `overwrite`) once the body succeeded.

  Raises:
    ValueError: an existing output without `overwrite`, a file in the way,
      or a location that cannot be written (one line, no OS traceback).
  """
  output = os.path.abspath(os.fspath(output))
  check_output(output, overwrite=overwrite)
  parent = os.path.dirname(output)
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise _os_error('create the output directory', parent, e) from e
  remove_stale_partials(output)
  temporary = _partial_name(output, os.getpid())
  with _sigterm_as_interrupt():
    try:
      os.makedirs(temporary)
      with open(os.path.join(temporary, _HOST_FILE), 'w') as f:
        f.write(socket.gethostname())
    except OSError as e:
      shutil.rmtree(temporary, ignore_errors=True)
      raise _os_error('write into', parent, e) from e
    try:
      yield temporary
      os.remove(os.path.join(temporary, _HOST_FILE))
      if os.path.exists(output):
        shutil.rmtree(output)
      os.rename(temporary, output)
    except BaseException:
      shutil.rmtree(temporary, ignore_errors=True)
      raise


def model_files(directory: str | None) -> list[str]:
  """The `MODEL_FILES` present in `directory` (none for a file or None)."""
  if directory is None or not os.path.isdir(directory):
    return []
  return [f for f in MODEL_FILES if os.path.isfile(os.path.join(directory, f))]


def copy_model_files(sources: Sequence[str | None], destination: str) -> tuple[str | None, list]:
  """Copies the config, tokenizer and generation files of the first source
  directory that has a config.json (else the first that has any of them).

  Args:
    sources: candidate model directories in order of preference (the base,
      then the experts); files and None are skipped.
    destination: the output directory.

  Returns:
    (the source used or None, the file names copied).
  """
  candidates = [s for s in sources if model_files(s)]
  with_config = [s for s in candidates if 'config.json' in model_files(s)]
  chosen = (with_config or candidates or [None])[0]
  copied = model_files(chosen)
  for name in copied:
    shutil.copy2(os.path.join(chosen, name), os.path.join(destination, name))
  return chosen, copied
