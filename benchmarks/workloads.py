"""The dual encoders the benchmarks time, their FLOP counts and synthetic batches.

``default`` is the model of ``configs/scenes.py`` (conv image tower,
Transformer text tower with mean pooling). The others have open_clip's layout
(:mod:`ccmr_jax.models.vit`), which open_clip builds from
:func:`open_clip_config` with identical shapes: ``small`` at the default's
scale (width 128, 2 blocks per tower, 8x8 patches of 64x64 images, 24 tokens,
the default's vocabulary and batch); ``mid``, a mid-size dual encoder with a
ViT-S-like image tower (width 384, 6 blocks, 6 heads) and a causal text
tower of the same width and depth over 32 tokens; ``b32``, CLIP ViT-B/32 (open_clip's
``ViT-B-32``: image tower 768 wide, 12 blocks, 32x32 patches of 224x224 images; text tower 512
wide, 12 blocks, 77 tokens, 49,408 ids) at batch 32; ``tiny`` for smoke tests. Like open_clip's,
their projections have no bias.

FLOPs are counted analytically: ``2·m·n·k`` per ``[m, k] @ [k, n]`` matmul (a
multiply-add is two FLOPs; element-wise work is left out), and a training
step costs three forward passes (the backward pass computes two matmuls per
forward matmul: the gradients of both operands).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from ccmr_jax.models import vit

START_ID = 1


@dataclasses.dataclass(frozen=True)
class Workload:
  """One dual encoder and the shape of its inputs."""

  name: str
  model: ml_collections.ConfigDict
  image_size: int
  max_length: int
  vocab_size: int
  batch_size: int

  def forward_flops_per_pair(self) -> float:
    """Forward FLOPs of one (image, caption) pair: both towers, projections and the pair's row of logits."""
    image_features, image_flops = _image_tower_flops(self.model, self.image_size)
    text_features, text_flops = _text_tower_flops(self.model, self.max_length)
    projections = 2.0 * (image_features + text_features) * self.model.embed_dim
    logits = 2.0 * self.batch_size * self.model.embed_dim
    return image_flops + text_flops + projections + logits

  def train_flops_per_step(self) -> float:
    return 3.0 * self.forward_flops_per_pair() * self.batch_size

  def batch(self, seed: int = 0, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """A training batch of random pixels and captions of random lengths.

    Every caption is ``START, words..., EOT, PAD...`` with the end token the
    largest id, so open_clip's argmax pooling and the causal tower's
    last-token pooling read the same position.
    """
    batch_size = batch_size or self.batch_size
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, self.image_size, self.image_size, 3), dtype=np.uint8)
    tokens = np.zeros((batch_size, self.max_length), np.int32)
    lengths = rng.integers(self.max_length // 2, self.max_length + 1, batch_size)
    for row, length in enumerate(lengths):
      tokens[row, 0] = START_ID
      tokens[row, 1:length - 1] = rng.integers(2, self.vocab_size - 1, length - 2)
      tokens[row, length - 1] = self.vocab_size - 1
    keys = np.arange(batch_size, dtype=np.int32)
    return {"image": images, "tokens": tokens, "image_key": keys, "text_key": keys}


def _image_tower_flops(model: ml_collections.ConfigDict, image_size: int) -> tuple[int, float]:
  """``(features, forward FLOPs)`` of one image."""
  if model.image_tower == "vit":
    c = model.vit
    return c.width, vit.vit_forward_flops(image_size, c.patch, c.width, c.depth, c.get("mlp_ratio", 4.0))
  if model.image_tower == "conv":
    c = model.conv
    positions = (image_size // c.patch) ** 2
    flops = 2.0 * positions * 3 * c.patch ** 2 * c.widths[0]
    for previous, width in zip(c.widths[:-1], c.widths[1:]):
      positions //= 4
      flops += 2.0 * positions * 4 * previous * width + 2.0 * positions * 9 * width * width
    flops += 2.0 * positions * c.widths[-1] * c.features
    return c.features, flops
  raise ValueError(f"no FLOP count for image tower {model.image_tower!r}")


def _text_tower_flops(model: ml_collections.ConfigDict, max_length: int) -> tuple[int, float]:
  if model.text_tower in ("transformer", "causal_transformer"):
    c = model[model.text_tower]
    return c.width, vit.text_forward_flops(max_length, c.width, c.depth, c.get("mlp_ratio", 4.0))
  raise ValueError(f"no FLOP count for text tower {model.text_tower!r}")


def _scenes_workload() -> Workload:
  from configs import scenes
  config = scenes.get_config()
  # 109 words of task 0's captions + 2 special ids + 256 OOV buckets: the default run's tokenizer.
  return Workload("default", config.model, config.data.scenes.image_size, config.tokenizer.max_length,
                  367, config.train.batch_size)


def _open_clip_layout(name: str, width: int, depth: int, image_size: int, patch: int, max_length: int,
                      vocab_size: int, embed_dim: int, batch_size: int, text_width: int | None = None) -> Workload:
  """Heads of width 64 (open_clip's default); the text tower ``text_width`` wide (default: ``width``)."""
  text_width = text_width or width
  model = ml_collections.ConfigDict(dict(
      image_tower="vit", text_tower="causal_transformer", embed_dim=embed_dim, temperature_init=0.07,
      projection_bias=False, dtype="float32", vit=dict(patch=patch, width=width, depth=depth, heads=width // 64),
      causal_transformer=dict(width=text_width, depth=depth, heads=text_width // 64)))
  return Workload(name, model, image_size, max_length, vocab_size, batch_size)


def get_workload(name: str) -> Workload:
  if name == "default":
    return _scenes_workload()
  if name == "small":
    return _open_clip_layout("small", width=128, depth=2, image_size=64, patch=8, max_length=24, vocab_size=367,
                             embed_dim=128, batch_size=128)
  if name == "mid":
    return _open_clip_layout("mid", width=384, depth=6, image_size=64, patch=8, max_length=32, vocab_size=8192,
                             embed_dim=256, batch_size=128)
  if name == "b32":  # CLIP ViT-B/32 (open_clip's ViT-B-32 config) at batch 32
    return _open_clip_layout("b32", width=768, depth=12, image_size=224, patch=32, max_length=77, vocab_size=49408,
                             embed_dim=512, batch_size=32, text_width=512)
  if name == "tiny":
    return _open_clip_layout("tiny", width=64, depth=1, image_size=16, patch=8, max_length=8, vocab_size=64,
                             embed_dim=32, batch_size=8)
  raise ValueError(f"unknown workload {name!r}; choose one of {WORKLOADS}")


WORKLOADS = ("default", "small", "mid", "b32", "tiny")


def with_options(workload: Workload, dtype: str | None = None, remat: bool = False,
                 batch_size: int | None = None) -> Workload:
  """The workload with another compute dtype, rematerialised blocks or batch size."""
  model = ml_collections.ConfigDict(workload.model.to_dict())
  if dtype:
    model.dtype = dtype
  if remat:
    for tower in (model.image_tower, model.text_tower):
      if tower not in ("vit", "causal_transformer"):
        raise ValueError(f"remat is an option of the vit and causal_transformer towers, not {tower!r}")
      model[tower].remat = True
  return dataclasses.replace(workload, model=model, batch_size=batch_size or workload.batch_size)


def has_open_clip_counterpart(workload: Workload) -> bool:
  """Whether open_clip builds the same network: a ``vit`` image tower and a ``causal_transformer`` text tower."""
  return (workload.model.image_tower, workload.model.text_tower) == ("vit", "causal_transformer")


def open_clip_config(workload: Workload) -> dict:
  """open_clip's model config (``model_configs/*.json`` form) of a ``vit`` + ``causal_transformer`` workload."""
  m = workload.model
  if not has_open_clip_counterpart(workload):
    raise ValueError(f"workload {workload.name!r} has no open_clip counterpart")
  return {
      "embed_dim": m.embed_dim,
      "vision_cfg": {"image_size": workload.image_size, "layers": m.vit.depth, "width": m.vit.width,
                     "head_width": m.vit.width // m.vit.heads, "patch_size": m.vit.patch},
      "text_cfg": {"context_length": workload.max_length, "vocab_size": workload.vocab_size,
                   "width": m.causal_transformer.width, "heads": m.causal_transformer.heads,
                   "layers": m.causal_transformer.depth},
  }
