"""Orbax snapshots of the encoders, one per task: ``workdir/snapshots/task_TT``.

The consolidated regularizer states of a continual strategy are saved the
same way after each task, in ``workdir/continual/task_TT/regularizers``.

While a task trains, its progress is saved every ``train.checkpoint_every``
steps in ``workdir/progress/task_TT/step_SSSSSS``: the whole train state
(params, optimizer moments, regularizer states, step count). The step count is
also the data position: batches are a pure function of ``(seed, task, epoch)``,
so a restarted run skips the batches already seen and continues bit for bit.
Only the newest progress checkpoint is kept; the task's folder goes once its
snapshot is written.

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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ccmr_jax import files, manifest
from ccmr_jax import workdir as layout

_SNAPSHOT = re.compile(r"^task_(\d+)$")
_PROGRESS = re.compile(r"^step_(\d+)$")


def _save(path: str, tree) -> str:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    manifest.seal_folder(path)
  return path


def _local_parts(leaf) -> list:
  return [shard.data for shard in leaf.addressable_shards] if isinstance(leaf, jax.Array) else [leaf]


def _all_finite(tree) -> bool:
  """Whether every float array of ``tree`` is free of NaN and Inf, checked on this process's shards in numpy."""
  parts = (np.asarray(part) for leaf in jax.tree.leaves(tree) for part in _local_parts(leaf))
  return all(bool(np.isfinite(part).all()) for part in parts if jnp.issubdtype(part.dtype, jnp.inexact))


def _restore(path: str, abstract_tree, what: str, fix: str):
  if not files.is_dir(path):
    raise FileNotFoundError(f"no {what} at {path}")
  try:
    manifest.check_folder(path)
  except manifest.DamagedError as e:
    raise manifest.DamagedError(path, f"{e.problem}; {fix}") from e
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = checkpointer.restore(path, abstract_tree)
  except Exception as e:  # Orbax raises many types for bad files; name the folder and the fix.
    raise files.CorruptFileError(f"{what} at {path} is unreadable ({type(e).__name__}: {e}); {fix}") from e
  finally:
    checkpointer.close()
  if not _all_finite(tree):
    raise files.CorruptFileError(f"{what} at {path} holds NaN or Inf values; {fix}")
  return tree


def save_snapshot(workdir: str, task: int, params) -> str:
  """Writes ``S_task``; replaces an existing one only if it is incomplete."""
  return _save(layout.snapshot_dir(workdir, task), params)


def restore_snapshot(workdir: str, task: int, abstract_params):
  """Reads ``S_task`` into the structure, shapes and shardings of ``abstract_params``.

  Raises:
    FileNotFoundError: if the snapshot does not exist.
    files.CorruptFileError: if it cannot be read as those params (corrupt, truncated, or
      made by another model configuration).
  """
  return _restore(layout.snapshot_dir(workdir, task), abstract_params, f"snapshot for task {task}",
                  f"delete that folder to retrain task {task} from the previous snapshot")


def save_regularizers(workdir: str, task: int, states) -> str:
  """Writes the consolidated regularizer states after task ``task`` (``continual/task_TT/regularizers``)."""
  return _save(layout.regularizers_dir(workdir, task), states)


def restore_regularizers(workdir: str, task: int, abstract_states):
  """Reads the regularizer states saved after task ``task`` into the structure of ``abstract_states``.

  Raises:
    FileNotFoundError: if they were not saved.
    files.CorruptFileError: if they cannot be read as those states.
  """
  return _restore(layout.regularizers_dir(workdir, task), abstract_states, f"regularizer state of task {task}",
                  f"delete snapshots/task_{task:02d} and that folder to retrain task {task}")


def _sealed_numbers(root: str, pattern: re.Pattern) -> list[int]:
  """The numbers in the names of ``root``'s sealed subfolders that match ``pattern``, sorted."""
  if not files.is_dir(root):
    return []
  found = (pattern.match(name) for name in files.listdir(root))
  return sorted(int(m.group(1)) for m in found if m and manifest.is_sealed(os.path.join(root, m.group(0))))


def completed_snapshots(workdir: str) -> list[int]:
  """Task indices with a complete (sealed) snapshot, sorted."""
  return _sealed_numbers(layout.snapshots_root(workdir), _SNAPSHOT)


def abstract_like(params):
  """Shape/dtype/sharding structs of ``params``: the target of a restore."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, params)


def _progress_steps(workdir: str, task: int) -> list[int]:
  return _sealed_numbers(layout.progress_dir(workdir, task), _PROGRESS)


def save_progress(workdir: str, task: int, step: int, state) -> str:
  """Writes the train state after ``step`` steps of task ``task``, then drops the older ones."""
  path = _save(layout.progress_step_dir(workdir, task, step), state)
  if jax.process_index() != 0:
    return path
  for older in _progress_steps(workdir, task):
    if older < step:
      files.remove_tree(layout.progress_step_dir(workdir, task, older))
  return path


def latest_progress(workdir: str, task: int) -> int | None:
  """The step of task ``task``'s newest complete progress checkpoint, or None."""
  steps = _progress_steps(workdir, task)
  return steps[-1] if steps else None


def restore_progress(workdir: str, task: int, step: int, abstract_state):
  """Reads the progress checkpoint of ``task`` at ``step`` into the structure of ``abstract_state``.

  Raises:
    files.CorruptFileError: if it cannot be read as that state.
  """
  path = layout.progress_step_dir(workdir, task, step)
  return _restore(path, abstract_state, f"progress checkpoint of task {task}",
                  f"delete {path} to restart task {task} from its beginning")


def clear_progress(workdir: str, task: int) -> None:
  """Removes task ``task``'s progress checkpoints (its snapshot supersedes them)."""
  if files.is_dir(layout.progress_dir(workdir, task)):
    files.remove_tree(layout.progress_dir(workdir, task))
