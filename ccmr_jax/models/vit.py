"""Transformer towers with open_clip's layout: a ViT image tower and a causal text tower.

Both follow ``open_clip.transformer`` (``VisionTransformer``, ``TextTransformer``)
block for block, so a config here and an open_clip model config describe the
same network: pre-LayerNorm residual blocks (fused QKV projection, an MLP of
``mlp_ratio × width`` with exact GELU, or QuickGELU ``x·σ(1.702·x)`` as in
OpenAI's CLIP weights), LayerNorm epsilon 1e-5, a class token and
``ln_pre`` / ``ln_post`` in the image tower, a causal mask and pooling at
the end-of-text token in the text tower. The projection into the shared
space is the dual encoder's (``model.projection_bias=False`` makes it
open_clip's, a matmul without bias). :mod:`ccmr_jax.models.from_open_clip`
converts open_clip checkpoints into these towers.

Per image of ``N = (H/p)·(W/p)`` patches and per caption of ``L`` tokens, the
forward pass costs (multiply-adds counted as 2 FLOPs, width ``w``, depth ``d``)

  ``image: 2·N·(3·p²)·w + d·(24·(N+1)·w² + 4·(N+1)²·w)``
  ``text:  d·(24·L·w² + 4·L²·w)``

(per block: QKV 6·T·w², output 2·T·w², MLP 16·T·w², scores and weighted sum
2·2·T²·w); training costs three times the forward pass.

``remat=True`` recomputes each block's activations in the backward pass
instead of storing them (``flax.linen.remat``): less memory for large towers
and batches, about one more forward pass of compute.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccmr_jax.data.tokenizer import PAD_ID

LAYER_NORM_EPSILON = 1e-5  # PyTorch's default, which open_clip uses
_SQRT_HALF = 2.0 ** -0.5


def exact_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """``x·Φ(x) = ½·x·(1 + erf(x/√2))``: the exact GELU of PyTorch's ``nn.GELU()``.

  Written with ``erf``: ``jax.nn.gelu(approximate=False)`` uses ``erfc``, the
  same function (the two differ by at most 1e-6 in float32), which XLA:CPU
  lowers to an exponential and two polynomial branches where ``erf`` is one
  clamped rational polynomial: 2.6x less time for the forward pass on the
  ``small`` workload's MLP activations.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """``x·σ(1.702·x)``: the GELU approximation OpenAI's CLIP weights were trained with."""
  return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


ACTIVATIONS = {"gelu": exact_gelu, "quick_gelu": quick_gelu}


def activation_fn(name: str):
  """The MLP activation named ``name`` (``gelu`` or ``quick_gelu``)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def multi_head_attention(qkv: jnp.ndarray, batch: int, length: int, heads: int, causal: bool) -> jnp.ndarray:
  """``softmax(q·kᵀ/√d + mask)·v`` for each head; ``[batch·length, 3·width]`` → ``[batch·length, width]``.

  ``qkv`` holds the fused projections (queries, keys, values, each
  ``heads × d`` wide). The heads are folded into the batch of two batched
  matmuls (one transpose in, one out), which XLA:CPU runs about twice as
  fast, forward and backward, as ``jax.nn.dot_product_attention`` over
  ``[batch, length, heads, d]`` with the heads as a second batch dimension.
  With ``causal``, position ``i`` attends to positions ``≤ i`` only.
  """
  width = qkv.shape[-1] // 3
  d = width // heads
  qkv = qkv.reshape(batch, length, 3, heads, d).transpose(2, 0, 3, 1, 4).reshape(3, batch * heads, length, d)
  allowed = jnp.tril(jnp.ones((length, length), bool)) if causal else None
  out = folded_attention(qkv[0] * jnp.asarray(d ** -0.5, qkv.dtype), qkv[1], qkv[2], allowed)
  return out.reshape(batch, heads, length, d).transpose(0, 2, 1, 3).reshape(batch * length, width)


def folded_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
                     allowed: jnp.ndarray | None = None) -> jnp.ndarray:
  """``softmax(q·kᵀ, masked)·v`` over ``[batch·heads, length, d]``: the heads folded into the batch.

  ``query`` comes scaled by ``1/√d``; where ``allowed`` (broadcast to
  ``[batch·heads, length, length]``) is False, the logit is the dtype's
  lowest value. Two batched matmuls, which XLA:CPU runs about twice as fast
  as a second batch dimension for the heads.
  """
  logits = jax.lax.dot_general(query, key, (((2,), (2,)), ((0,), (0,))))
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
  return jax.lax.dot_general(jax.nn.softmax(logits, axis=-1), value, (((2,), (1,)), ((0,), (0,))))


