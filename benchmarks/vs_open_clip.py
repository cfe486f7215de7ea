"""Training speed against open_clip on the identical dual encoder, batch and optimizer.

  python -m benchmarks.vs_open_clip                 # the small and mid models, batch 128
  python -m benchmarks.vs_open_clip --workloads=mid --rounds=3
  python -m benchmarks.vs_open_clip --workloads=b32 --rounds=3 --turn_seconds=0   # CLIP ViT-B/32, batch 32

Both sides train the same network (:func:`benchmarks.workloads.open_clip_config`:
same widths, depths, heads, patch size, context length, vocabulary and
embedding size) from the same initial weights (open_clip's init, mapped onto
the project's params), on the same batch, with the same optimizer
(gradient clipping at 1.0, then AdamW with the default run's learning rate
and weight decay, applied to every parameter) and symmetric InfoNCE with a
learnable temperature. The project's side is its real jitted step
(:class:`benchmarks.train_throughput.Trainer`); open_clip's is eager PyTorch
as its training loop runs it. Before timing, the script checks the
architectures agree: the embeddings of the same batch under the same
weights, and the loss of the first step.

open_clip runs in a process of its own, the project's step in this one,
both on every core, timed in turns (JAX, PyTorch, JAX, ...); the ratio is of
the medians.

The machine's matmul peak is timed in the same turns (a jitted ``n×n @ n×n``
and numpy's BLAS, as in :mod:`benchmarks.train_throughput`), giving each
side's MFU and the ceiling of the ratio: a step whose model FLOPs (the
matmuls counted analytically, ``2·m·n·k``) all ran at the best of the two
peaks would be ``peak ÷ open_clip's model FLOP/s`` times open_clip's speed.
No float32 rewrite of the step can pass that ratio on this machine; a
target above it asks for more FLOP/s than the CPU's best matmul delivers.
Without open_clip installed (``pip install -e '.[bench]'``), only the JAX
side runs.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks import common, workloads
from benchmarks.train_throughput import Trainer, train_config
from ccmr_jax import sharding
from ccmr_jax.models.dual_encoder import build_model


def embedding_parity(workload: workloads.Workload, params, batch: dict, expected) -> float:
  """Largest absolute difference between the project's embeddings and open_clip's ``expected`` ones."""
  model = build_model(workload.model, workload.vocab_size, workload.max_length)
  image_emb, text_emb, _ = jax.jit(model.apply)(params, batch["image"], batch["tokens"])
  return max(float(np.abs(np.asarray(image_emb) - expected[0]).max()),
             float(np.abs(np.asarray(text_emb) - expected[1]).max()))


def compare(workload: workloads.Workload, rounds: int, turn_seconds: float, peaks: dict) -> None:
  """Checks the two sides compute the same thing, times them in turns with ``peaks``, prints the tables."""
  hyper = train_config().train
  print(f"\n## workload {workload.name}: batch {workload.batch_size}, {workload.train_flops_per_step() / 1e9:.1f} "
        f"GFLOP/step; open_clip config {workloads.open_clip_config(workload)}")
  peer = None
  params = None
  if common.module_available("open_clip") and common.module_available("torch"):
    from benchmarks import open_clip_peer
    peer = common.Worker(open_clip_peer.training_worker, workload, hyper.learning_rate, hyper.weight_decay,
                         hyper.grad_clip)
    print(f"open_clip {peer.info['open_clip']}, torch {peer.info['torch']}, {peer.info['threads']} threads, "
          f"{peer.info['num_params']:,} params")
    params = open_clip_peer.params_from_open_clip(peer.info.pop("state_dict"), workload)
    difference = embedding_parity(workload, params, workload.batch(0), peer.info.pop("embeddings"))
    print(f"same weights, same batch: largest embedding difference {difference:.2e}")
  else:
    print("open_clip/torch not importable (pip install -e '.[bench]'): timing the JAX side only")

  trainer = Trainer(workload, sharding.make_mesh(), params=params)
  print(f"ccmr_jax: {trainer.num_params:,} params")
  if peer is not None:
    print(f"loss of the first step: ccmr_jax {trainer.loss:.5f}, open_clip {peer.info['first_loss']:.5f}")
  steps = trainer.steps_per_turn(turn_seconds)
  contenders = {"ccmr_jax": lambda: trainer.steps(steps) / steps}
  if peer is not None:
    contenders["open_clip"] = lambda: peer.run(steps)[0] / steps
  values = common.alternate({**contenders, **peaks}, rounds)
  if peer is not None:
    peer.close()
  print(f"{steps} steps per turn, {rounds} turns each, alternating with the peak matmuls; median")
  print_tables(workload, {name: values[name] for name in contenders},
               {name: common.median(values[name]) for name in peaks})


def print_tables(workload: workloads.Workload, step_seconds: dict, peaks: dict) -> None:
  """The trainers' speed and MFU against each of ``peaks`` (FLOP/s), the ratio and its ceiling."""
  rows = []
  model_flops = {}
  for name, seconds in step_seconds.items():
    step_s = common.median(seconds)
    model_flops[name] = workload.train_flops_per_step() / step_s
    rows.append([name, step_s, workload.batch_size / step_s, model_flops[name] / 1e9]
                + [f"{100 * model_flops[name] / peak:.1f}%" for peak in peaks.values()]
                + [" ".join(f"{s:.3f}" for s in seconds)])
  print(common.markdown_table(["trainer", "s/step", "pairs/s", "model GFLOP/s"]
                              + [f"MFU vs {name} ({peak / 1e9:.1f} GFLOP/s)" for name, peak in peaks.items()]
                              + ["every turn (s/step)"], rows))
  if "open_clip" in model_flops:
    ratio = model_flops["ccmr_jax"] / model_flops["open_clip"]
    best = max(peaks, key=peaks.get)
    print(f"{workload.name}: ccmr_jax pairs/s ÷ open_clip pairs/s = {ratio:.2f}; ceiling on this machine "
          f"({best} {peaks[best] / 1e9:.1f} GFLOP/s ÷ open_clip's {model_flops['open_clip'] / 1e9:.1f}) = "
          f"{peaks[best] / model_flops['open_clip']:.2f}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workloads", default="small,mid",
                      help="comma-separated vit + causal_transformer workloads: small, mid, b32 (CLIP ViT-B/32 "
                           "at batch 32), tiny")
  parser.add_argument("--batch_size", type=int, default=None, help="default: the workload's")
  parser.add_argument("--turn_seconds", type=float, default=6.0, help="length of one timed turn")
  parser.add_argument("--peak_size", type=int, default=None, help="side of the peak matmuls (default 4096 on CPU)")
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.workloads, args.rounds, args.turn_seconds, args.peak_size = "tiny", 1, 0.0, 256
  common.print_header("Training: ccmr_jax vs open_clip, identical architecture", argv)
  hyper = train_config().train
  print(f"optimizer: clip_by_global_norm({hyper.grad_clip}) + AdamW(lr={hyper.learning_rate}, "
        f"weight_decay={hyper.weight_decay}) on every parameter; loss: symmetric InfoNCE")
  peaks = common.matmul_peaks(args.peak_size)
  for name in args.workloads.split(","):
    compare(workloads.with_options(workloads.get_workload(name), batch_size=args.batch_size), args.rounds,
            args.turn_seconds, peaks)


if __name__ == "__main__":
  main()
