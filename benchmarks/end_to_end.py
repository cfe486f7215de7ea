"""End to end: wall time and peak memory of a whole run of ``python -m ccmr_jax.main``.

  python -m benchmarks.end_to_end                          # the embedded default (configs/scenes.py)
  python -m benchmarks.end_to_end --quick                  # configs/tiny.py
  python -m benchmarks.end_to_end --config=configs/scenes.py --override=--config.train.strategy=joint

The run is a child process with a fresh workdir (a temporary folder unless
``--workdir`` is given); its wall time is measured around it, its peak
resident memory is the child's ``ru_maxrss`` (``getrusage(RUSAGE_CHILDREN)``),
and the per-task training and evaluation seconds come from its
``results.json``. Targets for the default: at most 5 minutes and 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks import common

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPOSITORY, "configs", "scenes.py")
TARGET_SECONDS = 300
TARGET_BYTES = 4 * 2 ** 30


def run(config: str, workdir: str, overrides: list[str]) -> dict:
  """Runs the program once; returns wall seconds, peak RSS bytes and the run's ``results.json``."""
  if os.path.exists(os.path.join(workdir, "config.json")):
    raise SystemExit(f"{workdir} already holds a run; give a fresh --workdir")
  command = [sys.executable, "-m", "ccmr_jax.main", f"--config={os.path.abspath(config)}",
             f"--workdir={os.path.abspath(workdir)}", *overrides]
  print("running: " + " ".join(command), flush=True)
  start = time.perf_counter()
  completed = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY)
  wall = time.perf_counter() - start
  if completed.returncode:
    raise SystemExit(f"the run failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
  peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  return {"wall_s": wall, "peak_rss_bytes": peak_kib * 1024, "results": results}


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
  timings = outcome["results"].get("timings", [])
  print(common.markdown_table(["task", "train s", "eval s"], [[t["task"], t["train_s"], t["eval_s"]] for t in timings]))
  wall, peak = outcome["wall_s"], outcome["peak_rss_bytes"]
  train_s, eval_s = sum(t["train_s"] for t in timings), sum(t["eval_s"] for t in timings)
  print(f"\nwall time {wall:.1f}s, peak RSS {peak / 2 ** 30:.2f} GiB; "
        f"training {train_s:.1f}s, evaluation {eval_s:.1f}s")
  if os.path.abspath(args.config) == DEFAULT_CONFIG and not args.override:
    print(f"targets of the embedded default: <= {TARGET_SECONDS}s {'met' if wall <= TARGET_SECONDS else 'NOT met'}, "
          f"<= 4 GiB {'met' if peak <= TARGET_BYTES else 'NOT met'}")


if __name__ == "__main__":
  main()
