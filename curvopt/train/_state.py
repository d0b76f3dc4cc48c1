"""The train state: everything a step reads and writes, and everything a checkpoint holds."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so orbax stores it as a plain array
