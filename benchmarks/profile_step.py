"""Where a training step's time goes: the project's jitted step and open_clip's, operation by operation.

  python -m benchmarks.profile_step                       # the small and mid workloads
  python -m benchmarks.profile_step --workloads=small --top=20

The project's side is :class:`benchmarks.train_throughput.Trainer`'s compiled
step, traced with ``jax.profiler`` over ``--steps`` steps. XLA:CPU records one
event per executed thunk (a fusion, a library matmul, a copy) carrying its HLO
name; each is matched to the compiled HLO, whose ``op_name`` metadata names
the model code it came from and whether it is the forward pass (``jvp``), the
backward pass (``transpose(jvp)``) or neither (the optimizer, the gradient
clipping). Operations are grouped into categories by that name and by the kind
of fusion. XLA runs independent thunks concurrently (the two towers at once),
so the summed thunk time can exceed the step's wall time; shares are of the
sum.

open_clip's side runs in its own process (:mod:`benchmarks.open_clip_peer`):
``torch.profiler`` over the same number of steps gives each ATen operator's
self time, and the forward pass, ``backward()`` and the optimizer step are
timed separately around the same steps (PyTorch runs them in that order on
the CPU).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from benchmarks import common, workloads

_OP_LINE = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """``{instruction name: (result shape, op_name metadata)}`` of a compiled HLO module's text."""
  ops = {}
  for line in hlo_text.splitlines():
    match = _OP_LINE.match(line)
    if match and match.group(1) not in ops:
      meta = _OP_NAME.search(match.group(2))
      ops[match.group(1)] = (match.group(2).split(" ", 1)[0], meta.group(1) if meta else "")
  return ops


def phase(op_name: str) -> str:
  """forward, backward or optimizer/other, from where JAX's autodiff put the operation."""
  if "transpose(jvp(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "optimizer/other"


def category(name: str, op_name: str) -> str:
  """A readable group for one executed operation: its HLO instruction name and its op_name metadata."""
  kind = name.split(".")[0]
  if "dot_general" in op_name or "conv_general" in op_name or kind in ("dot", "convolution"):
    return "attention matmuls" if "attention" in op_name or "vmap" in op_name else "dense matmuls"
  if phase(op_name) == "optimizer/other":
    return "optimizer, clipping"
  if "/attention/" in op_name:
    return "attention: softmax, mask, head transposes"
  if "erf" in op_name or "gelu" in op_name or "tanh" in kind:
    return "GELU"
  if "/ln_" in op_name or "LayerNorm" in op_name:
    return "LayerNorm"
  if "softmax" in op_name or "exponential" in kind or "reduce_max" in op_name:
    return "softmax"
  if "scatter" in kind or "gather" in kind or "embed" in op_name.lower():
    return "embedding gather/scatter"
  if any(word in kind for word in ("copy", "transpose", "concatenate", "pad", "slice")):
    return "copies, transposes"
  if "broadcast" in kind:
    return "broadcasts"
  if "reduce" in kind:
    return "reductions"
  return "other element-wise"


def thunk_times(trace_dir: str, module: str) -> collections.Counter:
  """Summed microseconds per HLO instruction of ``module`` in the newest trace under ``trace_dir``."""
  files = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))
  if not files:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  times = collections.Counter()
  for event in events:
    args = event.get("args", {})
    if event.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
      times[args["hlo_op"]] += event["dur"]
  return times


