"""ScaNN searchers over gallery embeddings: build, save, load, search.

The index stage never trains: it takes gallery embeddings (made by whichever
snapshot the indexing policy names) and writes one searcher per gallery under
the workdir. Scores are inner products of unit vectors (cosine similarity).

``mode="exact"`` is ScaNN's brute-force scorer in float32: exact top-K. That
is what results report by default.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from scann.scann_ops.py import scann_ops_pybind

INDEX_MODES = ("exact",)


def build_searcher(embeddings: np.ndarray, num_neighbors: int, mode: str = "exact"):
  """A ScaNN searcher over ``embeddings [N, D]`` (float32 unit vectors)."""
  if mode not in INDEX_MODES:
    raise ValueError(f"unknown index mode {mode!r}; choose one of {list(INDEX_MODES)}")
  embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
  if embeddings.ndim != 2 or len(embeddings) == 0:
    raise ValueError(f"gallery embeddings must be a non-empty [N, D] array, got shape {embeddings.shape}")
  if not np.isfinite(embeddings).all():
    raise ValueError("gallery embeddings contain NaN or Inf")
  k = min(num_neighbors, len(embeddings))
  return scann_ops_pybind.builder(embeddings, k, "dot_product").score_brute_force().build()


def save_searcher(searcher, path: str) -> str:
  """Serializes ``searcher`` to the folder ``path`` (written aside, then renamed)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_index_", dir=parent)
  try:
    searcher.serialize(tmp, relative_path=True)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return path


def load_searcher(path: str):
  """Loads a searcher written by :func:`save_searcher`.

  ScaNN unpickles ``scann_docids.pkl`` when a folder has one; this project
  never writes it, so a folder that holds one is refused rather than read
  (unpickling a crafted file would run its code).
  """
  if not os.path.isfile(os.path.join(path, "scann_assets.pbtxt")):
    raise FileNotFoundError(f"no ScaNN index at {path}")
  if os.path.exists(os.path.join(path, "scann_docids.pkl")):
    raise ValueError(f"{path} holds scann_docids.pkl, which this project never writes; "
                     "refusing to unpickle it. Delete the folder to rebuild the index.")
  try:
    return scann_ops_pybind.load_searcher(path)
  except (RuntimeError, ValueError) as e:
    raise ValueError(f"ScaNN index at {path} is unreadable ({e}); delete the folder to rebuild it") from e


def search(searcher, queries: np.ndarray, num_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-``num_neighbors`` gallery rows and scores for each query, best first."""
  queries = np.ascontiguousarray(queries, dtype=np.float32)
  rows, scores = searcher.search_batched(queries, final_num_neighbors=num_neighbors)
  return np.asarray(rows, np.int64), np.asarray(scores, np.float32)
