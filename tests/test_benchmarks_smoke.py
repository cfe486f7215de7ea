"""Every benchmark script runs end to end in its ``--quick`` mode (peers only where installed).

Each script runs as its users run it, ``python -m benchmarks.NAME``, on one
CPU device. These runs check the scripts work, not their speed, so XLA
compiles at its lowest optimisation level and the runs share a compilation
cache: compiling is most of their time.
"""

import datetime
import os
import subprocess
import sys

import pytest

from benchmarks import common, end_to_end, vs_open_clip, workloads
from conftest import xla_flags

PEERS = {"open_clip": common.module_available("open_clip") and common.module_available("torch"),
         "faiss": common.module_available("faiss")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
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
  assert "| ccmr_jax |" in out and "MFU vs jitted matmul" in out and "MFU vs numpy BLAS matmul" in out
  assert ("ccmr_jax pairs/s ÷ open_clip pairs/s" in out) == PEERS["open_clip"]
  assert ("ceiling on this machine" in out) == PEERS["open_clip"]


def test_vs_open_clip_ceiling_is_the_best_peak_over_open_clips_flops(capsys):
  workload = workloads.get_workload("small")
  flops = workload.train_flops_per_step()
  # open_clip at 2 s/step, ccmr_jax at 1.5 s/step (the median); the best peak runs the step's FLOPs in 0.5 s.
  vs_open_clip.print_tables(workload, {"ccmr_jax": [1.5, 1.4, 1.7], "open_clip": [2.0]},
                            {"jitted matmul": flops / 0.8, "numpy BLAS matmul": flops / 0.5})
  out = capsys.readouterr().out
  assert "ccmr_jax pairs/s ÷ open_clip pairs/s = 1.33" in out
  assert "ceiling on this machine (numpy BLAS matmul 60.0 GFLOP/s ÷ open_clip's 15.0) = 4.00\n" in out
  assert "| ccmr_jax | 1.5 | 85.33 | 20.01 | 53.3% | 33.3% |" in out
  assert "| open_clip | 2 | 64 | 15.01 | 40.0% | 25.0% |" in out


def test_profile_step(run):
  out = run("profile_step")
  assert "### ccmr_jax, tiny" in out and "| dense matmuls |" in out and "| backward |" in out
  assert ("### open_clip, tiny" in out and "| aten::mm |" in out) == PEERS["open_clip"]


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
  assert "| start-up: Python, imports, JAX backend |" in out and "| report: results, analysis, plots |" in out
  assert "of which compilation" in out


def _dies(code):
  os._exit(code)


def test_a_worker_that_dies_is_an_error_not_a_hang():
  with pytest.raises(common.WorkerError, match="exit code 3"):
    common.Worker(_dies, 3)


def test_end_to_end_stages_come_from_the_log_time_stamps():
  started = datetime.datetime(2026, 12, 6, 10, 0, 0).timestamp()
  log = "\n".join([
      "I1206 10:00:03.000000 1 distributed.py:145] process 0 of 1; 1 local devices of 1: cpu:0",
      "W1206 10:00:04.000000 1 dispatch.py:204] Finished XLA compilation of jit(step) in 1.5 sec",
      "I1206 10:00:10.000000 1 pretrain.py:216] no cached pretrained towers for this pretraining config: ...",
      "W1206 10:00:11.000000 1 dispatch.py:204] Finished tracing step for jit in 0.25 sec",
      "I1206 10:01:00.000000 1 pretrain.py:177] pretrained: mean R@1 50.00 on the corpus test split",
      "I1206 10:01:05.500000 1 experiment.py:319] task 0 (a): 10 steps on 100 images (strategy finetune)",
      "I1206 10:02:00.000000 1 experiment.py:465] task 0 done: mean R@1 on it 1.00 (50s train, 4s eval)",
      "I1206 10:02:10.000000 1 experiment.py:465] task 1 done: mean R@1 on it 1.00 (5s train, 4s eval)",
      "a line that is not absl's"])
  breakdown = end_to_end.stage_breakdown(log, started, started + 135.0)
  assert breakdown["stages"] == {
      "start-up: Python, imports, JAX backend": 3.0, "task stream: data generation, tokenizer": 7.0,
      "pretraining the towers (not cached yet)": 50.0, "model set-up, zero-shot row": 5.5,
      "training and evaluation (per task below)": 64.5, "report: results, analysis, plots": 5.0}
  assert breakdown["compile_s"] == 1.75
  cached = end_to_end.stage_breakdown(log.replace("no cached pretrained", "cached"), started, started + 135.0)
  assert "pretraining the towers (not cached yet)" not in cached["stages"]
  assert cached["stages"]["task stream: data generation, tokenizer"] == 57.0
  pretraining = "I1206 10:00:12.000000 1 pretrain.py:138] pretraining: 936 steps of 128 pairs"
  assert end_to_end.steps_trained(log) == 10 and end_to_end.steps_trained(log + "\n" + pretraining) == 946


def test_end_to_end_floor_is_the_steps_flops_at_the_peak(capsys):
  end_to_end.print_floor(1000, 18.6e9, 150e9)
  assert capsys.readouterr().out == ("training floor: 1000 steps × 18.6 GFLOP = 18.6 TFLOP; at this machine's best "
                                     "matmul rate (150.0 GFLOP/s) at least 124.0 s of the 180 s target\n")
  end_to_end.print_floor(0, 18.6e9, 150e9)
  assert "no training steps found" in capsys.readouterr().out


def _tables(out):
  """Each markdown table of ``out`` as ``(header, rows)`` of stripped cells."""
  tables, lines = [], []
  for line in out.splitlines() + [""]:
    if line.startswith("|"):
      lines.append([cell.strip() for cell in line.strip("|").split("|")])
    elif lines:
      tables.append((lines[0], lines[2:]))
      lines = []
  return tables


def test_real_size(run, tmp_path):
  from benchmarks import real_size
  out = run("real_size", f"--root={tmp_path}")
  assert "40 images: stand-in written" in out
  (throughput, rows), (memory, memory_rows) = _tables(out)
  assert tuple(throughput) == real_size.THROUGHPUT_COLUMNS and tuple(memory) == real_size.MEMORY_COLUMNS
  assert rows[0][:2] == ["40", "28/6/6"] and len(memory_rows) == 1
  for header, row in ((throughput, rows[0]), (memory, memory_rows[0])):
    values = {name: float(cell.replace(",", "")) for name, cell in zip(header, row) if name != "train/val/test"}
    growth = values.pop("other pipeline growth", 0.0)  # may be 0: the heap can absorb a few small batches
    assert growth >= 0 and all(value > 0 for value in values.values()), values
  assert os.listdir(tmp_path / "flickr30k-40") == ["manual"]  # the TFDS files and the cache are removed