def profile_jax(workload: workloads.Workload, steps: int) -> dict:
  """The project's step traced over ``steps`` steps: per-operation milliseconds per step, and the step's wall time."""
  from benchmarks.train_throughput import Trainer
  from ccmr_jax import sharding
  trainer = Trainer(workload, sharding.make_mesh())
  trainer.steps(2)
  wall = trainer.steps(steps) / steps
  with tempfile.TemporaryDirectory(prefix="ccmr_profile_") as trace_dir:
    jax.profiler.start_trace(trace_dir)
    trainer.steps(steps)
    jax.profiler.stop_trace()
    times = thunk_times(trace_dir, "jit_step")
  ops = hlo_ops(trainer.compiled.as_text())
  rows = []
  for name, microseconds in times.items():
    shape, op_name = ops.get(name, ("?", ""))
    rows.append({"op": name, "shape": shape, "source": op_name.replace("jit(step)/", ""),
                 "ms": microseconds / 1e3 / steps, "phase": phase(op_name), "category": category(name, op_name)})
  return {"wall_ms": wall * 1e3, "ops": rows}


def _group(rows: list[dict], key: str) -> list[tuple[str, float]]:
  totals = collections.Counter()
  for row in rows:
    totals[row[key]] += row["ms"]
  return totals.most_common()


def print_jax_profile(workload: workloads.Workload, result: dict, top: int) -> None:
  ops = result["ops"]
  total = sum(row["ms"] for row in ops)
  print(f"\n### ccmr_jax, {workload.name}: step {result['wall_ms']:.1f} ms wall; {total:.1f} ms of summed "
        f"operation time over {len(ops)} operations (concurrent operations overlap)")
  for key in ("phase", "category"):
    print("\n" + common.markdown_table([key, "ms/step", "share"],
                                       [[name, ms, f"{100 * ms / total:.1f}%"] for name, ms in _group(ops, key)]))
  rows = sorted(ops, key=lambda row: -row["ms"])[:top]
  print("\n" + common.markdown_table(
      ["operation", "shape", "ms/step", "share", "phase", "category", "from"],
      [[r["op"], r["shape"], r["ms"], f"{100 * r['ms'] / total:.1f}%", r["phase"], r["category"],
        r["source"][-70:]] for r in rows]))


def print_torch_profile(workload: workloads.Workload, result: dict, top: int) -> None:
  total = sum(ms for _, ms in result["ops"])
  print(f"\n### open_clip, {workload.name}: step {result['wall_ms']:.1f} ms wall; "
        f"{total:.1f} ms of summed operator self time")
  phases = [[name, ms, f"{100 * ms / result['wall_ms']:.1f}%"] for name, ms in result["phases"].items()]
  print("\n" + common.markdown_table(["phase", "ms/step", "share of the step"], phases))
  operators = [[name, ms, f"{100 * ms / total:.1f}%"] for name, ms in result["ops"][:top]]
  print("\n" + common.markdown_table(["ATen operator", "ms/step", "share"], operators))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workloads", default="small,mid", help="comma-separated: default, small, mid, tiny")
  parser.add_argument("--steps", type=int, default=5, help="steps traced per side")
  parser.add_argument("--top", type=int, default=15, help="operations listed per side")
  parser.add_argument("--quick", action="store_true", help="the tiny workload, 2 steps")
  args = parser.parse_args(argv)
  if args.quick:
    args.workloads, args.steps = "tiny", 2
  common.print_header("Profile of one training step: ccmr_jax and open_clip", argv)
  peer = common.module_available("open_clip") and common.module_available("torch")
  if not peer:
    print("open_clip/torch not importable (pip install -e '.[bench]'): profiling the JAX side only")
  for name in args.workloads.split(","):
    workload = workloads.get_workload(name)
    print(f"\n## workload {name}: batch {workload.batch_size}, {workload.train_flops_per_step() / 1e9:.1f} GFLOP/step")
    print_jax_profile(workload, profile_jax(workload, args.steps), args.top)
    if not workloads.has_open_clip_counterpart(workload):
      print(f"\n(open_clip has no counterpart of the {name} workload's towers: the JAX side only)")
    elif peer:
      from benchmarks import open_clip_peer
      with common.Worker(open_clip_peer.profiling_worker, workload, args.steps) as worker:
        print_torch_profile(workload, worker.info, args.top)


if __name__ == "__main__":
  main()
