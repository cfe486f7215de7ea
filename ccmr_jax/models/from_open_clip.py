"""open_clip checkpoints as the project's ``vit`` + ``causal_transformer`` dual encoder.

  python -m ccmr_jax.models.from_open_clip --model=ViT-B-32 --checkpoint=PATH.pt --out=PATH.npz

reads a local checkpoint of an open_clip CLIP model (nothing is downloaded):
a training checkpoint or state dict saved with ``torch.save`` (``.pt``,
``.bin``; a ``state_dict`` entry and ``module.`` prefixes are unwrapped),
open_clip's ``.safetensors``, or OpenAI's original TorchScript archive. It
writes the weights in the project's format (:mod:`ccmr_jax.models.weights`)
with the architecture recorded beside them, and prints the config that runs
them. A run starts from it with ``--config.model.init_from=PATH.npz``
(``configs/flickr_clip.py``, ``configs/coco_clip.py``).

The architecture is read from the checkpoint's shapes (widths, depths, patch
and image size, context length, vocabulary, embedding size) and checked
against the model config the name gives: one of :data:`MODEL_CONFIGS`, one
in the installed open_clip's ``model_configs/``, or ``--model_config=FILE``
(open_clip's JSON format). The name also gives what shapes cannot: the
number of heads and the MLP activation. OpenAI's weights were trained with
QuickGELU: convert them with a ``-quickgelu`` name (open_clip's convention)
or from the TorchScript file, where it is detected.

The mapping, open_clip → project (``[out, in]`` PyTorch matrices become
``[in, out]`` Flax kernels):

  ``visual.conv1.weight [w, 3, p, p]``   → ``image_tower/patch_embed/kernel [p·p·3, w]`` (row, column, channel)
  ``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``, ``visual.ln_post``
                                         → the same names under ``image_tower``
  ``*.transformer.resblocks.i.{ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``
                                         → ``*/transformer/block_i/{ln_1, in_proj, out_proj, ln_2, c_fc, c_proj}``
  ``token_embedding``, ``positional_embedding``, ``ln_final`` → ``text_tower/…``
  ``visual.proj``, ``text_projection``   → ``image_projection/kernel``, ``text_projection/kernel`` (no bias)
  ``logit_scale``                        → ``log_scale`` (InfoNCE's inverse temperature, ``exp`` of it)
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

import flax
import ml_collections
import numpy as np
from absl import app, flags

from ccmr_jax import cli, files
from ccmr_jax.data.clip_tokenizer import ClipTokenizer
from ccmr_jax.models import weights
from ccmr_jax.models.clip_architectures import MODEL_CONFIGS, Architecture, architecture_of_name, base_name, \
    named_model_config

SOURCE = "open_clip"
ACTIVATION_CHOICES = ("auto", "gelu", "quick_gelu")
# Entries an open_clip or OpenAI state dict may hold that are not weights.
_NOT_WEIGHTS = {"input_resolution", "context_length", "vocab_size", "attn_mask", "visual.attn_mask"}


def _count_blocks(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.ln_1\.weight$")
  return len({int(m.group(1)) for key in state_dict if (m := pattern.match(key))})


def read_architecture(state_dict: Mapping[str, np.ndarray], config: dict, activation: str) -> Architecture:
  """The architecture of ``state_dict``, checked against open_clip's model ``config``.

  Raises:
    ValueError: a weight the architecture needs is missing, or a shape the
      config gives differs from the checkpoint's (each difference named).
  """
  needed = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight", "positional_embedding",
            "text_projection")
  missing = [key for key in needed if key not in state_dict]
  if missing:
    raise ValueError(f"not an open_clip CLIP ViT checkpoint: it has no {', '.join(missing)}")
  vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
  conv = state_dict["visual.conv1.weight"]
  patches = int(round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  vision_width, text_width = conv.shape[0], state_dict["token_embedding.weight"].shape[1]
  found = Architecture(
      embed_dim=state_dict["text_projection"].shape[1], image_size=patches * conv.shape[-1], patch=conv.shape[-1],
      vision_width=vision_width, vision_depth=_count_blocks(state_dict, "visual.transformer.resblocks."),
      vision_heads=vision_width // vision.get("head_width", 64), text_width=text_width,
      text_depth=_count_blocks(state_dict, "transformer.resblocks."),
      text_heads=text.get("heads", text_width // 64), context_length=state_dict["positional_embedding"].shape[0],
      vocab_size=state_dict["token_embedding.weight"].shape[0],
      activation=activation if activation != "auto" else ("quick_gelu" if config.get("quick_gelu") else "gelu"))
  given = {"embed_dim": config.get("embed_dim"), "image_size": vision.get("image_size"),
           "patch": vision.get("patch_size"), "vision_width": vision.get("width"),
           "vision_depth": vision.get("layers"), "text_width": text.get("width"), "text_depth": text.get("layers"),
           "context_length": text.get("context_length"), "vocab_size": text.get("vocab_size")}
  differences = [f"{field}: checkpoint {getattr(found, field)}, model config {value}"
                 for field, value in given.items() if value is not None and value != getattr(found, field)]
  if differences:
    raise ValueError("the checkpoint is not the named model:\n  " + "\n  ".join(differences))
  return found


def _same(array: np.ndarray) -> np.ndarray:
  return array


def _transposed(matrix: np.ndarray) -> np.ndarray:
  return matrix.T


def _patch_kernel(conv: np.ndarray) -> np.ndarray:
  """``[w, 3, p, p]`` convolution → ``[p·p·3, w]`` rows in (row, column, channel) patch order."""
  return conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0])


def _scalar(value: np.ndarray) -> np.ndarray:
  return np.asarray(value, np.float32).reshape(())


def _block_map(ours: str, theirs: str) -> dict[str, tuple[str, Callable]]:
  same, transposed = _same, _transposed
  out = {}
  for name in ("ln_1", "ln_2"):
    out[f"{ours}/{name}/scale"] = (f"{theirs}.{name}.weight", same)
    out[f"{ours}/{name}/bias"] = (f"{theirs}.{name}.bias", same)
  out[f"{ours}/in_proj/kernel"] = (f"{theirs}.attn.in_proj_weight", transposed)
  out[f"{ours}/in_proj/bias"] = (f"{theirs}.attn.in_proj_bias", same)
  for name, source in (("out_proj", "attn.out_proj"), ("c_fc", "mlp.c_fc"), ("c_proj", "mlp.c_proj")):
    out[f"{ours}/{name}/kernel"] = (f"{theirs}.{source}.weight", transposed)
    out[f"{ours}/{name}/bias"] = (f"{theirs}.{source}.bias", same)
  return out


def weight_map(arch: Architecture) -> dict[str, tuple[str, Callable]]:
  """``{project param path: (open_clip key, array transform)}`` for every param of the dual encoder."""
  same = _same
  out = {"image_tower/patch_embed/kernel": ("visual.conv1.weight", _patch_kernel),
         "image_projection/kernel": ("visual.proj", same), "text_projection/kernel": ("text_projection", same),
         "log_scale": ("logit_scale", _scalar),
         "text_tower/token_embedding/embedding": ("token_embedding.weight", same),
         "text_tower/position_embedding": ("positional_embedding", same)}
  for name in ("class_embedding", "positional_embedding"):
    out[f"image_tower/{name.replace('positional', 'position')}"] = (f"visual.{name}", same)
  for ours, theirs in (("image_tower/ln_pre", "visual.ln_pre"), ("image_tower/ln_post", "visual.ln_post"),
                       ("text_tower/ln_final", "ln_final")):
    out[f"{ours}/scale"], out[f"{ours}/bias"] = (f"{theirs}.weight", same), (f"{theirs}.bias", same)
  for i in range(arch.vision_depth):
    out.update(_block_map(f"image_tower/transformer/block_{i}", f"visual.transformer.resblocks.{i}"))
  for i in range(arch.text_depth):
    out.update(_block_map(f"text_tower/transformer/block_{i}", f"transformer.resblocks.{i}"))
  return out


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], arch: Architecture) -> dict:
  """The dual encoder's params tree (float32) holding the open_clip weights.

  Raises:
    ValueError: keys the architecture needs are missing, or weights are left
      over that it has no place for (each named).
  """
  mapping = weight_map(arch)
  used = {key for key, _ in mapping.values()}
  missing = sorted(used - set(state_dict))
  unexpected = sorted(set(state_dict) - used - _NOT_WEIGHTS)
  if missing or unexpected:
    raise ValueError(f"the checkpoint does not fit a CLIP ViT of {arch}:\n  missing: {missing[:20]}"
                     f"\n  unexpected: {unexpected[:20]}")
  flat = {tuple(path.split("/")): np.asarray(transform(np.asarray(state_dict[key])), np.float32)
          for path, (key, transform) in mapping.items()}
  return flax.traverse_util.unflatten_dict(flat)


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _torch_state_dict(path: str) -> tuple[dict, bool]:
  """``(state dict of tensors, whether it was OpenAI's TorchScript archive)``."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch: pip install -e '.[clip]' (or convert a .safetensors)") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True), False
  except Exception as load_error:  # noqa: BLE001 - not a plain pickle: perhaps a TorchScript archive
    try:
      return torch.jit.load(path, map_location="cpu").state_dict(), True
    except Exception as e:  # noqa: BLE001 - neither: say both reasons
      raise ValueError(f"{path} is neither a torch.save checkpoint ({_first_line(load_error)}) nor a TorchScript "
                       f"archive ({_first_line(e)})") from e


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], bool]:
  """``(state dict as float32 numpy arrays, whether it is OpenAI's TorchScript archive)`` of a local file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return {key: np.asarray(value, np.float32) for key, value in load_file(path).items()}, False
  state, openai = _torch_state_dict(path)
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  arrays = {}
  for key, value in state.items():
    key = key[len("module."):] if key.startswith("module.") else key
    arrays[key] = value.detach().float().numpy() if hasattr(value, "detach") else np.asarray(value)
  return arrays, openai


def convert(checkpoint: str, out: str, model: str, model_config_file: str = "", activation: str = "auto"):
  """Converts ``checkpoint`` into ``out`` (weights + metadata); returns the :class:`Architecture`."""
  if activation not in ACTIVATION_CHOICES:
    raise ValueError(f"unknown activation {activation!r}; choose one of {list(ACTIVATION_CHOICES)}")
  state_dict, openai = read_checkpoint(checkpoint)
  if openai and activation == "auto":
    activation = "quick_gelu"  # OpenAI's TorchScript weights were trained with QuickGELU
  arch = read_architecture(state_dict, named_model_config(model, model_config_file), activation)
  params = params_from_state_dict(state_dict, arch)
  metadata = {"source": SOURCE, "model": model, "checkpoint": os.path.abspath(checkpoint),
              "checkpoint_sha256": files.file_sha256(checkpoint), "architecture": dataclasses.asdict(arch)}
  weights.save_weights(out, params, metadata)
  return arch


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, (tuple, list)) else value
  return out


def config_differences(arch: Architecture, config: ml_collections.ConfigDict, image_size: int) -> list[str]:
  """What a run's config says unlike the converted architecture (``model.*``, ``tokenizer.*``, image size)."""
  expected = _flat(arch.model_config().to_dict(), "model.")
  del expected["model.temperature_init"], expected["model.dtype"]  # the checkpoint's temperature; any dtype
  actual = _flat(config.model.to_dict(), "model.")
  out = [f"{key}: checkpoint {value!r}, config {actual.get(key)!r}" for key, value in expected.items()
         if actual.get(key) != value]
  if config.tokenizer.get("kind", "words") != "clip_bpe":
    out.append(f"tokenizer.kind: checkpoint 'clip_bpe', config {config.tokenizer.get('kind', 'words')!r}")
  if config.tokenizer.max_length != arch.context_length:
    out.append(f"tokenizer.max_length: checkpoint {arch.context_length}, config {config.tokenizer.max_length}")
  if image_size != arch.image_size:
    out.append(f"image size (data.image_size): checkpoint {arch.image_size}, config {image_size}")
  return out


