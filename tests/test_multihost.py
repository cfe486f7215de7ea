"""Multi-host: a 2-process CPU job on localhost gives the numbers of a 1-process run.

The job is two ``python -m ccmr_jax.main`` processes with one CPU device each,
joined by ``jax.distributed`` (coordinator on a free localhost port, gloo
collectives) and sharing one workdir; the reference is one process with two
CPU devices. Same config, same global batch, same mesh size, so the final
``results.json`` matrices must agree. The three processes run at the same
time to keep the test short on a small machine.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from ccmr_jax import distributed
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 600  # all three processes together; pytest-timeout stops a real hang sooner or later
# As small as the tiny config goes while every task keeps a train batch and a test split.
OVERRIDES = ("--config=configs/tiny.py", "--config.data.scenes.num_train=160", "--config.data.scenes.num_val=8",
             "--config.data.scenes.num_test=40", "--config.train.epochs_per_task=1")
_INHERITED = (distributed.ENV_MULTIHOST, distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES,
              distributed.ENV_PROCESS_ID, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JAX_LOCAL_DEVICE_IDS", "XLA_FLAGS", "JAX_PLATFORMS")


# ---------------------------------------------------------------------------
# when a run is multi-host (no JAX distributed call)


def _config(multihost=False):
  return ml_collections.ConfigDict({"multihost": multihost})


def test_a_plain_run_is_single_host():
  assert distributed.settings_from(_config(), {}) is None
  assert distributed.settings_from(_config(), {distributed.ENV_MULTIHOST: "0"}) is None


def test_the_config_or_the_environment_makes_a_run_multi_host():
  assert distributed.settings_from(_config(True), {}) == distributed.Settings()
  assert distributed.settings_from(_config(), {distributed.ENV_MULTIHOST: "1"}) == distributed.Settings()
  explicit = {distributed.ENV_COORDINATOR_ADDRESS: "10.0.0.2:1234", distributed.ENV_NUM_PROCESSES: "4",
              distributed.ENV_PROCESS_ID: "3"}
  settings = distributed.settings_from(_config(), explicit)
  assert settings.as_kwargs() == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}


@pytest.mark.parametrize("environ, message", [
    ({distributed.ENV_MULTIHOST: "maybe"}, "CCMR_MULTIHOST='maybe'"),
    ({distributed.ENV_MULTIHOST: "1", distributed.ENV_NUM_PROCESSES: "two"}, "CCMR_NUM_PROCESSES='two' is not"),
    ({distributed.ENV_MULTIHOST: "1", distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "2"},
     "CCMR_PROCESS_ID=2 must be below CCMR_NUM_PROCESSES=2"),
    ({distributed.ENV_COORDINATOR_ADDRESS: "localhost"}, "must be host:port"),
    ({distributed.ENV_MULTIHOST: "0", distributed.ENV_COORDINATOR_ADDRESS: "h:1"}, "unset one of them"),
    ({distributed.ENV_PROCESS_ID: "1"}, "the run is not multi-host"),
])
def test_a_bad_environment_is_named(environ, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
    distributed.settings_from(_config(), environ)


# ---------------------------------------------------------------------------
# the 2-process job against the 1-process run


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _environment(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
  env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), **extra)
  return env


class _Job:
  """Processes started with their output in files, stopped (by their own ids) if anything goes wrong."""

  def __init__(self, log_dir):
    self.log_dir = log_dir
    self.procs: dict[str, subprocess.Popen] = {}

  def start(self, name: str, workdir: str, env: dict[str, str], *flags: str) -> None:
    log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
    self.procs[name] = subprocess.Popen(
        [sys.executable, "-m", "ccmr_jax.main", *OVERRIDES, *flags, f"--workdir={workdir}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()

  def tail(self, name: str, chars: int = 3000) -> str:
    with open(os.path.join(self.log_dir, f"{name}.log"), "rb") as f:
      return f.read().decode("utf-8", "replace")[-chars:]

  def report(self) -> str:
    return "\n".join(f"----- {name} (exit {p.returncode}) -----\n{self.tail(name)}" for name, p in self.procs.items())

  def wait(self, deadline_s: float) -> None:
    """Waits for every process; stops them all at the first failure or at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
      codes = {name: p.poll() for name, p in self.procs.items()}
      failed = [name for name, code in codes.items() if code not in (None, 0)]
      if failed:
        self.stop()
        pytest.fail(f"{failed} exited with an error:\n{self.report()}")
      if all(code == 0 for code in codes.values()):
        return
      if time.monotonic() > end:
        self.stop()
        pytest.fail(f"not finished after {deadline_s:.0f}s:\n{self.report()}")
      time.sleep(0.5)

  def stop(self) -> None:
    for p in self.procs.values():
      if p.poll() is None:
        p.kill()
    for p in self.procs.values():
      p.wait(timeout=30)


def _assert_close(single, multi, where="policies"):
  if isinstance(single, dict):
    assert set(single) == set(multi), where
    for key in single:
      _assert_close(single[key], multi[key], f"{where}.{key}")
  elif isinstance(single, list):
    assert len(single) == len(multi), where
    for i, (a, b) in enumerate(zip(single, multi)):
      _assert_close(a, b, f"{where}[{i}]")
  elif isinstance(single, float) and isinstance(multi, float):
    assert math.isclose(single, multi, rel_tol=1e-5, abs_tol=1e-3), f"{where}: {single} vs {multi}"
  else:
    assert single == multi, f"{where}: {single!r} vs {multi!r}"


@pytest.mark.slow
def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
  for attempt in range(2):  # the free port may be taken before the coordinator binds it: then once more
    single_dir, multi_dir = str(tmp_path / f"single{attempt}"), str(tmp_path / f"multi{attempt}")
    coordinator = f"127.0.0.1:{_free_port()}"
    job = _Job(str(tmp_path))
    try:
      job.start("single", single_dir, _environment(devices=2))
      for process_id in range(2):
        env = _environment(devices=1, **{distributed.ENV_COORDINATOR_ADDRESS: coordinator,
                                         distributed.ENV_NUM_PROCESSES: "2",
                                         distributed.ENV_PROCESS_ID: str(process_id)})
        job.start(f"process_{process_id}", multi_dir, env, "--config.multihost=True")
      job.wait(DEADLINE_S)
      break
    except pytest.fail.Exception as failure:
      if attempt or "address already in use" not in str(failure).lower():
        raise
    finally:
      job.stop()

  for process_id in range(2):
    assert f"process {process_id} of 2; 1 local devices of 2" in job.tail(f"process_{process_id}", 10**6)
  with open(os.path.join(single_dir, "results.json")) as f:
    single = json.load(f)
  with open(os.path.join(multi_dir, "results.json")) as f:
    multi = json.load(f)
  assert (single["processes"], single["devices"]) == (1, 2)
  assert (multi["processes"], multi["devices"]) == (2, 2)
  assert multi["tasks_trained"] == single["tasks_trained"] == 2
  for task in range(2):  # both processes wrote into one Orbax snapshot per task
    assert os.path.isdir(os.path.join(multi_dir, "snapshots", f"task_{task:02d}"))
  for key in ("policies", "policies_agnostic", "zero_shot", "analysis"):
    _assert_close(single[key], multi[key], key)
