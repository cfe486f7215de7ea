"""ResNet image tower (bottleneck ResNet v1.5, e.g. ResNet-50) and its pretrained weights.

Layout of torchvision's ``resnet50`` (stride 2 in the 3x3 convolution of a
stage's first block, 1x1 projection shortcuts), so its ImageNet weights
load exactly: a 7x7/2 stem convolution, 3x3/2 max pool, stages of
bottleneck blocks ``1x1 (w) → 3x3 (w) → 1x1 (4w)`` with ``w = width · 2^i``,
ReLU after the residual sum, then the spatial mean: a ``4 · width ·
2^(stages-1)`` feature vector (2048 for ResNet-50). ``uint8`` images are
normalised inside the tower with ImageNet's per-channel mean and standard
deviation, as torchvision's weights expect.

Normalisation layers (``normalization``):
  * ``"group"`` (default): GroupNorm (``groups`` groups, or fewer when the
    channels are fewer). The training step carries no mutable collections
    and multi-device batch statistics would need a cross-device reduction
    per layer; GroupNorm needs neither and trains from scratch.
  * ``"affine"``: a per-channel ``x · scale + bias``, which is batch norm in
    its inference form with the running statistics folded in. Pretrained
    batch-norm weights load into it exactly (:func:`from_torchvision`); the
    scales and biases keep training, the statistics never change.
  Both name their parameters ``scale`` and ``bias``. The last normalisation
  of every residual branch starts with ``scale = 0``, so every block starts
  as the identity (Goyal et al. 2017), which also lets ``"affine"`` train
  from scratch without statistics.

Per image of ``H x W`` pixels, ResNet-50 costs about ``4.1 · (HW / 224²)``
GFLOPs forward (multiply-adds counted as 2 FLOPs: 8.2 at 224), three times
that to train.

Pretrained weights file (``.npz``, :mod:`ccmr_jax.models.weights`): one
array per parameter of the tower, keyed by its path in the tower's params
joined with ``/`` (``stem_conv/kernel``, ``stage1_block1/norm3/scale``, ...),
kernels in Flax's ``[kh, kw, in, out]`` layout. Loading requires exactly the
tower's keys and shapes and names every mismatch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ccmr_jax.models.weights import load_weights

IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
NORMALIZATIONS = ("group", "affine")
RESNET50_STAGES = (3, 4, 6, 3)


class Affine(nn.Module):
  """``x · scale + bias`` per channel: batch norm in inference form."""

  scale_init: Any = nn.initializers.ones
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", self.scale_init, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _normalization(kind: str, channels: int, groups: int, dtype: Any, name: str, zero_scale: bool = False):
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  if kind == "group":
    return nn.GroupNorm(num_groups=math.gcd(groups, channels), dtype=dtype, scale_init=scale_init, name=name)
  return Affine(scale_init=scale_init, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """``relu(shortcut(x) + norm(1x1(relu(norm(3x3/stride(relu(norm(1x1(x)))))))))``."""

  width: int
  stride: int
  normalization: str
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    def conv(features, size, stride, name):
      pad = (size - 1) // 2
      return nn.Conv(features, (size, size), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                     dtype=self.dtype, name=name)

    def norm(channels, name, zero_scale=False):
      return _normalization(self.normalization, channels, self.groups, self.dtype, name, zero_scale)

    y = nn.relu(norm(self.width, "norm1")(conv(self.width, 1, 1, "conv1")(x)))
    y = nn.relu(norm(self.width, "norm2")(conv(self.width, 3, self.stride, "conv2")(y)))
    y = norm(4 * self.width, "norm3", zero_scale=True)(conv(4 * self.width, 1, 1, "conv3")(y))
    if x.shape[-1] != 4 * self.width or self.stride != 1:
      x = norm(4 * self.width, "proj_norm")(conv(4 * self.width, 1, self.stride, "proj_conv")(x))
    return nn.relu(x + y)


class ResNetTower(nn.Module):
  """Bottleneck ResNet over ``uint8 [B, H, W, 3]`` → ``[B, 4 · width · 2^(len(stage_sizes)-1)]``.

  Attributes:
    stage_sizes: blocks per stage; ``(3, 4, 6, 3)`` is ResNet-50, ``(3, 4, 23, 3)`` ResNet-101.
    width: channels of the stem and of the first stage's 3x3 convolutions.
    normalization: ``"group"`` or ``"affine"`` (see the module docstring).
    groups: GroupNorm groups (at most; fewer when a layer has fewer channels).
    dtype: compute dtype (parameters stay float32).
  """

  stage_sizes: Sequence[int] = RESNET50_STAGES
  width: int = 64
  normalization: str = "group"
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"unknown resnet normalization {self.normalization!r}; choose one of {list(NORMALIZATIONS)}")
    mean = jnp.asarray(IMAGENET_MEAN_RGB, self.dtype)
    std = jnp.asarray(IMAGENET_STD_RGB, self.dtype)
    x = (images.astype(self.dtype) - mean) / std
    x = nn.Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, dtype=self.dtype,
                name="stem_conv")(x)
    x = nn.relu(_normalization(self.normalization, self.width, self.groups, self.dtype, "stem_norm")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        x = Bottleneck(self.width * 2 ** stage, 2 if stage > 0 and block == 0 else 1, self.normalization,
                       self.groups, self.dtype, name=f"stage{stage + 1}_block{block + 1}")(x)
    return x.mean(axis=(1, 2))


def load_image_tower_weights(variables: Mapping[str, Any], path: str) -> dict[str, Any]:
  """The dual encoder's variables with ``params/image_tower`` loaded from ``path`` (:func:`load_weights`)."""
  params = dict(variables["params"])
  params["image_tower"] = load_weights(params["image_tower"], path)
  return {**variables, "params": params}