def read_converted(path: str) -> Architecture:
  """The architecture a converted ``.npz`` records.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz`` this converter wrote.
  """
  metadata = weights.read_metadata(path)
  if metadata.get("source") != SOURCE or not isinstance(metadata.get("architecture"), dict):
    raise ValueError(f"{path} was not written by `python -m ccmr_jax.models.from_open_clip` (no architecture)")
  try:
    return Architecture(**metadata["architecture"])
  except TypeError as e:
    raise ValueError(f"{path}: unreadable architecture ({e})") from e


def run_command(arch: Architecture, model: str, out: str) -> str:
  """The command that fine-tunes the converted weights on Flickr30K (``coco_clip.py`` for COCO)."""
  name = base_name(model) + ("-quickgelu" if arch.activation == "quick_gelu" else "")
  if base_name(model) in MODEL_CONFIGS and arch == architecture_of_name(name):
    return f"python -m ccmr_jax.main --config=configs/flickr_clip.py:{name} --config.model.init_from={out}"
  flat = _flat(arch.model_config().to_dict(), "--config.model.")
  overrides = " ".join(f"{key}={','.join(map(str, v)) if isinstance(v, list) else v}" for key, v in flat.items())
  return (f"python -m ccmr_jax.main --config=configs/flickr_clip.py {overrides} "
          f"--config.tokenizer.max_length={arch.context_length} --config.data.image_size={arch.image_size} "
          f"--config.model.init_from={out}")


