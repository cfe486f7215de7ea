"""End to end: wall time and peak memory of a whole run of ``python -m ccmr_jax.main``.

  python -m benchmarks.end_to_end                          # the embedded default (configs/scenes.py)
  python -m benchmarks.end_to_end --quick                  # configs/tiny.py
  python -m benchmarks.end_to_end --config=configs/scenes.py --override=--config.train.strategy=joint

The run is a child process with a fresh workdir (a temporary folder unless
``--workdir`` is given); its wall time is measured around it, its peak
resident memory is the child's ``ru_maxrss`` (``getrusage(RUSAGE_CHILDREN)``),
and the per-task training and evaluation seconds come from its
``results.json``. Targets for the default: at most 180 s and 2 GiB.

The wall time is split into stages by the time stamps of the run's own log
lines (:func:`stage_breakdown`): start-up (Python, imports, JAX's backend),
the task stream (data generation, tokenizer), the pretraining of the towers
when they are not cached yet, the model set-up and the zero-shot row,
training and evaluation per task (from ``results.json``), and the report.
Compilation is logged by JAX in the child (``JAX_LOG_COMPILES=1``: tracing,
lowering and XLA compilation of every jitted program) and reported as its
sum, which overlaps the stages it happened in.

For the default, the run's training steps (the tasks' and, when the towers
were not cached, the pretraining's, from its log) give a floor: their model
FLOPs (``steps × GFLOP/step`` of the ``default`` workload, the matmuls
counted analytically) over the best matmul rate of this machine (a jitted
``4096³`` product and numpy's BLAS, timed after the run). No implementation of
these steps in float32 runs faster on this machine: a target below the floor
plus the run's other stages cannot be met without a lighter default. Each
task's line gives its total steps, so the floor is for a fresh workdir, as
this script always uses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks import common, workloads

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPOSITORY, "configs", "scenes.py")
TARGET_SECONDS = 180
TARGET_BYTES = 2 * 2 ** 30
# absl's log prefix: severity, month and day, time of day (local), thread, file:line.
_LOG_LINE = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) +\d+ +[\w.]+:\d+\] (.*)$")
_STEPS_LINE = re.compile(r"^(?:task \d+ \(.*\)|pretraining): (\d+) steps")
_COMPILE_LINE = re.compile(r"^Finished (?:tracing|jaxpr to MLIR module conversion|XLA compilation) .* in ([\d.]+) sec$")
# Where each stage starts, in the order the program runs them: the first log message matching a regular
# expression (the report: the last one, after the last task).
STAGE_MARKERS = (
    ("start-up: Python, imports, JAX backend", None, "first"),
    ("task stream: data generation, tokenizer", r"^process \d+ of \d+", "first"),
    ("pretraining the towers (not cached yet)", r"^no cached pretrained towers", "first"),
    ("model set-up, zero-shot row", r"^(encoders initialised|pretrained: mean R@1)", "first"),
    ("training and evaluation (per task below)", r"^task 0 \(", "first"),
    ("report: results, analysis, plots", r"^task \d+ done", "last"),
)


def run(config: str, workdir: str, overrides: list[str]) -> dict:
  """Runs the program once; returns wall seconds, peak RSS bytes and the run's ``results.json``."""
  if os.path.exists(os.path.join(workdir, "config.json")):
    raise SystemExit(f"{workdir} already holds a run; give a fresh --workdir")
  command = [sys.executable, "-m", "ccmr_jax.main", f"--config={os.path.abspath(config)}",
             f"--workdir={os.path.abspath(workdir)}", *overrides]
  print("running: " + " ".join(command), flush=True)
  started = time.time()
  completed = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY,
                             env=dict(os.environ, JAX_LOG_COMPILES="1"))
  ended = time.time()
  if completed.returncode:
    raise SystemExit(f"the run failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
  peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  return {"wall_s": ended - started, "peak_rss_bytes": peak_kib * 1024, "results": results,
          "stages": stage_breakdown(completed.stderr, started, ended),
          "steps": steps_trained(completed.stderr)}


def _log_events(log: str, started: float) -> list[tuple[float, str]]:
  """``(seconds since the run started, message)`` of every absl log line of the run."""
  year = datetime.datetime.fromtimestamp(started).year
  events = []
  for line in log.splitlines():
    match = _LOG_LINE.match(line)
    if match:
      month, day, hour, minute, second, message = match.groups()
      stamp = datetime.datetime(year, int(month), int(day), int(hour), int(minute)) + \
          datetime.timedelta(seconds=float(second))
      events.append((stamp.timestamp() - started, message))
  return events


def steps_trained(log: str) -> int:
  """Training steps the run's log announces: every task's and, when it happened, the pretraining's."""
  return sum(int(m.group(1)) for _, message in _log_events(log, time.time()) if (m := _STEPS_LINE.match(message)))


def stage_breakdown(log: str, started: float, ended: float) -> dict:
  """Seconds per stage of one run, from its log (see the module docstring), and the summed compilation seconds.

  A stage lasts from its marker's log line to the next stage's that occurred;
  a stage whose marker never appears (the pretraining, when the towers are
  cached) is left out.
  """
  events = _log_events(log, started)
  starts = [(STAGE_MARKERS[0][0], 0.0)]
  for name, marker, which in STAGE_MARKERS[1:]:
    found = [t for t, message in events if re.search(marker, message)]
    if found:
      starts.append((name, found[0] if which == "first" else found[-1]))
  bounds = [t for _, t in starts[1:]] + [ended - started]
  stages = {name: end - begin for (name, begin), end in zip(starts, bounds)}
  compile_s = sum(float(m.group(1)) for _, message in events if (m := _COMPILE_LINE.match(message)))
  return {"stages": stages, "compile_s": compile_s}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG)
  parser.add_argument("--workdir", default=None, help="a fresh folder (default: a temporary one, removed after)")
  parser.add_argument("--override", action="append", default=[], help="a --config.x=y flag for the run")
  parser.add_argument("--quick", action="store_true", help="configs/tiny.py")
  args = parser.parse_args(argv)
  if args.quick:
    args.config = os.path.join(REPOSITORY, "configs", "tiny.py")
  common.print_header("End to end: one whole run", argv)
  if args.workdir:
    outcome = run(args.config, args.workdir, args.override)
  else:
    with tempfile.TemporaryDirectory(prefix="ccmr_end_to_end_") as workdir:
      outcome = run(args.config, os.path.join(workdir, "run"), args.override)
  is_default = os.path.abspath(args.config) == DEFAULT_CONFIG and not args.override
  print_outcome(outcome, is_default)
  if is_default:
    print_floor(outcome["steps"], workloads.get_workload("default").train_flops_per_step(), best_matmul_rate())


