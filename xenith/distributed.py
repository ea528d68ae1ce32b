"""Joins the processes of a multi-host run into one JAX runtime (`jax.distributed`).

A run spans processes when it is told so (`--coordinator_address`, `--num_processes`,
`--process_id`, or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or when JAX's cluster detection finds a job of more than one process
(SLURM, Cloud TPU VMs, Open MPI, Kubernetes). Otherwise nothing happens: a one-process
run is exactly what it was. Every process then runs the same `main.py` line; the mesh
spans all their devices, XLA's collectives (gloo on CPU, NCCL on GPU, ICI on TPU) carry
the traffic.

A process that dies is noticed by the others through the coordination service's
heartbeats: they stop with an error within `heartbeat_timeout_s` instead of waiting
in a collective for ever.
"""

import dataclasses
import json
import os
import signal
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from xenith import sigterm
from xenith.errors import FlagError

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
ENV_HEARTBEAT = 'XENITH_HEARTBEAT_TIMEOUT_S'


@dataclasses.dataclass(frozen=True)
class Settings:
  """How this process joins the run; None = not given (from flags or environment)."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int = 60  # A dead peer is reported after about this long.

  @classmethod
  def from_flags(cls, coordinator_address, num_processes, process_id) -> 'Settings':
    """Flags first, then the environment variables of the same name."""

    def number(value, env):
      if value is not None:
        return value
      text = os.environ.get(env)
      if text is None or text == '':
        return None
      try:
        return int(text)
      except ValueError:
        raise FlagError(f'{env}={text!r} is not an integer.') from None

    heartbeat = number(None, ENV_HEARTBEAT)
    return cls(coordinator_address=coordinator_address or os.environ.get(ENV_COORDINATOR),
               num_processes=number(num_processes, ENV_NUM_PROCESSES),
               process_id=number(process_id, ENV_PROCESS_ID),
               **({} if heartbeat is None else {'heartbeat_timeout_s': heartbeat}))


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A multi-process job JAX's auto-detection found."""
  name: str  # JAX's name for it: 'slurm', 'gcetpu', 'ompi', 'k8s', ...
  num_processes: int
  process_id: int


def detected_cluster() -> Cluster | None:
  """The job JAX's auto-detection would join, or None (also for a one-process job).

  Uses JAX's own detectors (the ones `jax.distributed.initialize()` runs), so a job
  is recognised exactly as JAX would.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.opt_in_only_method or not env.is_env_present():
      continue
    try:
      count, index = env.get_process_count(), env.get_process_id()
    except Exception:  # pylint: disable=broad-exception-caught
      continue  # Detected but not usable (e.g. metadata not reachable): not a cluster.
    return Cluster(env.name, count, index) if count and count > 1 else None
  return None


def _check(settings: Settings) -> None:
  """Bad combinations as one line, before anything waits on a coordinator."""
  n, i = settings.num_processes, settings.process_id
  if n is not None and n < 1:
    raise FlagError(f'--num_processes={n} must be at least 1.')
  if i is not None and n is not None and not 0 <= i < n:
    raise FlagError(f'--process_id={i} is not in [0, {n}) (--num_processes={n}).')
  if n is not None and n > 1 and (settings.coordinator_address is None or i is None):
    if detected_cluster() is None:
      missing = [name for name, value in (('--coordinator_address',
                                           settings.coordinator_address),
                                          ('--process_id', i)) if value is None]
      raise FlagError(
          f'--num_processes={n} needs {" and ".join(missing)} (or their environment '
          f'variables {ENV_COORDINATOR}, {ENV_PROCESS_ID}) outside a cluster JAX detects.')
  address = settings.coordinator_address
  if address is not None and (':' not in address or not address.rsplit(':', 1)[1].isdigit()):
    raise FlagError(f'--coordinator_address={address!r} must be host:port.')
  if settings.heartbeat_timeout_s < 1:
    raise FlagError(f'{ENV_HEARTBEAT}={settings.heartbeat_timeout_s} must be positive.')


def spans_processes(settings: Settings) -> bool:
  """Whether this run is (or is meant to be) more than one process."""
  _check(settings)
  if settings.num_processes is not None:
    return settings.num_processes > 1
  if settings.coordinator_address is not None or settings.process_id is not None:
    return True  # The count comes from the cluster (JAX fails clearly if it cannot).
  return detected_cluster() is not None


def process_id(settings: Settings) -> int:
  """This process's index before `initialize` (0 for a one-process run)."""
  if settings.process_id is not None:
    return settings.process_id
  cluster = detected_cluster()
  return cluster.process_id if cluster else 0


def initialize(settings: Settings) -> bool:
  """Calls `jax.distributed.initialize` when the run spans processes; True if it did.

  Must run before anything touches a JAX backend (devices, arrays, jit).
  """
  if not spans_processes(settings):
    return False
  # XLA:CPU has no cross-process collectives of its own; gloo gives it some. The
  # setting only concerns the CPU client, so GPU and TPU runs are unaffected.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # Timeouts: a missing peer at start-up, and a peer that dies later, end the run
  # with an error instead of a hang.
  jax.distributed.initialize(
      coordinator_address=settings.coordinator_address,
      num_processes=settings.num_processes,
      process_id=settings.process_id,
      initialization_timeout=max(60, 5 * settings.heartbeat_timeout_s),
      heartbeat_timeout_seconds=settings.heartbeat_timeout_s,
      shutdown_timeout_seconds=max(30, settings.heartbeat_timeout_s))
  if sigterm.received():
    # It came before JAX's preemption notifier took over SIGTERM: hand it on, so that
    # all processes stop together at the first step.
    os.kill(os.getpid(), signal.SIGTERM)
  logging.info('Process %d of %d; %d of %d devices are local.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def gather_json(value: Any) -> list[Any]:
  """Every process's `value` (JSON-able), in process order, on every process.

  A collective: all processes must call it together.
  """
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everyone = multihost_utils.process_allgather(padded)  # [processes, longest]
  return [json.loads(bytes(row[:size]).decode()) for row, size in zip(everyone, sizes)]


def is_primary() -> bool:
  """Whether this process writes the run's single-writer files (TensorBoard, JSON)."""
  return jax.process_index() == 0
