"""The dual encoder: two towers, two projections, one L2-normalised space."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccmr_jax.models.towers import IMAGE_TOWERS, TEXT_TOWERS
from ccmr_jax.models.vit import ACTIVATIONS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DualEncoder(nn.Module):
  """Image tower + text tower → ``embed_dim`` unit vectors.

  Also owns ``log_scale``, the learnable inverse temperature of InfoNCE
  (``scale = exp(log_scale)``, initialised to ``1/temperature_init``).
  The projections are dense layers, with a bias unless ``projection_bias``
  is off (CLIP's are plain matmuls). Embeddings are returned in float32
  whatever the compute dtype.
  """

  image_tower: nn.Module
  text_tower: nn.Module
  embed_dim: int
  temperature_init: float = 0.07
  projection_bias: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    self.image_projection = nn.Dense(self.embed_dim, use_bias=self.projection_bias, dtype=self.dtype,
                                     name="image_projection")
    self.text_projection = nn.Dense(self.embed_dim, use_bias=self.projection_bias, dtype=self.dtype,
                                    name="text_projection")
    self.log_scale = self.param("log_scale", nn.initializers.constant(np.log(1.0 / self.temperature_init)), ())

  def encode_image(self, images: jnp.ndarray) -> jnp.ndarray:
    return l2_normalize(self.image_projection(self.image_tower(images)).astype(jnp.float32))

  def encode_text(self, tokens: jnp.ndarray) -> jnp.ndarray:
    return l2_normalize(self.text_projection(self.text_tower(tokens)).astype(jnp.float32))

  def embed_unnormalized(self, images: jnp.ndarray, tokens: jnp.ndarray):
    """Returns the float32 ``(image, text)`` projections before L2 normalisation (for MAS importance)."""
    return (self.image_projection(self.image_tower(images)).astype(jnp.float32),
            self.text_projection(self.text_tower(tokens)).astype(jnp.float32))

  def __call__(self, images: jnp.ndarray, tokens: jnp.ndarray):
    """Returns ``(image_embeddings, text_embeddings, scale)``."""
    return self.encode_image(images), self.encode_text(tokens), jnp.exp(self.log_scale)


def build_model(model_config: ml_collections.ConfigDict, vocab_size: int, max_length: int) -> DualEncoder:
  """The dual encoder named by ``config.model``.

  ``model.image_tower`` / ``model.text_tower`` pick the towers; the config
  blocks of the same names (``model.conv``, ``model.transformer``, ...) hold
  their keyword arguments.
  """
  if model_config.image_tower not in IMAGE_TOWERS:
    raise ValueError(f"unknown model.image_tower {model_config.image_tower!r}; choose one of {sorted(IMAGE_TOWERS)}")
  if model_config.text_tower not in TEXT_TOWERS:
    raise ValueError(f"unknown model.text_tower {model_config.text_tower!r}; choose one of {sorted(TEXT_TOWERS)}")
  if model_config.dtype not in DTYPES:
    raise ValueError(f"unknown model.dtype {model_config.dtype!r}; choose one of {sorted(DTYPES)}")
  dtype = DTYPES[model_config.dtype]
  # Lists (a config read back from JSON) become tuples: module fields stay hashable.
  image_kwargs = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in model_config.get(model_config.image_tower, {}).items()}
  text_kwargs = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in model_config.get(model_config.text_tower, {}).items()}
  for tower, kwargs in ((model_config.image_tower, image_kwargs), (model_config.text_tower, text_kwargs)):
    if "activation" in kwargs and kwargs["activation"] not in ACTIVATIONS:
      raise ValueError(f"unknown model.{tower}.activation {kwargs['activation']!r}; "
                       f"choose one of {sorted(ACTIVATIONS)}")
  image_tower = IMAGE_TOWERS[model_config.image_tower](dtype=dtype, **image_kwargs)
  text_tower = TEXT_TOWERS[model_config.text_tower](vocab_size=vocab_size, max_length=max_length,
                                                    dtype=dtype, **text_kwargs)
  return DualEncoder(image_tower, text_tower, model_config.embed_dim, temperature_init=model_config.temperature_init,
                     projection_bias=model_config.get("projection_bias", True), dtype=dtype)