def best_matmul_rate(rounds: int = 3) -> float:
  """FLOP/s of the fastest of :func:`common.matmul_peaks` (``4096³`` on CPU) on this machine, median of ``rounds``."""
  values = common.alternate(common.matmul_peaks(), rounds, warmup=True)
  return max(common.median(v) for v in values.values())


def print_floor(steps: int, flops_per_step: float, peak_flops: float) -> None:
  """The least time ``steps`` training steps can take on this machine: their model FLOPs at ``peak_flops``."""
  if steps == 0:
    print("training floor: no training steps found in the run's log (has its format changed?)")
    return
  floor_s = steps * flops_per_step / peak_flops
  print(f"training floor: {steps} steps × {flops_per_step / 1e9:.1f} GFLOP = {steps * flops_per_step / 1e12:.1f} "
        f"TFLOP; at this machine's best matmul rate ({peak_flops / 1e9:.1f} GFLOP/s) at least {floor_s:.1f} s "
        f"of the {TARGET_SECONDS} s target")


def print_outcome(outcome: dict, is_default: bool) -> None:
  """The stage table, the per-task table, the totals and (for the default) the targets."""
  wall, peak = outcome["wall_s"], outcome["peak_rss_bytes"]
  stages = outcome["stages"]
  print(common.markdown_table(["stage", "s", "share"], [[name, round(s, 1), f"{100 * s / wall:.1f}%"]
                                                        for name, s in stages["stages"].items()]))
  print(f"of which compilation (tracing, lowering, XLA), summed over the run: {stages['compile_s']:.1f} s")
  timings = outcome["results"].get("timings", [])
  print(common.markdown_table(["task", "train s", "eval s"], [[t["task"], t["train_s"], t["eval_s"]] for t in timings]))
  train_s, eval_s = sum(t["train_s"] for t in timings), sum(t["eval_s"] for t in timings)
  print(f"\nwall time {wall:.1f}s, peak RSS {peak / 2 ** 30:.2f} GiB; "
        f"training {train_s:.1f}s, evaluation {eval_s:.1f}s")
  if is_default:
    print(f"targets of the embedded default: <= {TARGET_SECONDS}s {'met' if wall <= TARGET_SECONDS else 'NOT met'}, "
          f"<= {TARGET_BYTES / 2 ** 30:.0f} GiB {'met' if peak <= TARGET_BYTES else 'NOT met'}")


if __name__ == "__main__":
  main()
