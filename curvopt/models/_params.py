"""Parameter counting and lookup."""

from typing import Any

import jax
import numpy as np


def count_params(params: Any) -> int:
  """Total number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def output_head(params: Any, cfg: Any) -> jax.Array:
  """The [vocab, d_model] output head of a Decoder's params (rows = token ids).

  The tied token embedding, or the transposed untied ``head/kernel``; CAPO reads
  the head in this layout.
  """
  if cfg.tie_embeddings:
    return params['embed']['embedding']
  return params['head']['kernel'].T
