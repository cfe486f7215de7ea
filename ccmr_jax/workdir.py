"""The workdir: every path of its layout, its config, its tokenizer, where a rerun resumes, its lock.

A workdir (a local folder or a ``gs://`` prefix) holds one run:

  config.json                    the config of the run (a rerun must match)
  tokenizer.json                 the tokenizer, fixed before task 0
  snapshots/task_TT/             Orbax snapshot S_t of the encoders
  progress/task_TT/step_SSSSSS/  the newest mid-task train state of the task in training
  continual/task_TT/regularizers/ Orbax regularizer states consolidated after task t
  continual/task_TT/replay.npz   the replay memory after task t (tasks 0..t)
  embeddings/snapshot_SS/task_KK.npz
                                 task k's evaluation split embedded by S_s,
                                 with the ground-truth links (see README: exported embeddings)
  galleries/task_KK.json         what task k's gallery holds: image ids, caption texts, which
                                 image each caption describes (the rows of its indexes)
  index/snapshot_SS/task_KK/{images,captions}/
                                 ScaNN searchers over those embeddings (task-aware search)
  index/union/POLICY/after_task_TT/{images,captions}/
                                 ScaNN searchers over the union of seen galleries
                                 as POLICY embeds them (task-agnostic search)
  eval/zero_shot.json            R[-1, k]: the starting encoders on every task (task-aware)
  eval/after_task_TT.json        R[t, k] for both scopes and every policy, every k <= t
  results.json, report.md, plots/*.png, tensorboard/
  .lock                          held by the live process that runs in the workdir

Resuming: tasks whose evaluation is written are finished; the first task
without one is where a rerun starts (see :func:`first_unfinished_task`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from typing import Iterator

import ml_collections

from ccmr_jax import files, manifest
from ccmr_jax.cli import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
GALLERIES = ("images", "captions")


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer.json")


def snapshots_root(workdir: str) -> str:
  return os.path.join(files.absolute(workdir), "snapshots")


def snapshot_dir(workdir: str, task: int) -> str:
  return os.path.join(snapshots_root(workdir), f"task_{task:02d}")


def progress_dir(workdir: str, task: int) -> str:
  return os.path.join(files.absolute(workdir), "progress", f"task_{task:02d}")


def progress_step_dir(workdir: str, task: int, step: int) -> str:
  return os.path.join(progress_dir(workdir, task), f"step_{step:06d}")


def regularizers_dir(workdir: str, task: int) -> str:
  return os.path.join(files.absolute(workdir), "continual", f"task_{task:02d}", "regularizers")


def replay_path(workdir: str, task: int) -> str:
  return os.path.join(workdir, "continual", f"task_{task:02d}", "replay.npz")


def embeddings_path(workdir: str, snapshot: int, task: int) -> str:
  return os.path.join(workdir, "embeddings", f"snapshot_{snapshot:02d}", f"task_{task:02d}.npz")


def gallery_path(workdir: str, task: int) -> str:
  return os.path.join(workdir, "galleries", f"task_{task:02d}.json")


def index_dir(workdir: str, snapshot: int, task: int, gallery: str) -> str:
  return os.path.join(workdir, "index", f"snapshot_{snapshot:02d}", f"task_{task:02d}", gallery)


def union_index_dir(workdir: str, policy: str, task: int, gallery: str) -> str:
  return os.path.join(workdir, "index", "union", policy, f"after_task_{task:02d}", gallery)


def mapped_index_dir(workdir: str, policy: str, after_task: int, task: int, gallery: str) -> str:
  """The index of task ``task``'s stored gallery moved into ``S_t``'s space by ``policy`` after task ``t``."""
  return os.path.join(workdir, "index", "mapped", policy, f"after_task_{after_task:02d}", f"task_{task:02d}", gallery)


def drift_maps_path(workdir: str, after_task: int) -> str:
  """The maps between ``S_t`` and every older snapshot, fitted after task ``t`` (:mod:`ccmr_jax.drift_maps`)."""
  return os.path.join(workdir, "maps", f"after_task_{after_task:02d}.npz")


def zero_shot_path(workdir: str) -> str:
  return os.path.join(workdir, "eval", "zero_shot.json")


def evaluation_path(workdir: str, task: int) -> str:
  return os.path.join(workdir, "eval", f"after_task_{task:02d}.json")


def results_path(workdir: str) -> str:
  return os.path.join(workdir, "results.json")


def report_path(workdir: str) -> str:
  return os.path.join(workdir, "report.md")


def plots_dir(workdir: str) -> str:
  return os.path.join(workdir, "plots")


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, "tensorboard")


def first_unfinished_task(workdir: str, num_tasks: int) -> int:
  """The first task without a written evaluation: where a rerun resumes (``num_tasks`` when all are done)."""
  t = 0
  while t < num_tasks and manifest.is_sealed(evaluation_path(workdir, t)):
    t += 1
  return t


def config_json(config: ml_collections.ConfigDict) -> dict:
  """The config as the JSON object ``config.json`` stores."""
  return json.loads(config.to_json())


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  """One line per field that differs between two config documents, ``section.field: ...``."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: workdir has {a!r}, this run has {b!r}")
  return out


