"""Embedding throughput for evaluation: items per second per tower.

  python -m benchmarks.embed_throughput                   # default and mid models
  python -m benchmarks.embed_throughput --quick

The project's side is :func:`ccmr_jax.evaluate.make_embedders`, the jitted,
data-parallel, fixed-batch embedder the evaluation uses (host uint8 images or
int32 tokens in, host float32 unit vectors out). For the ``mid`` model, whose
layout open_clip shares, open_clip's ``encode_image`` / ``encode_text`` (eval
mode, ``torch.inference_mode``, same batch size) run in a process of their
own, in turns with the project's embedder; the ratio is of the medians.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks import common, workloads
from ccmr_jax import sharding
from ccmr_jax.models.dual_encoder import build_model


def jax_embedders(workload: workloads.Workload, batch_size: int, num_items: int) -> dict:
  """``{tower: measure}``: each call embeds ``num_items`` items and returns the seconds."""
  # Imported here, not at the top: open_clip's worker process re-imports this module, and ScaNN's TensorFlow
  # ops (loaded through ccmr_jax.evaluate) beside PyTorch crash it (a segfault in free()).
  from ccmr_jax import evaluate
  mesh = sharding.make_mesh()
  model = build_model(workload.model, workload.vocab_size, workload.max_length)
  data = workload.batch(0, batch_size=num_items)
  params = jax.jit(model.init)(jax.random.key(0), data["image"][:1], data["tokens"][:1])
  embed_images, embed_texts = evaluate.make_embedders(model, mesh, batch_size)
  measures = {"image": lambda: common.timed(lambda: embed_images(params, data["image"])),
              "text": lambda: common.timed(lambda: embed_texts(params, data["tokens"]))}
  for measure in measures.values():
    measure()  # compiles
  return measures


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workloads", default="default,mid", help=f"comma-separated, from {workloads.WORKLOADS}")
  parser.add_argument("--batch_size", type=int, default=256, help="embedding batch (the default eval.batch_size)")
  parser.add_argument("--num_items", type=int, default=1024, help="items embedded per timed turn")
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.workloads, args.rounds, args.batch_size, args.num_items = "tiny", 1, 8, 16
  common.print_header("Embedding throughput per tower", argv)
  peer_available = common.module_available("open_clip") and common.module_available("torch")
  if not peer_available:
    print("open_clip/torch not importable (pip install -e '.[bench]'): timing the JAX side only")
  rows = []
  for name in args.workloads.split(","):
    workload = workloads.get_workload(name)
    contenders = {f"ccmr_jax {tower}": measure
                  for tower, measure in jax_embedders(workload, args.batch_size, args.num_items).items()}
    peer = None
    if peer_available and workload.model.image_tower == "vit":
      from benchmarks import open_clip_peer
      peer = common.Worker(open_clip_peer.embedding_worker, workload, args.batch_size, args.num_items)
      for tower in ("image", "text"):
        peer.run(tower)  # warm-up
        contenders[f"open_clip {tower}"] = lambda tower=tower: peer.run(tower)
    values = common.alternate(contenders, args.rounds)
    if peer is not None:
      peer.close()
    for tower in ("image", "text"):
      mine = args.num_items / common.median(values[f"ccmr_jax {tower}"])
      theirs = (args.num_items / common.median(values[f"open_clip {tower}"])) if peer is not None else None
      rows.append([name, tower, mine, "-" if theirs is None else theirs,
                   "-" if theirs is None else f"{mine / theirs:.2f}"])
  print(f"\n{args.num_items} items per turn in batches of {args.batch_size}, {args.rounds} turns, alternating; median")
  print(common.markdown_table(["workload", "tower", "ccmr_jax items/s", "open_clip items/s", "ratio"], rows))


if __name__ == "__main__":
  main()
