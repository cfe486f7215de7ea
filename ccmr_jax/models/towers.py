"""Image and text towers (Flax Linen modules, pure ``init``/``apply``).

Each tower maps its input to a feature vector; :mod:`ccmr_jax.models.dual_encoder`
projects both into the shared space. Towers are chosen by name from config
through :data:`IMAGE_TOWERS` and :data:`TEXT_TOWERS`; larger ones register here.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ccmr_jax.data.tokenizer import PAD_ID
from ccmr_jax.models.resnet import ResNetTower
from ccmr_jax.models.vit import CausalTextTower, VisionTransformerTower


def space_to_depth(x: jnp.ndarray, patch: int) -> jnp.ndarray:
  """``[B, H, W, C]`` → ``[B, H/p, W/p, p*p*C]``: non-overlapping patches as channels."""
  b, h, w, c = x.shape
  if h % patch or w % patch:
    raise ValueError(f"image side {h}x{w} is not divisible by the patch size {patch}")
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // patch, w // patch, patch * patch * c)


class ConvImageTower(nn.Module):
  """A small convolutional tower for the synthetic scenes.

  ``uint8 [B, H, W, 3]`` → scaled to [-1, 1] → ``patch``x``patch`` patch
  embedding to ``widths[0]`` channels → for each further width: 2x2 patch
  merge (a strided 2x2 convolution written as a matmul) and a 3x3 conv, GELU
  after each → flatten (keeps where things are, which captions talk about)
  → LayerNorm → dense ``features``.

  Patch embeddings are matmuls: on CPU, XLA's convolutions over large
  feature maps are several times slower than the same work as a matmul.
  """

  patch: int = 4
  widths: Sequence[int] = (64, 128)
  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    x = images.astype(self.dtype) / 127.5 - 1.0
    x = nn.gelu(nn.Dense(self.widths[0], dtype=self.dtype, name="patch_embed")(space_to_depth(x, self.patch)))
    for width in self.widths[1:]:
      x = nn.gelu(nn.Dense(width, dtype=self.dtype)(space_to_depth(x, 2)))
      x = nn.gelu(nn.Conv(width, (3, 3), dtype=self.dtype)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    return nn.gelu(nn.Dense(self.features, dtype=self.dtype)(x))


class TransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention block with a padding mask."""

  width: int
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype)(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_ratio * self.width, dtype=self.dtype)(y)
    y = nn.Dense(self.width, dtype=self.dtype)(nn.gelu(y))
    return x + y


class TransformerTextTower(nn.Module):
  """Token + position embeddings, ``depth`` Transformer blocks, masked mean pool."""

  vocab_size: int
  max_length: int
  width: int = 128
  depth: int = 2
  heads: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    valid = tokens != PAD_ID
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype)(tokens)
    pos = self.param("position_embedding", nn.initializers.normal(0.02), (self.max_length, self.width))
    x = x + pos[: tokens.shape[1]].astype(self.dtype)
    mask = nn.make_attention_mask(valid, valid)
    for _ in range(self.depth):
      x = TransformerBlock(self.width, self.heads, dtype=self.dtype)(x, mask)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    weights = valid.astype(self.dtype)[..., None]
    return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class GRUTextTower(nn.Module):
  """Bidirectional GRU over the tokens (as in VSE++); both final states, concatenated."""

  vocab_size: int
  max_length: int
  width: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    lengths = (tokens != PAD_ID).sum(-1)
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype)(tokens)
    rnn = nn.Bidirectional(nn.RNN(nn.GRUCell(self.width, dtype=self.dtype), return_carry=True),
                           nn.RNN(nn.GRUCell(self.width, dtype=self.dtype), return_carry=True),
                           return_carry=True)
    (forward, backward), _ = rnn(x, seq_lengths=lengths)
    return jnp.concatenate([forward, backward], axis=-1)


IMAGE_TOWERS = {"conv": ConvImageTower, "vit": VisionTransformerTower, "resnet": ResNetTower}
TEXT_TOWERS = {"transformer": TransformerTextTower, "gru": GRUTextTower, "causal_transformer": CausalTextTower}
