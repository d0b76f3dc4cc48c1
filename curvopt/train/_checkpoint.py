"""Orbax checkpoints of the train state, the data position and the config."""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: restore targets that place as they load."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


class Checkpointer:
  """Keeps the last `keep` checkpoints under `<workdir>/checkpoints`, saved asynchronously.

  Each checkpoint is a Composite of `state` (the TrainState pytree), `data` (the batch iterator's
  position, JSON) and `config` (JSON), so a resumed run reads exactly the batches it would have.
  """

  def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 0, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'checkpoint keep must be >= 1, got {keep}')
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      save_interval_steps=save_every if save_every > 0 else 1,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self._save_every = save_every
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        'state': ocp.StandardCheckpointHandler(),
        'data': ocp.JsonCheckpointHandler(),
        'config': ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._save_every > 0 and step % self._save_every == 0

  def save(self, step: int, state: Any, data: dict, config: dict) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(config),
      ),
      force=True,
    )

  def saved_config(self, step: int) -> dict:
    """The config a checkpoint was written with, read without touching its arrays."""
    return self._manager.restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
    ).config

  def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict]:
    """Restores (state, data position) of `step` into the shardings of `abstract_state`.

    Without `abstract_state` the state comes back as saved (nested dicts of arrays) on this
    process's first device, whatever mesh wrote it: for tools that only read a checkpoint.
    """
    if abstract_state is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_state = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        self._manager.item_metadata(step)['state'],
      )
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
      )
    except ValueError as e:
      # Orbax names the differing leaves but not the likely cause.
      raise ValueError(
        f"checkpoint step {step} in {self.directory} does not fit this run's train state "
        '(written by another version of curvopt or with other model / optimizer settings? '
        f'start a new workdir or restore without abstract_state to read it): {e}'
      ) from e
    return restored.state, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
