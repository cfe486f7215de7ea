"""The workdir: its layout in one place, config matching, the resume point, and the lock between processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ccmr_jax import files, manifest
from ccmr_jax import workdir as layout
from ccmr_jax.cli import UserError
from configs import tiny
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_layout_names_every_stage_output(tmp_path):
  root = str(tmp_path)
  assert layout.snapshot_dir(root, 3) == os.path.join(root, "snapshots", "task_03")
  assert layout.progress_step_dir(root, 1, 40) == os.path.join(root, "progress", "task_01", "step_000040")
  assert layout.embeddings_path(root, 2, 1) == os.path.join(root, "embeddings", "snapshot_02", "task_01.npz")
  assert layout.index_dir(root, 2, 1, "images") == os.path.join(root, "index", "snapshot_02", "task_01", "images")
  assert layout.union_index_dir(root, "no_reindex", 4, "captions") == os.path.join(
      root, "index", "union", "no_reindex", "after_task_04", "captions")
  assert layout.evaluation_path(root, 0) == os.path.join(root, "eval", "after_task_00.json")
  assert layout.replay_path(root, 1) == os.path.join(root, "continual", "task_01", "replay.npz")


def test_the_resume_point_is_the_first_task_without_an_evaluation(tmp_path):
  root = str(tmp_path)
  assert layout.first_unfinished_task(root, 3) == 0
  for t in (0, 1):
    manifest.write_json(layout.evaluation_path(root, t), {})
  assert layout.first_unfinished_task(root, 3) == 2
  manifest.write_json(layout.evaluation_path(root, 2), {})
  assert layout.first_unfinished_task(root, 3) == 3


def test_prepare_accepts_its_own_config_and_names_every_difference(tmp_path):
  root = str(tmp_path / "run")
  config = tiny.get_config()
  assert layout.prepare(root, config) == []
  assert layout.prepare(root, config) == []
  config.train.epochs_per_task = 3
  config.seed = 7
  with pytest.raises(UserError, match=r"(?s)seed: workdir has 0, this run has 7.*train.epochs_per_task"):
    layout.prepare(root, config)
  assert len(layout.prepare(root, config, allow_config_change=True)) == 2
  assert files.read_json(layout.config_path(root))["seed"] == 7


def test_a_second_holder_is_refused_and_a_released_lock_is_taken_again(tmp_path):
  root = str(tmp_path / "run")
  with layout.lock(root):
    holder = open(os.path.join(root, ".lock")).read()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in holder
    code = ("import sys; from ccmr_jax import workdir; from ccmr_jax.cli import UserError\n"
            f"try:\n  workdir.lock({root!r}).__enter__()\nexcept UserError as e:\n  print(e); sys.exit(2)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in proc.stdout
  with layout.lock(root):  # released on exit: the same process (or any other) takes it again
    pass


def _main(workdir: str, cache: str) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "-m", "ccmr_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(proc: subprocess.Popen, workdir: str, timeout: float = 300.0) -> None:
  """Until ``proc`` holds the lock of ``workdir`` (its pid is written in the lock file)."""
  path, deadline = os.path.join(workdir, ".lock"), time.monotonic() + timeout
  while not (os.path.exists(path) and f"pid {proc.pid} " in open(path).read()):
    assert proc.poll() is None, f"the run ended before it took the lock: {proc.communicate()[1][-2000:]}"
    assert time.monotonic() < deadline, "timed out waiting for the run to take the lock"
    time.sleep(0.02)


def _results(workdir: str) -> dict:
  with open(layout.results_path(workdir)) as f:
    return json.load(f)


@pytest.mark.slow
def test_two_runs_on_one_workdir_and_a_killed_holder(tmp_path):
  cache = str(tmp_path / "jax_cache")
  shared = str(tmp_path / "shared")
  first = _main(shared, cache)
  _wait_for_lock(first, shared)
  second = _main(shared, cache)
  _, err = second.communicate(timeout=300)
  assert second.returncode == 2, err[-2000:]
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith(
      f"error: workdir {shared} is in use by pid {first.pid} on host {socket.gethostname()}")
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]

  killed = str(tmp_path / "killed")
  victim = _main(killed, cache)
  _wait_for_lock(victim, killed)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  rerun = _main(killed, cache)
  _, err = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, err[-3000:]
  expected, got = _results(killed), _results(shared)  # the run beside a refused second equals one alone
  for key in ("policies", "policies_agnostic", "analysis"):
    assert got[key] == expected[key], key
