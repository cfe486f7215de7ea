"""One data-parallel mesh over every device of every host.

Parameters and optimizer state are replicated; batches are split along the
``data`` axis. ``jax.jit`` with these ``NamedSharding``s is the whole
distribution layer: XLA inserts the collectives (the all-gather the
contrastive loss needs, the gradient all-reduce).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: all devices, all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_divisible(global_batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  """Raises a clear error if the batch cannot be split evenly over the mesh."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(f"{what}={global_batch_size} is not divisible by the {devices} devices; "
                     f"use a multiple of {devices}")


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of a batch into global arrays sharded on ``data``."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicate(tree, mesh: Mesh):
  """Places a pytree of host values on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
