"""Whole-or-absent file writes: write beside the target, then rename.

A reader never sees a half-written file: either the old content (or nothing)
or the complete new one. Arrays are stored as ``.npz`` without pickled
objects, and read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np


def atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str):
  with open(path, "r", encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); delete it to recompute it") from e


def atomic_save_npz(path: str, **arrays: np.ndarray) -> None:
  for name, value in arrays.items():
    if np.asarray(value).dtype == object:
      raise TypeError(f"array {name!r} has dtype object; only plain arrays are stored")
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  atomic_write_bytes(path, buffer.getvalue())


def load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def atomic_save_figure(figure, path: str, dpi: int = 110) -> None:
  """Saves a matplotlib figure as PNG: drawn to ``path + '.tmp.png'``, then renamed onto ``path``.

  Args:
    figure: a ``matplotlib.figure.Figure``.
    path: where the PNG goes; its folder is created if needed.
    dpi: resolution of the PNG.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  try:
    figure.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
