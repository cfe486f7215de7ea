"""open_clip (PyTorch) as the peer: the same dual encoder, trained and run as its users would.

The model is ``open_clip.create_model(name, pretrained=None)`` over a model
config registered with ``open_clip.add_model_config`` (the shapes of
:func:`benchmarks.workloads.open_clip_config`); training is open_clip's
``ClipLoss`` with ``torch.optim.AdamW`` (defaults otherwise) and gradient
clipping, eager mode, as in open_clip's training loop. PyTorch is imported
only inside the worker processes, never next to JAX.

:func:`params_from_open_clip` maps an open_clip state dict onto the params
of the project's ``vit`` + ``causal_transformer`` dual encoder, so both sides
can start from the same weights and their embeddings be compared.
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


def _block(prefix: str, sd: dict[str, np.ndarray]) -> dict:
  def dense(name):
    return {"kernel": sd[f"{prefix}.{name}.weight"].T, "bias": sd[f"{prefix}.{name}.bias"]}

  def norm(name):
    return {"scale": sd[f"{prefix}.{name}.weight"], "bias": sd[f"{prefix}.{name}.bias"]}

  return {"ln_1": norm("ln_1"), "ln_2": norm("ln_2"),
          "in_proj": {"kernel": sd[f"{prefix}.attn.in_proj_weight"].T, "bias": sd[f"{prefix}.attn.in_proj_bias"]},
          "out_proj": dense("attn.out_proj"), "c_fc": dense("mlp.c_fc"), "c_proj": dense("mlp.c_proj")}


def params_from_open_clip(sd: dict[str, np.ndarray], workload: workloads.Workload) -> dict:
  """The dual encoder's params holding open_clip's weights (projection biases zero)."""
  m = workload.model

  def norm(name):
    return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}

  conv = sd["visual.conv1.weight"]  # [width, 3, p, p] → rows in (row, column, channel) patch order
  image_tower = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0])},
      "class_embedding": sd["visual.class_embedding"],
      "position_embedding": sd["visual.positional_embedding"],
      "ln_pre": norm("visual.ln_pre"), "ln_post": norm("visual.ln_post"),
      "transformer": {f"block_{i}": _block(f"visual.transformer.resblocks.{i}", sd) for i in range(m.vit.depth)},
  }
  text_tower = {
      "token_embedding": {"embedding": sd["token_embedding.weight"]},
      "position_embedding": sd["positional_embedding"],
      "ln_final": norm("ln_final"),
      "transformer": {f"block_{i}": _block(f"transformer.resblocks.{i}", sd)
                      for i in range(m.causal_transformer.depth)},
  }
  zeros = np.zeros(m.embed_dim, np.float32)
  params = {"image_tower": image_tower, "text_tower": text_tower,
            "image_projection": {"kernel": sd["visual.proj"], "bias": zeros},
            "text_projection": {"kernel": sd["text_projection"], "bias": zeros},
            "log_scale": sd["logit_scale"].reshape(())}
  return {"params": params}
