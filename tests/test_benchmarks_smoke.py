"""Every benchmark script runs end to end in its ``--quick`` mode (peers only where installed).

Each script runs as its users run it, ``python -m benchmarks.NAME``, on one
CPU device. These runs check the scripts work, not their speed, so XLA
compiles at its lowest optimisation level and the runs share a compilation
cache: compiling is most of their time.
"""

import os
import subprocess
import sys

import pytest

from benchmarks import common, end_to_end

PEERS = {"open_clip": common.module_available("open_clip") and common.module_available("torch"),
         "faiss": common.module_available("faiss")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def run_script(name, *flags):
    completed = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", *flags], env=env,
                               capture_output=True, text=True, cwd=end_to_end.REPOSITORY)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "machine: " in completed.stdout
    return completed.stdout

  return run_script


def test_train_throughput(run):
  out = run("train_throughput")
  assert "| tiny | float32 | 8 |" in out and "MFU vs jitted matmul" in out


def test_vs_open_clip(run):
  out = run("vs_open_clip")
  assert "| ccmr_jax |" in out
  assert ("ccmr_jax pairs/s ÷ open_clip pairs/s" in out) == PEERS["open_clip"]


def test_embed_throughput(run):
  out = run("embed_throughput")
  assert "| tiny | image |" in out and "| tiny | text |" in out


def test_search(run, tmp_path):
  plot = tmp_path / "frontier.png"
  out = run("search", f"--plot={plot}")
  assert "exact jax, ccmr_jax.exact.top_k" in out and "scann recall-target build" in out
  assert "ScaNN one-thread query time, least squares: fixed_us=" in out
  assert ("faiss IVF" in out) == PEERS["faiss"]
  assert plot.read_bytes().startswith(b"\x89PNG")


def test_end_to_end(run):
  out = run("end_to_end", "--override=--config.data.num_tasks=1")
  assert "wall time" in out and "peak RSS" in out