def from_torchvision(state_dict: Mapping[str, np.ndarray], stage_sizes: Sequence[int] = RESNET50_STAGES,
                     epsilon: float = 1e-5) -> dict[str, np.ndarray]:
  """Torchvision ResNet weights as the flat arrays of a ``normalization="affine"`` tower.

  Batch norm ``γ (x - μ) / sqrt(σ² + ε) + β`` becomes ``x · scale + bias``
  with ``scale = γ / sqrt(σ² + ε)`` and ``bias = β - μ · scale``;
  convolution kernels ``[out, in, kh, kw]`` become ``[kh, kw, in, out]``;
  the classifier ``fc`` is left out.

  Args:
    state_dict: torchvision's ``state_dict()`` as NumPy arrays (e.g. an
      ``np.load`` of ``np.savez(f, **{k: v.numpy() for k, v in sd.items()})``).
    stage_sizes: the tower's blocks per stage.
    epsilon: the batch norms' ε (torchvision: 1e-5).

  Returns:
    ``{key: array}`` for :func:`save_weights`-style files (``np.savez(path, **result)``).

  Raises:
    KeyError: an array the layout needs is not in ``state_dict``.
  """
  def kernel(name):
    return np.transpose(np.asarray(state_dict[f"{name}.weight"], np.float32), (2, 3, 1, 0))

  def folded(name):
    scale = np.asarray(state_dict[f"{name}.weight"], np.float32) / np.sqrt(
        np.asarray(state_dict[f"{name}.running_var"], np.float32) + epsilon)
    bias = np.asarray(state_dict[f"{name}.bias"], np.float32) - np.asarray(state_dict[f"{name}.running_mean"],
                                                                           np.float32) * scale
    return scale, bias

  out = {"stem_conv/kernel": kernel("conv1")}
  out["stem_norm/scale"], out["stem_norm/bias"] = folded("bn1")
  for stage, blocks in enumerate(stage_sizes):
    for block in range(blocks):
      source, target = f"layer{stage + 1}.{block}", f"stage{stage + 1}_block{block + 1}"
      for k in (1, 2, 3):
        out[f"{target}/conv{k}/kernel"] = kernel(f"{source}.conv{k}")
        out[f"{target}/norm{k}/scale"], out[f"{target}/norm{k}/bias"] = folded(f"{source}.bn{k}")
      if f"{source}.downsample.0.weight" in state_dict:
        out[f"{target}/proj_conv/kernel"] = kernel(f"{source}.downsample.0")
        out[f"{target}/proj_norm/scale"], out[f"{target}/proj_norm/bias"] = folded(f"{source}.downsample.1")
  return out
