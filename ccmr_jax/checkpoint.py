"""Orbax snapshots of the encoders, one per task: ``workdir/snapshots/task_TT``.

A snapshot ``S_t`` holds the dual encoder's params right after training task
``t`` and is restorable on its own into the model's abstract params. Orbax
writes into a temporary folder and renames it when complete (on cloud
storage it marks completion instead), so a snapshot folder that exists is
whole. Workdirs may be local or ``gs://``.
"""

from __future__ import annotations

import os
import re

import jax
import orbax.checkpoint as ocp

from ccmr_jax import files

_SNAPSHOT = re.compile(r"^task_(\d+)$")


def snapshot_dir(workdir: str, task: int) -> str:
  return os.path.join(files.absolute(workdir), "snapshots", f"task_{task:02d}")


def save_snapshot(workdir: str, task: int, params) -> str:
  """Writes ``S_task``; replaces an existing one only if it is incomplete."""
  path = snapshot_dir(workdir, task)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return path


def restore_snapshot(workdir: str, task: int, abstract_params):
  """Reads ``S_task`` into the structure, shapes and shardings of ``abstract_params``.

  Raises:
    FileNotFoundError: if the snapshot does not exist.
    ValueError: if it cannot be read as those params (corrupt, truncated, or
      made by another model configuration).
  """
  path = snapshot_dir(workdir, task)
  if not files.is_dir(path):
    raise FileNotFoundError(f"no snapshot for task {task} at {path}")
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path, abstract_params)
  except Exception as e:  # Orbax raises many types for bad files; name the folder and the fix.
    raise ValueError(f"snapshot {path} is unreadable ({type(e).__name__}: {e}); delete that folder "
                     f"to retrain task {task} from the previous snapshot") from e
  finally:
    checkpointer.close()


def completed_snapshots(workdir: str) -> list[int]:
  """Task indices with a complete snapshot, sorted."""
  root = os.path.join(files.absolute(workdir), "snapshots")
  if not files.is_dir(root):
    return []
  found = (_SNAPSHOT.match(name) for name in files.listdir(root))
  return sorted(int(m.group(1)) for m in found if m)


def abstract_like(params):
  """Shape/dtype/sharding structs of ``params``: the target of a restore."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