@dataclasses.dataclass(frozen=True)
class ConvertedWeights:
  """A converted ``.npz`` a run starts from (what a pretraining folder is to ``model.init_from``)."""

  source: str
  tokenizer: ClipTokenizer

  @property
  def weights_path(self) -> str:
    return self.source


def load_converted(path: str, config: ml_collections.ConfigDict, image_size: int) -> ConvertedWeights:
  """The converted weights at ``path`` for a run of ``config`` whose image tower sees ``image_size`` pixels.

  Raises:
    FileNotFoundError: no such file, or no BPE vocabulary file.
    ValueError: not a converted file, or a config that describes another
      architecture (every difference named, with the checkpoint's value).
  """
  arch = read_converted(path)
  differences = config_differences(arch, config, image_size)
  if differences:
    raise ValueError(f"{path} holds another architecture than the config's; set these fields to the checkpoint's "
                     "values (or use the config argument the converter printed):\n  " + "\n  ".join(differences))
  return ConvertedWeights(path, ClipTokenizer.load(config.tokenizer.get("bpe_vocab", ""), arch.context_length))


@cli.exits_on_user_error()
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    arch = convert(FLAGS.checkpoint, FLAGS.out, FLAGS.model, FLAGS.model_config, FLAGS.activation)
  except (OSError, ValueError, ImportError) as e:
    raise cli.UserError(str(e)) from e
  print(f"wrote {FLAGS.out}: {arch}")
  print(f"fine-tune it with:\n  {run_command(arch, FLAGS.model, FLAGS.out)}")


FLAGS = flags.FLAGS

if __name__ == "__main__":  # the flags exist only in the command: runs import the module
  flags.DEFINE_string("checkpoint", None, "Local open_clip checkpoint (.pt, .bin, .safetensors, or OpenAI's .pt).")
  flags.DEFINE_string("out", None, "The .npz to write.")
  flags.DEFINE_string("model", None, "open_clip model name, e.g. ViT-B-32, ViT-B-16-quickgelu.")
  flags.DEFINE_string("model_config", "", "An open_clip model config JSON (for models open_clip does not name).")
  flags.DEFINE_enum("activation", "auto", ACTIVATION_CHOICES, "MLP activation; auto: from the model name.")
  flags.mark_flags_as_required(["checkpoint", "out", "model"])
  cli.run(main)
