"""Leaf names for error messages: jax key paths as 'layers_0/attn/q/kernel'."""

from typing import Any

import jax

KeyPath = tuple[Any, ...]


def path_str(path: KeyPath) -> str:
  """'layers_0/attn/q/kernel' for a jax key path."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)
