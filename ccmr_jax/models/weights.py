"""Weights files: a params tree as one ``.npz``, one array per parameter.

Each array is keyed by its path in the tree joined with ``/``
(``image_tower/Conv_0/kernel``, ``stem_conv/kernel``, ...), kernels in Flax's
layout. The image-tower loader (:mod:`ccmr_jax.models.resnet`) and the
pretraining stage (:mod:`ccmr_jax.pretrain`) write and read this format.
Loading requires exactly the tree's keys and shapes and names every mismatch;
nothing is unpickled.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import flax
import numpy as np


def flatten_weights(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{"a/b/kernel": array}`` of a params tree."""
  return {"/".join(path): np.asarray(value) for path, value in flax.traverse_util.flatten_dict(dict(tree)).items()}


def save_weights(path: str, params: Mapping[str, Any]) -> None:
  """Writes a params tree as the documented ``.npz`` (written aside, then renamed)."""
  folder = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as f:
    np.savez(f, **flatten_weights(params))
  os.replace(f.name, path)


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
      found = {key: archive[key] for key in archive.files}
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
