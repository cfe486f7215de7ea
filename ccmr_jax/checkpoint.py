"""Orbax snapshots of the encoders, one per task: ``workdir/snapshots/task_TT``.

The consolidated regularizer states of a continual strategy are saved the
same way after each task, in ``workdir/continual/task_TT/regularizers``.

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


def regularizers_dir(workdir: str, task: int) -> str:
  return os.path.join(files.absolute(workdir), "continual", f"task_{task:02d}", "regularizers")


def _save(path: str, tree) -> str:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return path


def _restore(path: str, abstract_tree, what: str, fix: str):
  if not files.is_dir(path):
    raise FileNotFoundError(f"no {what} at {path}")
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path, abstract_tree)
  except Exception as e:  # Orbax raises many types for bad files; name the folder and the fix.
    raise ValueError(f"{what} at {path} is unreadable ({type(e).__name__}: {e}); {fix}") from e
  finally:
    checkpointer.close()


def save_snapshot(workdir: str, task: int, params) -> str:
  """Writes ``S_task``; replaces an existing one only if it is incomplete."""
  return _save(snapshot_dir(workdir, task), params)


def restore_snapshot(workdir: str, task: int, abstract_params):
  """Reads ``S_task`` into the structure, shapes and shardings of ``abstract_params``.

  Raises:
    FileNotFoundError: if the snapshot does not exist.
    ValueError: if it cannot be read as those params (corrupt, truncated, or
      made by another model configuration).
  """
  return _restore(snapshot_dir(workdir, task), abstract_params, f"snapshot for task {task}",
                  f"delete that folder to retrain task {task} from the previous snapshot")


def save_regularizers(workdir: str, task: int, states) -> str:
  """Writes the consolidated regularizer states after task ``task`` (``continual/task_TT/regularizers``)."""
  return _save(regularizers_dir(workdir, task), states)


def restore_regularizers(workdir: str, task: int, abstract_states):
  """Reads the regularizer states saved after task ``task`` into the structure of ``abstract_states``.

  Raises:
    FileNotFoundError: if they were not saved.
    ValueError: if they cannot be read as those states.
  """
  return _restore(regularizers_dir(workdir, task), abstract_states, f"regularizer state of task {task}",
                  f"delete snapshots/task_{task:02d} and that folder to retrain task {task}")


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
