"""Report pieces for experiment write-ups: run summaries, markdown tables, PNG curves."""

import math
import os
from typing import Mapping, Sequence

import numpy as np

from curvopt import train


def run_summary(workdir: str) -> dict[str, float]:
  """Last train / eval loss and mean throughput of a run, from its metrics.jsonl.

  Reading the file (not the return value of the run) makes a resumed or already-finished run
  summarize the same way as a fresh one; a step logged twice (before and after a crash) counts once.
  """
  by_step = {r['step']: r for r in train.read_metrics(workdir)}
  records = [by_step[s] for s in sorted(by_step)]

  def last(key):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else math.nan

  rates = [r['tokens_per_s'] for r in records if 'tokens_per_s' in r]
  return {
    'step': records[-1]['step'] if records else 0,
    'train_loss': last('loss'),
    'eval_loss': last('eval_loss'),
    'tokens_per_s': float(np.mean(rates)) if rates else math.nan,
  }


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  by_step = {r['step']: r[key] for r in records if key in r}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def curve(workdir: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one logged scalar, each step once (the latest record wins)."""
  return _series(train.read_metrics(workdir), key)


def curves(workdir: str, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
  """`curve` of every logged scalar whose name starts with `prefix`, reading the file once."""
  records = train.read_metrics(workdir)
  keys = sorted({k for r in records for k in r if k.startswith(prefix)})
  return {k: _series(records, k) for k in keys}


def write_text(path: str, text: str) -> str:
  """Writes `text` to `path` through a temporary file: a crash never leaves half a report."""
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
  return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  def fmt(x):
    return f'{x:.4g}' if isinstance(x, float) else str(x)

  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(fmt(x) for x in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')  # files only, no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _save(fig, path: str) -> str:
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  _pyplot().close(fig)
  return path


def plot_curves(
  curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  path: str,
  *,
  title: str,
  xlabel: str,
  ylabel: str,
  logy: bool = False,
) -> str:
  """Writes one line per named (x, y) curve to a PNG at `path`; returns the path."""
  fig, ax = _pyplot().subplots(figsize=(6, 4), dpi=120)
  for name, (xs, ys) in curves.items():
    ax.plot(xs, ys, marker='o', markersize=3, label=name)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  if logy:
    ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def plot_heatmap(
  rows: Mapping[str, Sequence[float]],
  columns: Sequence[int],
  path: str,
  *,
  title: str,
  xlabel: str,
  colorbar: str,
) -> str:
  """Writes a named-rows x columns heatmap (e.g. per-layer values over steps) to a PNG."""
  names = list(rows)
  values = np.array([rows[n] for n in names], dtype=np.float64)
  fig, ax = _pyplot().subplots(figsize=(7, 0.22 * len(names) + 1.5), dpi=120)
  image = ax.imshow(values, aspect='auto', interpolation='nearest', cmap='viridis')
  ax.set_yticks(range(len(names)), names, fontsize=6)
  ticks = np.linspace(0, len(columns) - 1, min(len(columns), 8)).astype(int)
  ax.set_xticks(ticks, [str(columns[i]) for i in ticks])
  ax.set(title=title, xlabel=xlabel)
  fig.colorbar(image, ax=ax, label=colorbar)
  return _save(fig, path)
