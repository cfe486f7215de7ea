"""What every benchmark shares: the machine, the measured matmul peak, alternating timing.

Figures on a shared machine drift with its load, so contenders are never
timed one after the other: :func:`alternate` runs them in turns (A, B, A,
B, ...) and keeps every turn, and reports take medians and ratios of medians.
Peers that must not share a process with JAX (PyTorch, with its own thread
pool) run in a :class:`Worker` process each and are driven one turn at a time.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Sequence


def available_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_isa() -> str:
  """The widest x86 vector extension the CPU reports (``avx512f``, ``avx2``, ...), else the machine."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    flags = []
  return next((isa for isa in ("avx512f", "avx2", "avx") if isa in flags), platform.machine())


def machine_info() -> dict:
  """The machine, the software and the load, for the header of every figure."""
  import jax
  device = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "cpu": cpu_model(),
      "isa": cpu_isa(),
      "cores": available_cores(),
      "load_average_1m": round(os.getloadavg()[0], 2),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": f"{jax.device_count()} x {device.device_kind}",
  }


def print_header(title: str, argv: Sequence[str] | None = None) -> dict:
  """Prints the command, the machine and the load; returns the machine info."""
  info = machine_info()
  spec = sys.modules["__main__"].__spec__
  program = f"python -m {spec.name}" if spec else f"python {sys.argv[0]}"
  command = " ".join([program, *(sys.argv[1:] if argv is None else argv)])
  print(f"# {title}")
  print(f"command: {command}")
  print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
  return info


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--rounds", type=int, default=5, help="alternating turns per contender (median reported)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test of the script")


def median(values: Sequence[float]) -> float:
  return float(statistics.median(values))


def alternate(contenders: dict[str, Callable[[], float]], rounds: int,
              warmup: bool = False) -> dict[str, list[float]]:
  """Calls each contender once per round, in turn, ``rounds`` times; returns every value per contender.

  With ``warmup``, each contender is first called once more, unrecorded.
  """
  if warmup:
    for measure in contenders.values():
      measure()
  values = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, measure in contenders.items():
      values[name].append(measure())
  return values


def timed(fn: Callable[[], Any]) -> float:
  """Seconds taken by ``fn()``; ``fn`` must wait for its own results (``block_until_ready``)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def default_peak_size() -> int:
  import jax
  return 4096 if jax.default_backend() == "cpu" else 16384


def matmul_peak(size: int | None = None, dtype: str = "float32") -> Callable[[], float]:
  """A measurement of the machine's matmul peak: each call returns the FLOP/s of one ``size``³ product.

  One jitted ``[n, n] @ [n, n]`` costs ``2·n³`` FLOPs. The inputs are made
  and the product compiled and run once here, so each call times only the
  product itself.
  """
  import jax
  import jax.numpy as jnp
  size = size or default_peak_size()
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
  product = jax.jit(jnp.matmul)
  product(a, b).block_until_ready()
  flops = 2.0 * size ** 3
  return lambda: flops / timed(lambda: product(a, b).block_until_ready())


def blas_matmul_peak(size: int | None = None) -> Callable[[], float]:
  """Like :func:`matmul_peak` with numpy's BLAS on the host, float32: the machine's limit as BLAS reaches it."""
  import numpy as np
  size = size or default_peak_size()
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
  a @ b
  flops = 2.0 * size ** 3
  return lambda: flops / timed(lambda: a @ b)


def matmul_peaks(size: int | None = None, dtype: str = "float32") -> dict[str, Callable[[], float]]:
  """The peaks a benchmark measures MFU against, by name: the jitted matmul, and on CPU in float32 numpy's BLAS."""
  import jax
  peaks = {"jitted matmul": matmul_peak(size, dtype)}
  if jax.default_backend() == "cpu" and dtype == "float32":
    peaks["numpy BLAS matmul"] = blas_matmul_peak(size)
  return peaks


class WorkerError(RuntimeError):
  """A worker process failed; the message holds its traceback."""


def _serve(connection, setup: Callable, args: tuple) -> None:
  try:
    info, run = setup(*args)
    connection.send(("ok", info))
    while (request := connection.recv()) is not None:
      connection.send(("ok", run(*request)))
  except BaseException:  # the parent re-raises it with the traceback
    connection.send(("error", traceback.format_exc()))


class Worker:
  """A contender in a process of its own.

  ``setup(*args)`` runs in the new process and returns ``(info, run)``;
  :attr:`info` is sent back once, and each :meth:`run` call runs ``run`` there
  and returns its value. The process is started with ``spawn``, so
  ``setup`` must be a module-level function.
  """

  def __init__(self, setup: Callable, *args):
    context = multiprocessing.get_context("spawn")
    self._connection, child = context.Pipe()
    self._process = context.Process(target=_serve, args=(child, setup, args), daemon=True)
    self._process.start()
    self.info = self._receive()

  def _receive(self):
    while not self._connection.poll(1.0):
      if not self._process.is_alive():
        raise WorkerError(f"the worker process died (exit code {self._process.exitcode}) before it answered")
    status, value = self._connection.recv()
    if status != "ok":
      self.close()
      raise WorkerError(value)
    return value

  def run(self, *args):
    self._connection.send(args)
    return self._receive()

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._connection.send(None)
      except OSError:
        pass
      self._process.join(timeout=30)
    if self._process.is_alive():
      self._process.terminate()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def module_available(name: str) -> bool:
  """Whether ``name`` can be imported, without importing it."""
  import importlib.util
  return importlib.util.find_spec(name) is not None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(value) -> str:
    if isinstance(value, float):
      return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
