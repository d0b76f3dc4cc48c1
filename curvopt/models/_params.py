"""Parameter counting."""

from typing import Any

import jax
import numpy as np


def count_params(params: Any) -> int:
  """Total number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
