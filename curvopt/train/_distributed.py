"""Multi-process start-up through JAX's own runtime (TPU pods, GPU clusters, CPU processes)."""

from typing import Callable, Optional

from absl import flags
from absl import logging
import jax


def initialize_distributed(
  *,
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  auto: bool = False,
) -> None:
  """Calls jax.distributed.initialize before any computation, when the run is multi-process.

  With an explicit coordinator address, the processes are named by hand (e.g. two CPU processes
  on 127.0.0.1, which then exchange collectives over gloo). With `auto`, JAX discovers the
  cluster itself (Cloud TPU pods, SLURM, Open MPI). With neither, this is a single-process run.
  """
  if coordinator_address is None and not auto:
    return
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError(
        'a coordinator address needs num_processes and process_id as well, got '
        f'num_processes={num_processes}, process_id={process_id}'
      )
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process_id={process_id} is outside [0, {num_processes})')
  # CPU devices of different processes talk through gloo; accelerators keep their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info(
    'process %d of %d, %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def define_distributed_flags() -> Callable[[], None]:
  """Defines the multi-process flags of a trainer binary; returns start() that applies them.

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I name the processes by hand;
  --distributed_auto lets JAX discover a TPU pod or SLURM cluster. Call start() in main().
  """
  coordinator = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0.')
  num_processes = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
  process_id = flags.DEFINE_integer('process_id', None, "This process's index.")
  auto = flags.DEFINE_bool('distributed_auto', False, 'Let JAX discover the cluster (TPU, SLURM).')

  def start() -> None:
    initialize_distributed(
      coordinator_address=coordinator.value,
      num_processes=num_processes.value,
      process_id=process_id.value,
      auto=auto.value,
    )

  return start
