"""ScaNN searchers over gallery embeddings: build, save, load, search.

The index stage never trains: it takes gallery embeddings (made by whichever
snapshot the indexing policy names) and writes one searcher per gallery under
the workdir. Scores are inner products of unit vectors (cosine similarity).

Modes (``config.eval.index_mode``):

  * ``exact``: ScaNN's brute-force scorer in float32, the exact top-K. The
    default, and what results report unless told otherwise.
  * ``approximate``: partitioning (a spherical k-means tree with about
    ``sqrt(N)`` leaves, seeded by k-means++ so that a gallery always gets
    the same tree: ScaNN's random initialisation differs from build to
    build; centres are unit vectors, which suits inner products
    of unit vectors and doubled queries/s at equal recall in
    ``benchmarks/search.py``) + asymmetric hashing (anisotropic, 2 dimensions per 4-bit block)
    + exact reordering of the best candidates: ScaNN's recipe for large
    galleries. How many leaves are searched and how many candidates are
    reordered is tuned per gallery (:func:`tune`): the cheapest setting whose
    recall@K against exact search on sample queries clears
    ``eval.ann_recall_target``; the setting and the recall it reached are
    stored with the index and used by every search. Galleries under 1,000
    items, and any that no tried setting serves at the target, are searched
    exactly. Every approximate result is reported with its agreement with
    exact search (:func:`agreement`).
  * ``auto``: exact below ``ann_threshold`` gallery items, approximate above.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile

import numpy as np

from ccmr_jax import exact, files, manifest


def _import_scann_without_tensorflow():
  """ScaNN's pybind11 module (``scann_ops_pybind``), imported without TensorFlow.

  The ``scann`` package, on import, also loads ScaNN's TensorFlow ops
  whenever TensorFlow is installed (it is with the ``data`` extra). This
  project never uses those ops, and on a 2-core AMD EPYC they cost each
  process 2.3 s and 460 MiB of memory. While the package initialises,
  ``tensorflow`` is marked absent in ``sys.modules``, so ScaNN skips its
  ops. The mark is removed after, so a later ``import tensorflow``
  (TensorFlow Datasets) works as usual. Where TensorFlow is already
  imported, nothing is marked. This runs once, when this module is first
  imported; a thread importing TensorFlow at that very moment would be
  told it is absent.
  """
  blocked = "tensorflow" not in sys.modules
  if blocked:
    sys.modules["tensorflow"] = None
  try:
    from scann.scann_ops.py import scann_ops_pybind  # noqa: PLC0415
  finally:
    if blocked and sys.modules.get("tensorflow", False) is None:
      del sys.modules["tensorflow"]
  return scann_ops_pybind


scann_ops_pybind = _import_scann_without_tensorflow()

INDEX_MODES = ("exact", "approximate", "auto")
_INFO_FILE = "ccmr_index.json"
_MIN_APPROXIMATE_SIZE = 1000
_TUNING_QUERIES = 1000
DEFAULT_RECALL_TARGET = 0.95
# The time of reordering one candidate (a float32 dot product of the full
# vector, gathered from anywhere in the gallery) over that of AH-scoring one
# item of a searched leaf (4-bit codes, streamed): fitted by least squares
# on the one-thread query times of benchmarks/search.py, 600k x 256, 2-core
# AMD EPYC Zen 4 (AVX-512): 230 ns against 4.1 ns (45-66 in later runs;
# BENCHMARKS.md). It sets which setting is cheapest, never whether one meets
# the recall target.
REORDER_COST = 56.0


@dataclasses.dataclass
class Searcher:
  """A ScaNN searcher and how it was built."""

  scann: object
  mode: str  # "exact" or "approximate": what was built
  size: int
  settings: dict


def approximate_settings(size: int, num_neighbors: int) -> dict:
  """Tree + AH + reorder build settings for a gallery of ``size`` items, before tuning."""
  leaves = max(2, int(round(math.sqrt(size))))
  return {
      "num_leaves": leaves,
      "num_leaves_to_search": max(1, int(math.ceil(leaves * 0.05))),
      "training_sample_size": min(size, 250_000),
      "reorder": max(10 * num_neighbors, 100),
  }


def build_searcher(embeddings: np.ndarray, num_neighbors: int, mode: str = "exact",
                   ann_threshold: int = 100_000, recall_target: float = DEFAULT_RECALL_TARGET,
                   tuning_queries: np.ndarray | None = None) -> Searcher:
  """A searcher over ``embeddings [N, D]`` (float32 unit vectors).

  An approximate searcher is tuned to ``recall_target`` (see :func:`tune`)
  on ``tuning_queries [Q, D]`` (a sample of the queries it will answer), or,
  without them, on a sample of the gallery's own rows as queries, each with
  its own row left out of its results.
  Galleries of fewer than ``_MIN_APPROXIMATE_SIZE`` items, and those no
  tried setting serves at the target, are searched exactly; ``settings``
  says which and why.
  """
  if mode not in INDEX_MODES:
    raise ValueError(f"unknown index mode {mode!r}; choose one of {list(INDEX_MODES)}")
  if not 0.0 < recall_target <= 1.0:
    raise ValueError(f"the recall target must be in (0, 1], got {recall_target!r}")
  embeddings = _checked_vectors(embeddings, "gallery embeddings")
  size = len(embeddings)
  k = min(num_neighbors, size)
  if mode == "exact" or (mode == "auto" and size < ann_threshold):
    return _exact_searcher(embeddings, k, {})
  if size < _MIN_APPROXIMATE_SIZE:
    return _exact_searcher(embeddings, k, {"reason": f"fewer than {_MIN_APPROXIMATE_SIZE} items: exact search is "
                                                     "as cheap"})
  if tuning_queries is not None:
    tuning_queries = _checked_vectors(tuning_queries, "tuning queries")
  settings = approximate_settings(size, k)
  scann = (scann_ops_pybind.builder(embeddings, k, "dot_product")
           .tree(num_leaves=settings["num_leaves"], num_leaves_to_search=settings["num_leaves_to_search"],
                 training_sample_size=settings["training_sample_size"], spherical=True,
                 random_init=False)  # k-means++ centres: the same tree every build (random init is not)
           .score_ah(2, anisotropic_quantization_threshold=0.2)
           .reorder(settings["reorder"]).build())
  searcher = Searcher(scann, "approximate", size, settings)
  tuned = tune(searcher, embeddings, tuning_queries, k, recall_target)
  if tuned is None:
    return _exact_searcher(embeddings, k, {"reason": f"no tried setting reached recall@{k} {recall_target} against "
                                                     "exact search", "recall_target": recall_target})
  searcher.settings = {**settings, **tuned}
  return searcher


def _exact_searcher(embeddings: np.ndarray, k: int, settings: dict) -> Searcher:
  return Searcher(scann_ops_pybind.builder(embeddings, k, "dot_product").score_brute_force().build(), "exact",
                  len(embeddings), settings)


def _checked_vectors(vectors: np.ndarray, what: str) -> np.ndarray:
  vectors = np.ascontiguousarray(vectors, dtype=np.float32)
  if vectors.ndim != 2 or len(vectors) == 0:
    raise ValueError(f"{what} must be a non-empty [N, D] array, got shape {vectors.shape}")
  if not np.isfinite(vectors).all():
    raise ValueError(f"{what} contain NaN or Inf")
  return vectors


def candidate_settings(size: int, num_leaves: int, num_neighbors: int) -> list[dict]:
  """The query-time settings :func:`tune` tries, cheapest first within each ``reorder``.

  Leaves searched: ``num_leaves · 2^(-i/4)`` for ``i = 0..32`` (at least 1);
  candidates reordered: ``num_neighbors · {2, 5, 10, 20, 50}`` (at least
  ``num_neighbors``, at most ``size``).
  """
  leaves = sorted({max(1, int(round(num_leaves * 2 ** (-i / 4)))) for i in range(33)})
  reorders = sorted({min(size, max(num_neighbors, num_neighbors * m)) for m in (2, 5, 10, 20, 50)})
  return [{"leaves_to_search": n, "pre_reorder_num_neighbors": r} for r in reorders for n in leaves]


def query_cost(setting: dict, size: int, num_leaves: int) -> float:
  """Work per query, in AH-scored items: ``leaves/L · N + REORDER_COST · reorder``.

  The partition scoring (``L`` centres) is the same for every setting of
  one index and is left out.
  """
  return setting["leaves_to_search"] / num_leaves * size + REORDER_COST * setting["pre_reorder_num_neighbors"]


def recall_lower_bound(approximate_rows: np.ndarray, exact_rows: np.ndarray) -> tuple[float, float]:
  """``(mean, mean - 2·s.e.)`` of the per-query recall ``|A ∩ E| / K``."""
  per_query = _per_query_recall(approximate_rows, exact_rows)
  mean = float(per_query.mean())
  return mean, mean - 2.0 * float(per_query.std(ddof=1) if len(per_query) > 1 else 1.0) / math.sqrt(len(per_query))


def tune(searcher: Searcher, gallery: np.ndarray, queries: np.ndarray | None, k: int,
         recall_target: float) -> dict | None:
  """The cheapest :func:`candidate_settings` entry whose recall@k clears ``recall_target``.

  Recall is measured against :func:`ccmr_jax.exact.top_k` on up to
  ``_TUNING_QUERIES`` queries (a seeded sample of ``queries``, or of the
  gallery's rows when ``queries`` is None, their own rows excluded). A
  setting clears the target when its per-query recall, less two standard
  errors, is at least the target; cost is :func:`query_cost`. Returns the
  setting with the recall it reached, or None if none clears it.
  """
  own_rows = queries is None
  rng = np.random.default_rng(0)
  pool = len(gallery) if own_rows else len(queries)
  picked = np.sort(rng.choice(pool, min(pool, _TUNING_QUERIES), replace=False))
  sample = gallery[picked] if own_rows else queries[picked]
  truth = _exact_rows(gallery, sample, picked if own_rows else None, k)
  best = None
  for setting in candidate_settings(searcher.size, searcher.settings["num_leaves"], k):
    cost = query_cost(setting, searcher.size, searcher.settings["num_leaves"])
    if best is not None and cost >= best[0]:
      continue
    rows = _search_rows(searcher.scann, sample, picked if own_rows else None, k, setting)
    mean, bound = recall_lower_bound(rows, truth)
    if bound >= recall_target:
      best = (cost, {**setting, "recall_target": recall_target, "tuning_recall": mean,
                     "tuning_recall_lower_bound": bound, "tuning_queries": len(sample),
                     "tuned_on": "gallery rows" if own_rows else "queries"})
  return None if best is None else best[1]


def _exact_rows(gallery: np.ndarray, sample: np.ndarray, own: np.ndarray | None, k: int) -> np.ndarray:
  if own is None:
    return exact.top_k(gallery, sample, k)
  rows = exact.top_k(gallery, sample, k + 1)
  return _drop_own(rows, own, k)


def _search_rows(scann, sample: np.ndarray, own: np.ndarray | None, k: int, setting: dict) -> np.ndarray:
  wanted = k if own is None else k + 1
  rows, _ = scann.search_batched(sample, final_num_neighbors=wanted, **_query_overrides(setting, wanted))
  rows = np.asarray(rows, np.int64)
  return rows if own is None else _drop_own(rows, own, k)


def _drop_own(rows: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
  """The first ``k`` of each row without the query's own gallery row (stable order)."""
  order = np.argsort(rows == own[:, None], axis=1, kind="stable")
  return np.take_along_axis(rows, order, axis=1)[:, :k]


def _query_overrides(settings: dict, num_neighbors: int) -> dict:
  """ScaNN's query-time arguments for a tuned ``settings`` (none for an untuned or exact one)."""
  if "leaves_to_search" not in settings:
    return {}
  return {"leaves_to_search": settings["leaves_to_search"],
          "pre_reorder_num_neighbors": max(num_neighbors, settings["pre_reorder_num_neighbors"])}


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
  k = min(num_neighbors, searcher.size)
  rows, scores = searcher.scann.search_batched(queries, final_num_neighbors=k,
                                               **_query_overrides(searcher.settings, k))
  return np.asarray(rows, np.int64), np.asarray(scores, np.float32)


def agreement(approximate_rows: np.ndarray, exact_rows: np.ndarray) -> float:
  """Recall of the approximate top-K against the exact top-K: mean |A ∩ E| / K, over the same queries."""
  if len(approximate_rows) != len(exact_rows):
    raise ValueError(f"agreement needs one row per query in both: got {len(approximate_rows)} approximate "
                     f"and {len(exact_rows)} exact rows")
  return float(_per_query_recall(approximate_rows, exact_rows).mean()) if len(exact_rows) else 1.0


def _per_query_recall(approximate_rows: np.ndarray, exact_rows: np.ndarray) -> np.ndarray:
  """``|A_q ∩ E_q| / K`` for each query ``q``, ``K`` the width of ``exact_rows``."""
  k = exact_rows.shape[1]
  return np.array([len(np.intersect1d(a[:k], e)) / k for a, e in zip(approximate_rows, exact_rows)])
