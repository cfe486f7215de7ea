"""Training throughput (image–text pairs/s) and MFU of the project's real training step.

  python -m benchmarks.train_throughput                      # default, small and mid models, float32
  python -m benchmarks.train_throughput --dtype=bfloat16     # on a GPU or TPU
  python -m benchmarks.train_throughput --workloads=default,small --remat_check=small --pipeline_check=default

The step is :func:`ccmr_jax.train.make_train_step` over the project's loss
and optimizer (``chain(clip_by_global_norm, adamw)``), data-parallel over a
mesh of every device, with the default run's hyperparameters.

MFU = model FLOP/s ÷ the machine's peak FLOP/s. Model FLOPs are counted
analytically (:mod:`benchmarks.workloads`: ``2·m·n·k`` per matmul, training
= 3 × forward) and cross-checked against XLA's ``cost_analysis()`` of the
compiled step, which also counts element-wise work and the optimizer. The
peak is a jitted ``n×n @ n×n`` matmul (``2·n³`` FLOPs) in the compute dtype,
timed in the same run, in turns with the training step.

``--remat_check=WORKLOAD`` compares, without and with rematerialised blocks,
what the backward pass keeps from the forward pass (``jax.vjp`` residuals),
the compiled step's temporary memory (XLA's ``memory_analysis()``) and speed;
``--pipeline_check=WORKLOAD`` compares the training loop (:func:`ccmr_jax.train.fit`
over :class:`~ccmr_jax.data.batches.PairSampler` batches), the same loop with
the batches built one step ahead in a thread, and the step alone on a batch
already on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import queue
import threading
from typing import Iterator

import jax
import numpy as np

from benchmarks import common, workloads
from ccmr_jax import sharding, train
from ccmr_jax.models.dual_encoder import build_model


def train_config():
  from configs import scenes
  return scenes.get_config()


class Trainer:
  """The project's jitted train step on one workload, with a batch placed on the mesh.

  ``params`` (optional) are the initial params; by default the model's own init.
  """

  def __init__(self, workload: workloads.Workload, mesh, seed: int = 0, params=None):
    config = train_config()
    self.workload = workload
    self.mesh = mesh
    self.model = build_model(workload.model, workload.vocab_size, workload.max_length)
    self.host_batch = workload.batch(seed)
    if params is None:
      params = jax.jit(self.model.init)(jax.random.key(seed), self.host_batch["image"][:1],
                                        self.host_batch["tokens"][:1])
    self.num_params = sum(x.size for x in jax.tree.leaves(params))
    self.optimizer = train.make_optimizer(config.train)
    self.loss_fn = train.make_loss_fn(self.model, config.loss)
    self.step_fn = train.make_train_step(self.loss_fn, self.optimizer, mesh)
    self.state = train.init_state(params, self.optimizer, mesh)
    self.batch = sharding.to_global(self.host_batch, mesh)
    self.learning_rate = np.float32(config.train.learning_rate)
    # The step as compiled once: timed turns, the loop check and the cost analysis all run this executable.
    self.compiled = self.step_fn.lower(self.state, self.batch, self.learning_rate, None).compile()
    self.steps(1)

  def steps(self, count: int) -> float:
    """Runs ``count`` steps on the placed batch; returns their seconds (:attr:`loss`: the last step's loss)."""
    metrics = {}

    def run():
      for _ in range(count):
        self.state, step_metrics = self.compiled(self.state, self.batch, self.learning_rate, None)
        metrics.update(step_metrics)
      jax.block_until_ready((self.state, metrics))

    seconds = common.timed(run)
    self.loss = float(metrics["loss"])
    return seconds

  def steps_per_turn(self, seconds: float) -> int:
    """How many steps fill about ``seconds``."""
    return max(1, math.ceil(seconds / self.steps(1)))

  def xla_flops(self) -> float:
    analysis = self.compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
      analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")

  def temp_bytes(self) -> int:
    return int(self.compiled.memory_analysis().temp_size_in_bytes)

  def residual_bytes(self) -> int:
    """Bytes the backward pass keeps from the forward pass: the residuals of ``jax.vjp`` of the loss."""
    loss = lambda params: self.loss_fn(params, self.host_batch)[0]  # noqa: E731
    residuals = jax.eval_shape(lambda params: jax.vjp(loss, params)[1], self.state.params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))


