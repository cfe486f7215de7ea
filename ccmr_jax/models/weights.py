"""Weights files: a params tree as one ``.npz``, one array per parameter.

Each array is keyed by its path in the tree joined with ``/``
(``image_tower/Conv_0/kernel``, ``stem_conv/kernel``, ...), kernels in Flax's
layout. An optional :data:`METADATA_KEY` entry holds a JSON string about the
weights (:mod:`ccmr_jax.models.from_open_clip` records the architecture
there). The image-tower loader (:mod:`ccmr_jax.models.resnet`), the
pretraining stage (:mod:`ccmr_jax.pretrain`) and the open_clip converter
write and read this format. Loading requires exactly the tree's keys and
shapes and names every mismatch; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import flax
import numpy as np


def flatten_weights(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{"a/b/kernel": array}`` of a params tree."""
  return {"/".join(path): np.asarray(value) for path, value in flax.traverse_util.flatten_dict(dict(tree)).items()}


METADATA_KEY = "__metadata__"


def save_weights(path: str, params: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
  """Writes a params tree (and ``metadata``, JSON) as the documented ``.npz`` (written aside, then renamed)."""
  folder = os.path.dirname(os.path.abspath(path))
  arrays = flatten_weights(params)
  if metadata is not None:
    arrays[METADATA_KEY] = np.array(json.dumps(metadata, sort_keys=True))
  with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as f:
    np.savez(f, **arrays)
  os.replace(f.name, path)


def read_metadata(path: str) -> dict[str, Any]:
  """The metadata an ``.npz`` of weights carries (``{}`` when it has none).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz``, or metadata that is not a JSON object.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no weights file at {path}")
  try:
    with np.load(path, allow_pickle=False) as archive:
      if METADATA_KEY not in archive.files:
        return {}
      metadata = json.loads(str(archive[METADATA_KEY]))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not an .npz of weights with readable metadata ({e})") from e
  if not isinstance(metadata, dict):
    raise ValueError(f"{path}: its {METADATA_KEY} is not a JSON object")
  return metadata


def load_weights(params: Mapping[str, Any], path: str) -> dict[str, Any]:
  """The params with every array replaced by the one of the same key in ``path``.

  Args:
    params: the initialised params (they give the keys,
      shapes and dtypes expected).
    path: an ``.npz`` in the documented format.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not an ``.npz`` of arrays, lacks keys, has keys
      the params do not, or has other shapes (each one named).
  """
  expected = flatten_weights(params)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no pretrained weights file at {path}")
  try:
    with np.load(path, allow_pickle=False) as archive:
      found = {key: archive[key] for key in archive.files if key != METADATA_KEY}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not an .npz of arrays ({e})") from e
  problems = [f"missing {key} {expected[key].shape}" for key in sorted(set(expected) - set(found))]
  problems += [f"unexpected {key} {found[key].shape}" for key in sorted(set(found) - set(expected))]
  problems += [f"{key}: file {found[key].shape}, params {expected[key].shape}"
               for key in sorted(set(found) & set(expected)) if found[key].shape != expected[key].shape]
  if problems:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise ValueError(f"{path} does not fit the params ({len(problems)} problems):\n  {shown}")
  loaded = {tuple(key.split("/")): found[key].astype(expected[key].dtype) for key in expected}
  return flax.traverse_util.unflatten_dict(loaded)


def load_encoder_weights(variables: Mapping[str, Any], path: str) -> dict[str, Any]:
  """The dual encoder's variables with every array of ``params`` (both towers, projections, temperature) from ``path``."""
  return {**variables, "params": load_weights(variables["params"], path)}