class ResidualAttentionBlock(nn.Module):
  """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``; causal attention if ``causal``.

  The norms and dense layers see the tokens as one ``[batch·length, width]``
  matrix (a free reshape): XLA:CPU compiles a dense layer over a 3-D input,
  and its gradient, to about twice the time of the same layer over 2-D rows.
  """

  width: int
  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  activation: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
    batch, length, _ = x.shape
    x = x.reshape(batch * length, self.width)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="ln_1")(x)
    qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="in_proj")(y)
    with jax.named_scope("attention"):  # names its operations in profiles (benchmarks/profile_step.py)
      y = multi_head_attention(qkv, batch, length, self.heads, self.causal)
    x = x + nn.Dense(self.width, dtype=self.dtype, name="out_proj")(y)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="ln_2")(x)
    y = activation_fn(self.activation)(nn.Dense(int(self.mlp_ratio * self.width), dtype=self.dtype, name="c_fc")(y))
    x = x + nn.Dense(self.width, dtype=self.dtype, name="c_proj")(y)
    return x.reshape(batch, length, self.width)


class Transformer(nn.Module):
  """``depth`` residual attention blocks, each rematerialised if ``remat``."""

  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  remat: bool = False
  activation: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    for i in range(self.depth):
      x = block(self.width, self.heads, self.mlp_ratio, self.causal, self.activation, self.dtype,
                name=f"block_{i}")(x)
    return x


class VisionTransformerTower(nn.Module):
  """ViT image tower: ``uint8 [B, H, W, 3]`` → ``[B, width]``, the class token after ``ln_post``.

  Pixels are normalised per channel, ``(x/255 − pixel_mean)/pixel_std``
  (the defaults map them to [-1, 1]; CLIP's weights expect
  :data:`ccmr_jax.models.clip_architectures.CLIP_PIXEL_MEAN` and ``CLIP_PIXEL_STD``); the
  ``patch``x``patch`` patch embedding (a strided convolution without bias)
  is a matmul over flattened patches.
  """

  patch: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  remat: bool = False
  activation: str = "gelu"
  pixel_mean: Sequence[float] = (0.5, 0.5, 0.5)
  pixel_std: Sequence[float] = (0.5, 0.5, 0.5)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    batch, height, width, channels = images.shape
    p = self.patch
    if height % p or width % p:
      raise ValueError(f"image side {height}x{width} is not divisible by the patch size {p}")
    std = np.asarray(self.pixel_std, np.float64)
    x = images.astype(self.dtype) * jnp.asarray(1.0 / (255.0 * std), self.dtype) \
        - jnp.asarray(np.asarray(self.pixel_mean) / std, self.dtype)
    x = x.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch * (height // p) * (width // p), p * p * channels)
    x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, name="patch_embed")(x).reshape(batch, -1, self.width)
    init = nn.initializers.normal(self.width ** -0.5)
    class_token = self.param("class_embedding", init, (self.width,)).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(class_token, (batch, 1, self.width)), x], axis=1)
    x = x + self.param("position_embedding", init, (x.shape[1], self.width)).astype(self.dtype)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="ln_pre")(x)
    x = Transformer(self.width, self.depth, self.heads, self.mlp_ratio, remat=self.remat,
                    activation=self.activation, dtype=self.dtype, name="transformer")(x)
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="ln_post")(x[:, 0])


class CausalTextTower(nn.Module):
  """open_clip's text transformer: ``int32 [B, L]`` tokens → ``[B, width]``.

  Token + position embeddings, causal blocks, ``ln_final``, then the feature
  at each caption's last token that is not padding (the end-of-text token of
  open_clip's tokenizer, the last word of the project's), which under the
  causal mask is the one that has seen the whole caption: open_clip's
  end-of-text pooling. Padding is looked for only after that token, so a
  padding id inside a caption (id 0 is ``!`` in CLIP's vocabulary) is a token
  like any other.
  """

  vocab_size: int
  max_length: int
  width: int = 512
  depth: int = 12
  heads: int = 8
  mlp_ratio: float = 4.0
  remat: bool = False
  activation: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embedding")(tokens)
    position = self.param("position_embedding", nn.initializers.normal(0.01), (self.max_length, self.width))
    x = x + position[: tokens.shape[1]].astype(self.dtype)
    x = Transformer(self.width, self.depth, self.heads, self.mlp_ratio, causal=True, remat=self.remat,
                    activation=self.activation, dtype=self.dtype, name="transformer")(x)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="ln_final")(x)
    last = tokens.shape[1] - 1 - jnp.argmax((tokens != PAD_ID)[:, ::-1], axis=1)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


def vit_forward_flops(image_size: int, patch: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
  """Forward FLOPs of :class:`VisionTransformerTower` for one image (formula in the module docstring)."""
  patches = (image_size // patch) ** 2
  tokens = patches + 1
  return 2.0 * patches * 3 * patch * patch * width + depth * block_forward_flops(tokens, width, mlp_ratio)


def text_forward_flops(length: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
  """Forward FLOPs of :class:`CausalTextTower` for one caption of ``length`` tokens.

  The causal mask does not save work: the full ``L x L`` scores are computed.
  """
  return depth * block_forward_flops(length, width, mlp_ratio)


def block_forward_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
  """``2·T·w·(3w + w + 2·mlp_ratio·w) + 4·T²·w``: the matmuls of one block over ``T`` tokens."""
  return 2.0 * tokens * width * (4 * width + 2 * mlp_ratio * width) + 4.0 * tokens * tokens * width
