"""ScaNN searchers over gallery embeddings: build, save, load, search.

The index stage never trains: it takes gallery embeddings (made by whichever
snapshot the indexing policy names) and writes one searcher per gallery under
the workdir. Scores are inner products of unit vectors (cosine similarity).

Modes (``config.eval.index_mode``):

  * ``exact``: ScaNN's brute-force scorer in float32, the exact top-K. The
    default, and what results report unless told otherwise.
  * ``approximate``: partitioning (a spherical k-means tree with about
    ``sqrt(N)`` leaves: centres are unit vectors, which suits inner products
    of unit vectors and doubled queries/s at equal recall in
    ``benchmarks/search.py``) + asymmetric hashing (anisotropic, 2 dimensions per 4-bit block)
    + exact reordering of the best candidates: ScaNN's recipe for large
    galleries. Every approximate result is reported with its agreement with
    exact search (:func:`agreement`).
  * ``auto``: exact below ``ann_threshold`` gallery items, approximate above.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

import numpy as np
from scann.scann_ops.py import scann_ops_pybind

from ccmr_jax import files, manifest

INDEX_MODES = ("exact", "approximate", "auto")
_INFO_FILE = "ccmr_index.json"
_MIN_APPROXIMATE_SIZE = 1000


@dataclasses.dataclass
class Searcher:
  """A ScaNN searcher and how it was built."""

  scann: object
  mode: str  # "exact" or "approximate": what was built
  size: int
  settings: dict


def approximate_settings(size: int, num_neighbors: int) -> dict:
  """Tree + AH + reorder settings for a gallery of ``size`` items."""
  leaves = max(2, int(round(math.sqrt(size))))
  return {
      "num_leaves": leaves,
      "num_leaves_to_search": max(1, int(math.ceil(leaves * 0.05))),
      "training_sample_size": min(size, 250_000),
      "reorder": max(10 * num_neighbors, 100),
  }


def build_searcher(embeddings: np.ndarray, num_neighbors: int, mode: str = "exact",
                   ann_threshold: int = 100_000) -> Searcher:
  """A searcher over ``embeddings [N, D]`` (float32 unit vectors)."""
  if mode not in INDEX_MODES:
    raise ValueError(f"unknown index mode {mode!r}; choose one of {list(INDEX_MODES)}")
  embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
  if embeddings.ndim != 2 or len(embeddings) == 0:
    raise ValueError(f"gallery embeddings must be a non-empty [N, D] array, got shape {embeddings.shape}")
  if not np.isfinite(embeddings).all():
    raise ValueError("gallery embeddings contain NaN or Inf")
  size = len(embeddings)
  k = min(num_neighbors, size)
  built = "exact" if mode == "exact" or (mode == "auto" and size < ann_threshold) else "approximate"
  builder = scann_ops_pybind.builder(embeddings, k, "dot_product")
  if built == "exact":
    return Searcher(builder.score_brute_force().build(), "exact", size, {})
  if size < _MIN_APPROXIMATE_SIZE:
    raise ValueError(f"approximate search needs at least {_MIN_APPROXIMATE_SIZE} gallery items, got {size}; "
                     "use eval.index_mode='exact' or 'auto'")
  settings = approximate_settings(size, k)
  scann = (builder.tree(num_leaves=settings["num_leaves"], num_leaves_to_search=settings["num_leaves_to_search"],
                        training_sample_size=settings["training_sample_size"], spherical=True)
           .score_ah(2, anisotropic_quantization_threshold=0.2)
           .reorder(settings["reorder"]).build())
  return Searcher(scann, "approximate", size, settings)


def save_searcher(searcher: Searcher, path: str) -> str:
  """Serializes ``searcher`` to the folder ``path`` (local or cloud), whole or absent."""
  with tempfile.TemporaryDirectory(prefix="ccmr_index_") as local:
    searcher.scann.serialize(local, relative_path=True)
    with open(os.path.join(local, _INFO_FILE), "w", encoding="utf-8") as f:
      json.dump({"mode": searcher.mode, "size": searcher.size, "settings": searcher.settings}, f)
    manifest.seal_folder(local)
    files.upload_folder(local, path, last=manifest.FOLDER_MANIFEST)
  return path


def load_searcher(path: str) -> Searcher:
  """Loads a searcher written by :func:`save_searcher`.

  ScaNN unpickles ``scann_docids.pkl`` when a folder has one; this project
  never writes it, so a folder that holds one is refused rather than read
  (unpickling a crafted file would run its code). Every file is checked
  against the folder's manifest before ScaNN reads it.

  Raises:
    FileNotFoundError: there is no index at ``path``.
    files.CorruptFileError: the folder is damaged (see :mod:`ccmr_jax.manifest`) or unreadable.
  """
  info_path = os.path.join(path, _INFO_FILE)
  if not files.is_dir(path):
    raise FileNotFoundError(f"no ScaNN index at {path}")
  if files.exists(os.path.join(path, "scann_docids.pkl")):
    raise files.CorruptFileError(f"{path} holds scann_docids.pkl, which this project never writes; "
                     "refusing to unpickle it. Delete the folder to rebuild the index.")
  manifest.check_folder(path)
  try:
    info = files.read_json(info_path)
    if files.is_remote(path):
      with tempfile.TemporaryDirectory(prefix="ccmr_index_") as local:
        files.download_folder(path, local)
        scann = scann_ops_pybind.load_searcher(local)
    else:
      scann = scann_ops_pybind.load_searcher(path)
    return Searcher(scann, info["mode"], int(info["size"]), info["settings"])
  except (RuntimeError, ValueError, KeyError) as e:
    raise files.CorruptFileError(f"ScaNN index at {path} is unreadable ({e}); delete the folder to rebuild it") from e


def search(searcher: Searcher, queries: np.ndarray, num_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-``num_neighbors`` gallery rows and scores for each query, best first."""
  queries = np.ascontiguousarray(queries, dtype=np.float32)
  rows, scores = searcher.scann.search_batched(queries, final_num_neighbors=min(num_neighbors, searcher.size))
  return np.asarray(rows, np.int64), np.asarray(scores, np.float32)


def agreement(approximate_rows: np.ndarray, exact_rows: np.ndarray) -> float:
  """Recall of the approximate top-K against the exact top-K: mean |A ∩ E| / K, over the same queries."""
  if len(approximate_rows) != len(exact_rows):
    raise ValueError(f"agreement needs one row per query in both: got {len(approximate_rows)} approximate "
                     f"and {len(exact_rows)} exact rows")
  k = exact_rows.shape[1]
  hits = [len(np.intersect1d(a[:k], e)) for a, e in zip(approximate_rows, exact_rows)]
  return float(np.mean(hits) / k) if hits else 1.0
