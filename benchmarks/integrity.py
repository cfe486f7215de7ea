"""The cost of the manifests: seconds spent writing and checking them in one run, and verify's time.

  python -m benchmarks.integrity                  # the embedded default (configs/scenes.py)
  python -m benchmarks.integrity --quick          # configs/tiny.py

One run of the config in this process (a fresh temporary workdir), with the
manifest functions timed: *write* is hashing what is written and writing the
manifests (sealing a folder re-reads its files), *read* is checking files
against their manifests before they are parsed, including the workdir scan at
the start. Then ``python -m ccmr_jax.verify`` on the finished workdir, timed
as a whole process and as its scan alone.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import common

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Timer:
  """Accumulates the seconds spent in the outermost call of the wrapped functions, per group."""

  def __init__(self):
    self.seconds = {"write": 0.0, "read": 0.0}
    self._depth = 0

  def wrap(self, module, name: str, group: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
      self._depth += 1
      start = time.perf_counter()
      try:
        return original(*args, **kwargs)
      finally:
        self._depth -= 1
        if self._depth == 0:
          self.seconds[group] += time.perf_counter() - start

    setattr(module, name, timed)


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _workdir_bytes(workdir: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(workdir) for name in names)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=os.path.join(REPOSITORY, "configs", "scenes.py"))
  parser.add_argument("--quick", action="store_true", help="configs/tiny.py")
  args = parser.parse_args(argv)
  if args.quick:
    args.config = os.path.join(REPOSITORY, "configs", "tiny.py")
  common.print_header("Integrity: the cost of the manifests", argv)
  from ccmr_jax import experiment, integrity, manifest  # after the header: imports JAX

  timer = _Timer()
  for name in ("seal_folder", "_write_manifest", "entry"):
    timer.wrap(manifest, name, "write")
  for name in ("check_folder", "_mismatch", "_read_manifest"):
    timer.wrap(manifest, name, "read")
  timer.wrap(integrity, "scan", "read")
  config = _load_config(args.config)
  with tempfile.TemporaryDirectory(prefix="ccmr_integrity_") as workdir:
    start = time.perf_counter()
    experiment.run(config, workdir)
    wall = time.perf_counter() - start
    scan_start = time.perf_counter()
    findings = integrity.scan(workdir)
    scan_s = time.perf_counter() - scan_start
    verify_start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ccmr_jax.verify", f"--workdir={workdir}"], check=True, cwd=REPOSITORY,
                   capture_output=True)
    verify_s = time.perf_counter() - verify_start
    size = _workdir_bytes(workdir)
  write, read = timer.seconds["write"], timer.seconds["read"] - scan_s
  print(f"run: {wall:.1f} s wall, {len(findings)} artifacts, {size / 2 ** 20:.1f} MiB in the workdir")
  print(f"manifests written: {write:.2f} s ({100 * write / wall:.2f}% of the run)")
  print(f"files checked before reading: {read:.2f} s ({100 * read / wall:.2f}% of the run)")
  print(f"verify: {scan_s:.2f} s to check every artifact, {verify_s:.1f} s as a command (with its start-up)")


if __name__ == "__main__":
  main()