def _check_writable(workdir: str, process_index: int) -> None:
  try:
    files.makedirs(workdir)
    probe = os.path.join(workdir, f".write_test_{process_index}")  # one per process: no race
    files.atomic_write_text(probe, "ok")
    files.remove(probe)
  except OSError as e:
    if e.errno in DISK_FULL:
      raise
    raise UserError(f"cannot write to workdir {workdir}: {e.strerror or e}; choose another --workdir") from e


def prepare(workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool = False,
            process_index: int = 0) -> list[str]:
  """Creates the workdir or checks that it belongs to the same config; returns the differences accepted.

  With ``allow_config_change`` a workdir of another config is taken over: its
  ``config.json`` becomes this config (the caller logs the differences).
  Only process 0 writes ``config.json``.

  Raises:
    UserError: the workdir cannot be written, or holds a run of another config.
  """
  _check_writable(workdir, process_index)
  new = config_json(config)
  differences = []
  if manifest.is_sealed(config_path(workdir)):
    differences = config_differences(manifest.read_json(config_path(workdir)), new)
    if differences and not allow_config_change:
      raise UserError(f"workdir {workdir} holds a run with another config:\n  " + "\n  ".join(differences)
                      + "\nUse a new --workdir, delete this one to start over, or pass --allow_config_change "
                      "to resume it under the new config.")
  if process_index == 0 and (not manifest.is_sealed(config_path(workdir)) or allow_config_change):
    manifest.write_json(config_path(workdir), new)
  return differences


def _lock_file(workdir: str) -> str:
  """The file the lock is taken on: in a local workdir itself; for a cloud workdir, on this machine."""
  if not files.is_remote(workdir):
    return os.path.join(os.path.abspath(workdir), ".lock")
  digest = hashlib.sha256(workdir.rstrip("/").encode()).hexdigest()[:16]
  folder = os.path.join(tempfile.gettempdir(), "ccmr_jax_locks")
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f"{digest}.lock")


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir for this process; a second holder stops at once with the first one named.

  The lock is an ``fcntl`` lock on ``workdir/.lock``: the kernel drops it when
  its process ends, however it ends, so a killed run never blocks its rerun.
  The file records the holder's host and pid for the error message. A cloud
  workdir is locked on this machine only (a file under the temporary folder
  keyed by its path): two runs on different machines are not stopped.

  Raises:
    UserError: another live process holds the workdir.
  """
  try:
    if not files.is_remote(workdir):
      os.makedirs(workdir, exist_ok=True)
    handle = open(_lock_file(workdir), "a+")
  except OSError as e:
    if e.errno in DISK_FULL:
      raise
    raise UserError(f"cannot write to workdir {workdir}: {e.strerror or e}; choose another --workdir") from e
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise UserError(f"workdir {workdir} is in use by {holder}; wait for that run to finish (or stop it), "
                      "or choose another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    handle.flush()
    yield
  finally:
    handle.close()
