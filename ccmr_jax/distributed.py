"""Multi-host start: joins this process to a multi-process JAX job, or does nothing.

A run is multi-host when ``config.multihost`` is true, or when the
environment says so:

  ``CCMR_MULTIHOST=1``              this process is one of several (TPU pod
                                    slice, Slurm, Open MPI: JAX detects the
                                    coordinator, process count and id);
  ``CCMR_COORDINATOR_ADDRESS``      ``host:port`` of process 0's coordinator;
  ``CCMR_NUM_PROCESSES``            number of processes in the job;
  ``CCMR_PROCESS_ID``               this process's index, ``0..N-1``.

The last three are for clusters JAX cannot detect on its own (a few GPU
machines, or several processes on one machine); setting
``CCMR_COORDINATOR_ADDRESS`` also makes the run multi-host. Values that are
not set are left to JAX's detection (it also reads ``JAX_COORDINATOR_ADDRESS``
and ``JAX_LOCAL_DEVICE_IDS``). A plain single-host run sets none of them and
:func:`maybe_initialize` leaves JAX alone.

:func:`maybe_initialize` must run before anything touches a device
(``jax.devices()``, the first array, the first ``jit``): ``main`` calls it
right after flag parsing.

Where each stage runs in a multi-host job (see :mod:`ccmr_jax.experiment`):

  * **training** — every process. One ``Mesh`` spans all devices of all
    hosts; each process feeds its own contiguous share of every global batch
    (``PairSampler.epoch`` with the process index and count,
    ``sharding.to_global``); XLA inserts the gradient all-reduce and the
    embedding all-gather of the contrastive loss.
  * **embeddings** of test images and captions — every process,
    data-parallel over the same mesh (``evaluate.make_embedder``); the
    sharded outputs are gathered onto every host with
    ``multihost_utils.process_allgather``.
  * **ScaNN index building, querying, metrics, reports and plots** — process
    0 only. Galleries (one task's test split) are small enough for one host,
    and ScaNN is a single-host library. Other processes go on to the next
    task and wait for process 0 in its first collective.
  * **Orbax snapshots** — every process calls ``save``/``restore``; Orbax
    coordinates the processes (process 0 writes the metadata and finalises
    the folder). The workdir must therefore be the same folder for every
    process (a shared file system).

On CPU the processes exchange collectives over TCP with gloo; the
implementation is chosen here (``jax_cpu_collectives_implementation``)
unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` already names one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
from absl import logging

ENV_MULTIHOST = "CCMR_MULTIHOST"
ENV_COORDINATOR_ADDRESS = "CCMR_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CCMR_NUM_PROCESSES"
ENV_PROCESS_ID = "CCMR_PROCESS_ID"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_CPU_COLLECTIVES_OPTION = "jax_cpu_collectives_implementation"
_CPU_COLLECTIVES = "gloo"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What :func:`jax.distributed.initialize` is given; ``None`` fields are left to JAX's detection."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def as_kwargs(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _env_int(environ: Mapping[str, str], name: str, minimum: int) -> int | None:
  raw = environ.get(name, "").strip()
  if not raw:
    return None
  try:
    value = int(raw)
  except ValueError:
    raise ValueError(f"{name}={raw!r} is not an integer") from None
  if value < minimum:
    raise ValueError(f"{name}={value} must be at least {minimum}")
  return value


def settings_from(config, environ: Mapping[str, str] | None = None) -> Settings | None:
  """The multi-host settings of this run, or ``None`` for a single-host run.

  Raises:
    ValueError: for an unreadable or contradictory environment (the message
      names the variable).
  """
  environ = os.environ if environ is None else environ
  switch = environ.get(ENV_MULTIHOST, "").strip().lower()
  if switch not in _TRUE + _FALSE:
    raise ValueError(f"{ENV_MULTIHOST}={environ[ENV_MULTIHOST]!r}; use 1 (multi-host) or 0")
  address = environ.get(ENV_COORDINATOR_ADDRESS, "").strip() or None
  num_processes = _env_int(environ, ENV_NUM_PROCESSES, 1)
  process_id = _env_int(environ, ENV_PROCESS_ID, 0)
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be below {ENV_NUM_PROCESSES}={num_processes}")
  if address is not None and ":" not in address:
    raise ValueError(f"{ENV_COORDINATOR_ADDRESS}={address!r} must be host:port")
  if switch in _FALSE and switch != "" and address is not None:
    raise ValueError(f"{ENV_MULTIHOST}={environ[ENV_MULTIHOST]!r} but {ENV_COORDINATOR_ADDRESS} is set; "
                     "unset one of them")
  wanted = bool(config.get("multihost", False)) or switch in _TRUE or address is not None
  if not wanted:
    if num_processes is not None or process_id is not None:
      raise ValueError(f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} are set but the run is not multi-host; "
                       f"also set {ENV_MULTIHOST}=1 (or --config.multihost=True)")
    return None
  return Settings(address, num_processes, process_id)


def _use_cpu_collectives() -> None:
  """Makes multi-process CPU runs exchange collectives with gloo, unless an implementation is chosen."""
  try:
    current = getattr(jax.config, _CPU_COLLECTIVES_OPTION)
  except AttributeError:  # a JAX without the option: it picks CPU collectives itself
    return
  if not current:
    jax.config.update(_CPU_COLLECTIVES_OPTION, _CPU_COLLECTIVES)


def maybe_initialize(config, environ: Mapping[str, str] | None = None) -> bool:
  """Calls :func:`jax.distributed.initialize` for a multi-host run; returns whether the job is multi-host.

  Call it before anything touches a device. A single-host run only logs its
  devices. Calling it again in an initialized process does nothing more.
  """
  settings = settings_from(config, environ)
  if settings is not None and not jax.distributed.is_initialized():
    _use_cpu_collectives()
    logging.info("joining a multi-host job: %s", settings.as_kwargs() or "settings detected by JAX")
    jax.distributed.initialize(**settings.as_kwargs())
  logging.info("process %d of %d; %d local devices of %d: %s", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               ", ".join(str(d) for d in jax.local_devices()))
  return settings is not None
