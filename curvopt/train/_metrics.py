"""Metrics to a JSONL file and TensorBoard event files, and a progress line with an ETA."""

import json
import os
import time
from typing import Mapping, Optional

from absl import logging
import jax


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events (process 0 only).

  The JSONL file is appended to, so a resumed run continues the same file.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _DropLibraryInfo(logging.logging.Filter):
  """Drops INFO records of libraries that log every file they write (orbax)."""

  def filter(self, record):
    return record.levelno > logging.logging.INFO or 'orbax' not in record.pathname


def quiet_library_logs() -> None:
  """Keeps our progress lines readable: orbax's INFO logs go, its warnings stay."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl`, oldest first."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Rates and ETA over the steps run in this process (a resumed run starts a fresh clock)."""

  def __init__(
    self, first_step: int, total_steps: int, tokens_per_step: int, *, unit: str = 'tokens'
  ):
    self._total = total_steps
    self._tokens_per_step = tokens_per_step
    self._rate_key = f'{unit}_per_s'
    self._rate_label = 'tok/s' if unit == 'tokens' else f'{unit}/s'
    self._mark_step = first_step
    self._mark_time: Optional[float] = None

  def start(self, step: int) -> None:
    """Starts the clock after the first (compiling) step, so rates measure steady state."""
    self._mark_step, self._mark_time = step, time.perf_counter()

  def rates(self, step: int) -> dict[str, float]:
    if self._mark_time is None or step <= self._mark_step:
      return {}
    dt = time.perf_counter() - self._mark_time
    steps_per_s = (step - self._mark_step) / dt
    return {'steps_per_s': steps_per_s, self._rate_key: steps_per_s * self._tokens_per_step}

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    rates = self.rates(step)
    parts = [f'step {step}/{self._total}']
    parts += [f'{k} {v:.4g}' for k, v in scalars.items() if k not in rates]
    if rates:
      parts.append(f'{rates[self._rate_key]:.0f} {self._rate_label}')
      parts.append(f'ETA {_format_duration((self._total - step) / rates["steps_per_s"])}')
    return ' | '.join(parts)

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    logging.info('%s', self.line(step, scalars))
