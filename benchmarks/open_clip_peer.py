"""open_clip (PyTorch) as the peer: the same dual encoder, trained and run as its users would.

The model is ``open_clip.create_model(name, pretrained=None)`` over a model
config registered with ``open_clip.add_model_config`` (the shapes of
:func:`benchmarks.workloads.open_clip_config`); training is open_clip's
``ClipLoss`` with ``torch.optim.AdamW`` (defaults otherwise) and gradient
clipping, eager mode, as in open_clip's training loop. PyTorch is imported
only inside the worker processes, never next to JAX.

:func:`params_from_open_clip` maps an open_clip state dict onto the params
of the project's ``vit`` + ``causal_transformer`` dual encoder (the mapping of
:mod:`ccmr_jax.models.from_open_clip`), so both sides can start from the same
weights and their embeddings be compared.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from benchmarks import common, workloads


def _create_model(workload: workloads.Workload):
  import open_clip
  name = f"ccmr-bench-{workload.name}"
  with tempfile.TemporaryDirectory(prefix="ccmr_open_clip_") as folder:  # read once, when registered
    with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
      json.dump(workloads.open_clip_config(workload), f)
    open_clip.add_model_config(folder)
  return open_clip.create_model(name, pretrained=None)


def _torch_inputs(batch: dict[str, np.ndarray]):
  """uint8 NHWC pixels → float NCHW in [-1, 1] (what the JAX towers do inside); tokens as int64."""
  import torch
  images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
  return images, torch.from_numpy(batch["tokens"]).long()


def _training_step(workload: workloads.Workload, learning_rate: float, weight_decay: float, grad_clip: float,
                   seed: int):
  """open_clip's model, optimizer and batch; returns ``(model, batch, phases)``.

  ``phases()`` runs one training step as three callables in order: the
  forward pass with the loss, ``backward()``, and clipping with the optimizer
  step; the last returns the loss.
  """
  import open_clip
  import torch
  torch.manual_seed(seed)
  model = _create_model(workload)
  batch = workload.batch(seed)
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
  loss_fn = open_clip.ClipLoss()
  state = {}

  def forward():
    images, texts = _torch_inputs(batch)
    optimizer.zero_grad(set_to_none=True)
    state["loss"] = loss_fn(*model(images, texts))

  def backward():
    state["loss"].backward()

  def update():
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(state["loss"].detach())

  return model, batch, (forward, backward, update)


def training_worker(workload: workloads.Workload, learning_rate: float, weight_decay: float, grad_clip: float,
                    seed: int = 0):
  """Worker setup: open_clip's training step on one batch.

  Returns ``(info, run)``: ``info`` holds the initial state dict, the initial
  embeddings of the batch, the first step's loss and the thread count;
  ``run(steps)`` trains that many steps and returns ``(seconds, last loss)``.
  """
  import open_clip
  import torch
  model, batch, (forward, backward, update) = _training_step(workload, learning_rate, weight_decay, grad_clip,
                                                             seed)
  state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  model.eval()
  with torch.no_grad():
    images, texts = _torch_inputs(batch)
    embeddings = (model.encode_image(images, normalize=True).numpy(), model.encode_text(texts, normalize=True).numpy())
  model.train()
  losses = []

  def run(count: int):
    start = time.perf_counter()
    for _ in range(count):
      forward()
      backward()
      losses.append(update())
    return time.perf_counter() - start, losses[-1]

  run(1)  # also the warm-up: PyTorch allocates its buffers on the first step
  info = {"state_dict": state_dict, "embeddings": embeddings, "threads": torch.get_num_threads(),
          "torch": torch.__version__, "open_clip": open_clip.__version__, "first_loss": losses[0],
          "num_params": sum(p.numel() for p in model.parameters())}
  return info, run


def profiling_worker(workload: workloads.Workload, steps: int, seed: int = 0):
  """Worker setup: where open_clip's training step spends its time (:mod:`benchmarks.profile_step`).

  ``info`` holds ``wall_ms`` (a step), ``phases`` (ms per step of the forward
  pass with the loss, ``backward()`` and clipping with the optimizer step,
  timed around ``steps`` unprofiled steps) and ``ops`` (``(ATen operator,
  self ms per step)`` under ``torch.profiler`` over ``steps`` more, largest
  first). The optimizer is AdamW at the benchmarks' defaults.
  """
  from torch.profiler import ProfilerActivity, profile
  _, _, phases = _training_step(workload, 1e-3, 1e-4, 1.0, seed)
  for step in phases * 2:  # warm-up: PyTorch allocates its buffers on the first step
    step()
  seconds = [0.0] * len(phases)
  for _ in range(steps):
    for i, step in enumerate(phases):
      seconds[i] += common.timed(step)
  with profile(activities=[ProfilerActivity.CPU]) as profiler:
    for _ in range(steps):
      for step in phases:
        step()
  ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / steps) for e in profiler.key_averages()),
               key=lambda item: -item[1])
  names = ("forward + loss", "backward", "clip + AdamW step")
  info = {"wall_ms": sum(seconds) * 1e3 / steps, "ops": ops,
          "phases": {name: s * 1e3 / steps for name, s in zip(names, seconds)}}
  return info, lambda: None


def embedding_worker(workload: workloads.Workload, batch_size: int, num_items: int, seed: int = 0):
  """Worker setup: open_clip's ``encode_image`` / ``encode_text`` in eval mode under ``inference_mode``.

  ``run(tower)`` embeds ``num_items`` items in batches of ``batch_size``; returns seconds.
  """
  import torch
  torch.manual_seed(seed)
  model = _create_model(workload).eval()
  data = workload.batch(seed, batch_size=batch_size)
  images, texts = _torch_inputs(data)
  batches = -(-num_items // batch_size)

  def run(tower: str) -> float:
    encode, inputs = (model.encode_image, images) if tower == "image" else (model.encode_text, texts)
    start = time.perf_counter()
    with torch.inference_mode():
      for _ in range(batches):
        encode(inputs, normalize=True).numpy()
    return time.perf_counter() - start

  return {"threads": torch.get_num_threads(), "torch": torch.__version__}, run


def params_from_open_clip(state_dict: dict[str, np.ndarray], workload: workloads.Workload) -> dict:
  """The dual encoder's variables holding open_clip's weights (:mod:`ccmr_jax.models.from_open_clip`'s mapping)."""
  from ccmr_jax.models import from_open_clip
  m = workload.model
  arch = from_open_clip.Architecture(
      embed_dim=m.embed_dim, image_size=workload.image_size, patch=m.vit.patch, vision_width=m.vit.width,
      vision_depth=m.vit.depth, vision_heads=m.vit.heads, text_width=m.causal_transformer.width,
      text_depth=m.causal_transformer.depth, text_heads=m.causal_transformer.heads,
      context_length=workload.max_length, vocab_size=workload.vocab_size)
  return {"params": from_open_clip.params_from_state_dict(state_dict, arch)}
