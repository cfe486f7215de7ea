"""The CLIP ViT architectures open_clip names, as the project's model config (no JAX imported).

An :class:`Architecture` holds the shapes and choices of a CLIP ViT dual
encoder; :meth:`Architecture.model_config` is the ``config.model`` of the
project's ``vit`` + ``causal_transformer`` towers that compute the same
network. Configs read it by name (:func:`architecture_of_name`), the
converter (:mod:`ccmr_jax.models.from_open_clip`) from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import ml_collections

# The per-channel pixel statistics CLIP's image towers were trained with (of [0, 1] RGB values).
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip_json(image_size: int, patch: int, vision: tuple[int, int], text: tuple[int, int, int],
                    embed_dim: int) -> dict:
  """An open_clip model config: vision ``(width, layers)``, text ``(width, heads, layers)``."""
  return {"embed_dim": embed_dim,
          "vision_cfg": {"image_size": image_size, "layers": vision[1], "width": vision[0], "patch_size": patch},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text[0], "heads": text[1],
                       "layers": text[2]}}


# open_clip's configs of the CLIP ViT families (the same as its model_configs/*.json); each has a
# "-quickgelu" twin with QuickGELU, the activation of OpenAI's weights.
MODEL_CONFIGS = {
    "ViT-B-32": _open_clip_json(224, 32, (768, 12), (512, 8, 12), 512),
    "ViT-B-16": _open_clip_json(224, 16, (768, 12), (512, 8, 12), 512),
    "ViT-L-14": _open_clip_json(224, 14, (1024, 24), (768, 12, 12), 768),
}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The shapes and choices of a CLIP ViT dual encoder."""

  embed_dim: int
  image_size: int
  patch: int
  vision_width: int
  vision_depth: int
  vision_heads: int
  text_width: int
  text_depth: int
  text_heads: int
  context_length: int
  vocab_size: int
  activation: str = "gelu"

  def model_config(self) -> ml_collections.ConfigDict:
    """``config.model`` of the dual encoder with this architecture (CLIP's pixel statistics, no projection bias)."""
    return ml_collections.ConfigDict(dict(
        image_tower="vit", text_tower="causal_transformer", embed_dim=self.embed_dim, temperature_init=0.07,
        projection_bias=False, dtype="float32",
        vit=dict(patch=self.patch, width=self.vision_width, depth=self.vision_depth, heads=self.vision_heads,
                 activation=self.activation, pixel_mean=CLIP_PIXEL_MEAN, pixel_std=CLIP_PIXEL_STD),
        causal_transformer=dict(width=self.text_width, depth=self.text_depth, heads=self.text_heads,
                                activation=self.activation)))


def base_name(name: str) -> str:
  """The model name without open_clip's ``-quickgelu`` suffix."""
  return name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name


def named_model_config(name: str, model_config_file: str = "") -> dict:
  """open_clip's JSON config of ``name``: from ``model_config_file``, :data:`MODEL_CONFIGS` or open_clip's folder.

  A ``-quickgelu`` suffix sets ``quick_gelu`` on the config of the name without it.
  """
  base = base_name(name)
  config = MODEL_CONFIGS.get(base)
  if model_config_file:
    with open(model_config_file, encoding="utf-8") as f:
      config = json.load(f)
  elif config is None:
    spec = importlib.util.find_spec("open_clip")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model_configs") if spec else ""
    path = os.path.join(folder, f"{base}.json")
    if not os.path.isfile(path):
      raise ValueError(f"unknown open_clip model {name!r}: choose one of {sorted(MODEL_CONFIGS)} (or a -quickgelu "
                       "twin), a name in the installed open_clip's model_configs/, or pass --model_config=FILE")
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  if not isinstance(config, dict) or not isinstance(config.get("vision_cfg", {}), dict):
    raise ValueError(f"the model config of {name!r} is not open_clip's JSON format (an object with vision_cfg, "
                     "text_cfg and embed_dim)")
  return {**config, "quick_gelu": config.get("quick_gelu", False) or name.endswith("-quickgelu")}


def architecture_of_name(name: str) -> Architecture:
  """The architecture of one of :data:`MODEL_CONFIGS` (or its ``-quickgelu`` twin), without a checkpoint."""
  config = named_model_config(name)
  vision, text = config["vision_cfg"], config["text_cfg"]
  return Architecture(
      embed_dim=config["embed_dim"], image_size=vision["image_size"], patch=vision["patch_size"],
      vision_width=vision["width"], vision_depth=vision["layers"],
      vision_heads=vision["width"] // vision.get("head_width", 64), text_width=text["width"],
      text_depth=text["layers"], text_heads=text["heads"], context_length=text["context_length"],
      vocab_size=text["vocab_size"], activation="quick_gelu" if config["quick_gelu"] else "gelu")