def throughput(trainer: Trainer, peaks: dict, rounds: int, turn_seconds: float) -> dict:
  """Pairs/s, model FLOP/s and each of ``peaks`` (FLOP/s), the step timed in turns with the peak matmuls."""
  steps = trainer.steps_per_turn(turn_seconds)
  values = common.alternate({**peaks, "step": lambda: trainer.steps(steps) / steps}, rounds)
  step_s = common.median(values["step"])
  model_flops_per_s = trainer.workload.train_flops_per_step() / step_s
  return {"step_s": step_s, "pairs_per_s": trainer.workload.batch_size / step_s,
          "model_flops_per_s": model_flops_per_s,
          "peaks": {name: common.median(values[name]) for name in peaks}}


def remat_check(workload: workloads.Workload, mesh, rounds: int, turn_seconds: float) -> list[list]:
  """Memory and step time without and with rematerialised blocks.

  Two memory figures: what the backward pass keeps from the forward pass
  (the residuals of ``jax.vjp``, before XLA), and the temporary buffers of
  the compiled step (XLA's ``memory_analysis``, after its scheduling).
  """
  trainers = {"off": Trainer(workload, mesh), "on": Trainer(workloads.with_options(workload, remat=True), mesh)}
  steps = trainers["off"].steps_per_turn(turn_seconds)
  values = common.alternate({name: lambda t=t: t.steps(steps) / steps for name, t in trainers.items()}, rounds)
  rows = []
  for name, trainer in trainers.items():
    step_s = common.median(values[name])
    rows.append([name, trainer.residual_bytes() / 2 ** 20, trainer.temp_bytes() / 2 ** 20, step_s,
                 workload.batch_size / step_s])
  return rows


def prefetch(batches: Iterator[dict], depth: int = 2) -> Iterator[dict]:
  """``batches`` built ``depth`` steps ahead by a background thread."""
  ready: queue.Queue = queue.Queue(maxsize=depth)
  done = object()

  def produce():
    for batch in batches:
      ready.put(batch)
    ready.put(done)

  threading.Thread(target=produce, daemon=True).start()
  while (batch := ready.get()) is not done:
    yield batch


def scenes_sampler(workload: workloads.Workload, num_images: int):
  """A :class:`PairSampler` over random images with five template captions each."""
  from ccmr_jax.data.batches import PairSampler
  from ccmr_jax.data.examples import Examples
  from ccmr_jax.data.tokenizer import build_tokenizer
  rng = np.random.default_rng(0)
  words = ["red", "blue", "green", "circle", "square", "star", "left", "right", "above", "below", "small", "large"]
  captions = tuple(" ".join(rng.choice(words, rng.integers(4, workload.max_length - 1)))
                   for _ in range(5 * num_images))
  examples = Examples(
      images=rng.integers(0, 256, (num_images, workload.image_size, workload.image_size, 3), dtype=np.uint8),
      image_ids=np.arange(num_images, dtype=np.int64), captions=captions,
      caption_image=np.repeat(np.arange(num_images), 5),
      labels=tuple(np.zeros(1, np.int32) for _ in range(num_images)))
  tokenizer = build_tokenizer(captions, workload.max_length, num_oov_buckets=256, min_count=1)
  return PairSampler.create(examples, tokenizer), tokenizer.vocab_size


def pipeline_check(workload: workloads.Workload, mesh, rounds: int, steps: int) -> list[list]:
  """Seconds per step of the real loop, the loop with prefetch, and the step alone."""
  sampler, vocab_size = scenes_sampler(workload, steps * workload.batch_size)
  trainer = Trainer(dataclasses.replace(workload, vocab_size=vocab_size), mesh)
  schedule = train.learning_rate_schedule(train_config().train, steps)

  def loop(with_prefetch: bool) -> float:
    def run():
      batches = sampler.epoch(workload.batch_size, seed=0, task=0, epoch=0)
      batches = prefetch(batches) if with_prefetch else batches
      trainer.state, _ = train.fit(trainer.state, trainer.compiled, batches, mesh, schedule, steps, 0, steps)
    return common.timed(run) / steps

  values = common.alternate({"fit": lambda: loop(False), "fit_prefetch": lambda: loop(True),
                             "step_only": lambda: trainer.steps(steps) / steps}, rounds, warmup=True)
  step_only = common.median(values["step_only"])
  return [[name, common.median(v), common.median(v) / step_only] for name, v in values.items()]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workloads", default="default,small,mid", help=f"comma-separated, from {workloads.WORKLOADS}")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  parser.add_argument("--remat", action="store_true", help="rematerialise the transformer blocks")
  parser.add_argument("--batch_size", type=int, default=None, help="default: the workload's")
  parser.add_argument("--turn_seconds", type=float, default=3.0, help="length of one timed turn")
  parser.add_argument("--peak_size", type=int, default=None, help="side of the peak matmul (default 4096 on CPU)")
  parser.add_argument("--remat_check", default=None, help="a vit workload to time with and without remat")
  parser.add_argument("--pipeline_check", default=None, help="a workload to time the training loop on")
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.workloads, args.rounds, args.turn_seconds, args.peak_size = "tiny", 1, 0.0, 256
    args.remat_check = args.remat_check and "tiny"
    args.pipeline_check = args.pipeline_check and "tiny"
  common.print_header("Training throughput and MFU", argv)
  mesh = sharding.make_mesh()
  peaks = common.matmul_peaks(args.peak_size, args.dtype)
  rows = []
  for name in args.workloads.split(","):
    workload = workloads.with_options(workloads.get_workload(name), args.dtype, args.remat, args.batch_size)
    trainer = Trainer(workload, mesh)
    result = throughput(trainer, peaks, args.rounds, args.turn_seconds)
    rows.append([name, args.dtype, workload.batch_size, f"{trainer.num_params / 1e6:.2f}M",
                 workload.train_flops_per_step() / 1e9, trainer.xla_flops() / 1e9, result["step_s"],
                 result["pairs_per_s"], result["model_flops_per_s"] / 1e9]
                + [value for peak in result["peaks"].values()
                   for value in (peak / 1e9, f"{100 * result['model_flops_per_s'] / peak:.1f}%")])
    del trainer
  print(f"\nmedian of {args.rounds} turns, each turn timed alternately with the peak matmuls "
        f"({args.peak_size or common.default_peak_size()}³, {args.dtype})")
  print(common.markdown_table(
      ["workload", "dtype", "batch", "params", "GFLOP/step (analytic)", "GFLOP/step (XLA cost_analysis)",
       "s/step", "pairs/s", "model GFLOP/s"]
      + [f"{title} {name}" for name in peaks for title in ("GFLOP/s", "MFU vs")], rows))
  if args.remat_check:
    name = args.remat_check
    workload = workloads.with_options(workloads.get_workload(name), args.dtype, batch_size=args.batch_size)
    print(f"\nrematerialisation ({name}, batch {workload.batch_size}, {args.dtype})")
    print(common.markdown_table(["remat", "saved for backward MiB (jax.vjp)", "XLA temp MiB (memory_analysis)",
                                 "s/step", "pairs/s"],
                                remat_check(workload, mesh, args.rounds, args.turn_seconds)))
  if args.pipeline_check:
    name = args.pipeline_check
    workload = workloads.with_options(workloads.get_workload(name), args.dtype, batch_size=args.batch_size)
    steps = 3 if args.quick else 10
    print(f"\ninput pipeline ({name}, batch {workload.batch_size}, {steps} steps per turn)")
    print(common.markdown_table(["loop", "s/step", "÷ step alone"],
                                pipeline_check(workload, mesh, args.rounds, steps)))


if __name__ == "__main__":
  main()
