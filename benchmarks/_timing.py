"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

import time

import jax


def seconds_per_call(fn, calls: int) -> float:
  """Mean wall time of `calls` back-to-back calls of fn(), waiting for the last result."""
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls
