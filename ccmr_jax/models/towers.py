"""Image and text towers (Flax Linen modules, pure ``init``/``apply``).

Each tower maps its input to a feature vector; :mod:`ccmr_jax.models.dual_encoder`
projects both into the shared space. Towers are chosen by name from config
through :data:`IMAGE_TOWERS` and :data:`TEXT_TOWERS`; larger ones register here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccmr_jax.data.tokenizer import PAD_ID
from ccmr_jax.models import vit
from ccmr_jax.models.resnet import ResNetTower
from ccmr_jax.models.vit import CausalTextTower, VisionTransformerTower


def space_to_depth(x: jnp.ndarray, patch: int) -> jnp.ndarray:
  """``[B, H, W, C]`` → ``[B, H/p, W/p, p*p*C]``: non-overlapping patches as channels."""
  b, h, w, c = x.shape
  if h % patch or w % patch:
    raise ValueError(f"image side {h}x{w} is not divisible by the patch size {patch}")
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // patch, w // patch, patch * patch * c)


def over_rows(layer: Callable[[jnp.ndarray], jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
  """``layer`` applied to ``x [..., C]`` seen as ``[N, C]`` rows (a free reshape), the leading shape restored.

  For a dense layer the same numbers; XLA:CPU runs it, and the gradient of
  its kernel, faster over 2-D rows than over a 4-D feature map
  (``BENCHMARKS.md``).
  """
  y = layer(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


def conv_as_matmul(lhs: jnp.ndarray, rhs: jnp.ndarray, window_strides: Sequence[int], padding: Any,
                   lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                   dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None) -> jnp.ndarray:
  """A stride-1 ``SAME`` convolution ``[B, H, W, C] * [kh, kw, C, O]`` as one matmul over patches.

  ``y[b, i, j] = Σ_{u, v} x_pad[b, i + u, j + v] · K[u, v]`` is
  ``cols @ K.reshape(kh·kw·C, O)``, where row ``(b, i, j)`` of ``cols`` holds
  the ``kh × kw`` neighbourhood of ``(i, j)`` (zero-padded), in ``(u, v, c)``
  order. The same numbers as ``lax.conv_general_dilated`` up to float
  rounding; XLA:CPU runs this conv, its input gradient and its kernel
  gradient as three library matmuls, where its convolution kernels take
  about twice as long on the default tower's 8×8×128 maps
  (``BENCHMARKS.md``). Passed to ``nn.Conv(conv_general_dilated=...)``, so the
  layer's parameters and their init stay ``nn.Conv``'s; anything but stride
  1, ``SAME`` padding, no dilation, one group and NHWC/HWIO is refused.
  """
  if lhs.ndim != 4 or rhs.ndim != 4:
    raise ValueError(f"conv_as_matmul computes 2-D convolutions only, not inputs {lhs.shape} * kernels {rhs.shape}")
  kh, kw, channels, out = rhs.shape
  same = ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)
  explicit_same = not isinstance(padding, str) and tuple(map(tuple, padding)) == same
  if (tuple(window_strides) != (1, 1) or not (padding == "SAME" or explicit_same) or feature_group_count != 1
      or any(d not in (None, (1, 1)) for d in (lhs_dilation, rhs_dilation))):
    raise ValueError("conv_as_matmul computes stride-1 SAME convolutions without dilation or groups, "
                     f"not strides {window_strides}, padding {padding}, {feature_group_count} groups")
  channels_last = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if dimension_numbers is not None and (
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != channels_last):
    raise ValueError(f"conv_as_matmul expects NHWC inputs and HWIO kernels, not {dimension_numbers}")
  batch, height, width, _ = lhs.shape
  x = jnp.pad(lhs, ((0, 0), *same, (0, 0)))
  cols = jnp.concatenate([x[:, u:u + height, v:v + width] for u in range(kh) for v in range(kw)], axis=-1)
  y = jnp.dot(cols.reshape(batch * height * width, kh * kw * channels), rhs.reshape(kh * kw * channels, out),
              precision=precision)
  return y.reshape(batch, height, width, out)


class ConvImageTower(nn.Module):
  """A small convolutional tower for the synthetic scenes.

  ``uint8 [B, H, W, 3]`` → scaled to [-1, 1] → ``patch``x``patch`` patch
  embedding to ``widths[0]`` channels → for each further width: 2x2 patch
  merge (a strided 2x2 convolution written as a matmul) and a 3x3 conv, GELU
  after each → flatten (keeps where things are, which captions talk about)
  → LayerNorm → dense ``features``.

  Patch embeddings are matmuls over the patches as rows (:func:`over_rows`),
  and so is the 3x3 conv (:func:`conv_as_matmul`): on CPU, XLA's
  convolutions over large feature maps are several times slower than the
  same work as a matmul.
  """

  patch: int = 4
  widths: Sequence[int] = (64, 128)
  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    x = images.astype(self.dtype) / 127.5 - 1.0
    patch_embed = nn.Dense(self.widths[0], dtype=self.dtype, name="patch_embed")
    x = nn.gelu(over_rows(patch_embed, space_to_depth(x, self.patch)))
    for width in self.widths[1:]:
      x = nn.gelu(over_rows(nn.Dense(width, dtype=self.dtype), space_to_depth(x, 2)))
      x = nn.gelu(nn.Conv(width, (3, 3), dtype=self.dtype, conv_general_dilated=conv_as_matmul)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    return nn.gelu(nn.Dense(self.features, dtype=self.dtype)(x))


class SelfAttention(nn.Module):
  """Flax's ``MultiHeadDotProductAttention`` as self-attention over rows, with the heads folded into the batch.

  ``softmax(q·kᵀ/√d, masked)·v`` per head, ``d = width / heads``, where the
  mask lets a valid token attend to the valid tokens of its own caption (a
  padding row attends uniformly to all, as in Flax). Parameters (``query``,
  ``key``, ``value``: ``[width, heads, d]``; ``out``: ``[heads, d, width]``),
  their names and their init are Flax's, so checkpoints of either load into
  the other; the input is the ``[batch·length, width]`` rows of the block,
  and the scores are :func:`ccmr_jax.models.vit.folded_attention`'s two
  batched matmuls over ``batch·heads``, which XLA:CPU runs faster than
  Flax's 4-D einsums (``BENCHMARKS.md``).
  """

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, rows: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    batch, length = valid.shape
    width = rows.shape[-1]
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by {self.heads} heads")
    d = width // self.heads
    project = functools.partial(nn.DenseGeneral, features=(self.heads, d), dtype=self.dtype)

    def folded(heads_last: jnp.ndarray) -> jnp.ndarray:  # [batch·length, heads, d] → [batch·heads, length, d]
      return heads_last.reshape(batch, length, self.heads, d).transpose(0, 2, 1, 3).reshape(-1, length, d)

    query = folded(project(name="query")(rows) / jnp.sqrt(d).astype(self.dtype))
    key, value = (folded(project(name=name)(rows)) for name in ("key", "value"))
    allowed = jnp.repeat(valid[:, :, None] & valid[:, None, :], self.heads, axis=0)
    out = vit.folded_attention(query, key, value, allowed)
    out = out.reshape(batch, self.heads, length, d).transpose(0, 2, 1, 3).reshape(batch * length, self.heads, d)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention block with a padding mask; ``[B, L, width]`` → ``[B, L, width]``.

  Norms and dense layers see the tokens as ``[B·L, width]`` rows (a free
  reshape): XLA:CPU runs a dense layer over 2-D rows, and its gradient,
  faster than over a 3-D input.
  """

  width: int
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    batch, length, _ = x.shape
    x = x.reshape(batch * length, self.width)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + SelfAttention(self.heads, self.dtype, name="MultiHeadDotProductAttention_0")(y, valid)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_ratio * self.width, dtype=self.dtype)(y)
    x = x + nn.Dense(self.width, dtype=self.dtype)(nn.gelu(y))
    return x.reshape(batch, length, self.width)


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
    for _ in range(self.depth):
      x = TransformerBlock(self.width, self.heads, dtype=self.dtype)(x, valid)
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
