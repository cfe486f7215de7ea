"""Evaluation: which snapshot embeds which gallery, queries, recall@K, matrices.

Indexing policies (DESIGN.md): after training task ``t``, the gallery of a
seen task ``k <= t`` is embedded by

  * ``reindex``:    the latest snapshot ``S_t`` (every gallery re-embedded);
  * ``no_reindex``: the snapshot ``S_k`` of its own task (embedded once, kept).

Queries always use ``S_t``. A gallery index is therefore identified by the
pair (snapshot, task) and built once; at ``t = k`` both policies use the same
index, so their results on the newest task are identical by construction.

Scopes: *task-aware* search looks only in the query's own task's gallery;
*task-agnostic* search looks in the union of every seen task's gallery (each
part embedded by the snapshot its policy names), as a deployed system would.

Ground truth. Captions are compared by normalised text: for image→text (i2t)
a retrieved caption is correct if its text equals the text of one of the
query image's own captions; for text→image (t2i) a retrieved image is correct
if one of its captions has the query's text. So identical captions of
different images count as correct for each other, and ties between identical
gallery vectors cannot change the result.

``Recall@K`` is the percentage of queries with at least one correct item in
the top ``K``; ``rsum`` is the sum of R@1, R@5, R@10 in both directions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ccmr_jax import index, sharding
from ccmr_jax.data.batches import caption_text_ids
from ccmr_jax.data.examples import Examples

POLICIES = ("reindex", "no_reindex")
SCOPES = ("task_aware", "task_agnostic")
DIRECTIONS = ("i2t", "t2i")
HEADLINE = "mean_r1"
ANN_AGREEMENT = "ann_agreement"


def metric_names(ks: Sequence[int]) -> list[str]:
  return [f"{d}_r{k}" for d in DIRECTIONS for k in ks] + ["rsum", HEADLINE]


def snapshot_for_gallery(policy: str, gallery_task: int, current_task: int) -> int:
  """The snapshot whose encoders embed task ``gallery_task``'s gallery after task ``current_task``."""
  if gallery_task > current_task:
    raise ValueError(f"task {gallery_task} is not seen yet after task {current_task}")
  if policy == "reindex":
    return current_task
  if policy == "no_reindex":
    return gallery_task
  raise ValueError(f"unknown indexing policy {policy!r}; choose from {list(POLICIES)}")


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """Which (image, caption text) pairs are matches, for one gallery of images and captions."""

  caption_image: np.ndarray  # int64 [C]
  text_ids: np.ndarray  # int32 [C]
  pair_keys: np.ndarray  # sorted unique int64: image_row * num_texts + text_id

  @classmethod
  def from_links(cls, caption_image: np.ndarray, text_ids: np.ndarray) -> "GroundTruth":
    """From each caption's image row and its text id (equal ids = identical normalised texts)."""
    text_ids = np.asarray(text_ids, np.int32)
    num_texts = int(text_ids.max()) + 1 if len(text_ids) else 1
    keys = np.unique(np.asarray(caption_image, np.int64) * num_texts + text_ids)
    return cls(np.asarray(caption_image, np.int64), text_ids, keys)

  @classmethod
  def from_captions(cls, captions, caption_image: np.ndarray) -> "GroundTruth":
    return cls.from_links(caption_image, caption_text_ids(captions))

  @classmethod
  def from_examples(cls, examples: Examples) -> "GroundTruth":
    return cls.from_captions(examples.captions, examples.caption_image)

  @property
  def num_texts(self) -> int:
    return int(self.text_ids.max()) + 1 if len(self.text_ids) else 1

  def i2t_hits(self, caption_rows: np.ndarray, image_rows: np.ndarray | None = None) -> np.ndarray:
    """``bool [Q, K]``: retrieved caption rows of image queries (default: every image, in order)."""
    if image_rows is None:
      image_rows = np.arange(len(caption_rows))
    return np.isin(np.asarray(image_rows)[:, None] * self.num_texts + self.text_ids[caption_rows], self.pair_keys)

  def t2i_hits(self, image_rows: np.ndarray, caption_rows: np.ndarray | None = None) -> np.ndarray:
    """``bool [Q, K]``: retrieved image rows of caption queries (default: every caption, in order)."""
    if caption_rows is None:
      caption_rows = np.arange(len(image_rows))
    return np.isin(image_rows * self.num_texts + self.text_ids[caption_rows][:, None], self.pair_keys)


def recall_at_k(hits: np.ndarray, k: int) -> float:
  """Percentage of queries (rows) with a hit among their first ``k`` results."""
  return float(100.0 * hits[:, :k].any(axis=1).mean())


def retrieval_metrics(i2t_rows: np.ndarray, t2i_rows: np.ndarray, truth: GroundTruth, ks: Sequence[int],
                      image_queries: np.ndarray | None = None,
                      caption_queries: np.ndarray | None = None) -> dict[str, float]:
  """R@K both ways, rsum and the headline ``mean_r1`` (mean of the two R@1).

  ``image_queries`` / ``caption_queries`` are the gallery rows of the queries
  themselves when they are a part of ``truth``'s gallery (task-agnostic search
  over a union gallery); by default every image and every caption is a query.
  """
  hits = {"i2t": truth.i2t_hits(i2t_rows, image_queries), "t2i": truth.t2i_hits(t2i_rows, caption_queries)}
  out = {f"{d}_r{k}": recall_at_k(hits[d], k) for d in DIRECTIONS for k in ks}
  out["rsum"] = sum(out[f"{d}_r{k}"] for d in DIRECTIONS for k in (1, 5, 10) if f"{d}_r{k}" in out)
  out[HEADLINE] = 0.5 * (out["i2t_r1"] + out["t2i_r1"])
  return out


def make_embedder(model, mesh: Mesh, batch_size: int) -> tuple[Callable, Callable]:
  """Jitted, data-parallel ``embed_images(params, images)`` and ``embed_texts(params, tokens)``.

  Inputs are cut into batches of ``batch_size`` (the last one padded with
  zeros, so one compiled program serves every call); returns host
  ``float32 [N, D]``. Each process reads only its share of each batch, one
  batch at a time, so file-backed images
  (:class:`~ccmr_jax.data.images.CachedImages`) are never read whole.
  """
  sharding.check_divisible(batch_size, mesh, "eval.batch_size")
  replicated, split = sharding.replicated(mesh), sharding.batch_sharded(mesh)

  def embedder(method):
    fn = jax.jit(lambda params, x: model.apply(params, x, method=method),
                 in_shardings=(replicated, split), out_shardings=split)

    def embed(params, inputs: np.ndarray) -> np.ndarray:
      n = len(inputs)
      padded = -(-n // batch_size) * batch_size
      share = batch_size // jax.process_count()
      lo = jax.process_index() * share
      outs = []
      for start in range(0, padded, batch_size):
        local = np.zeros((share, *inputs.shape[1:]), inputs.dtype)
        rows = np.asarray(inputs[min(start + lo, n):min(start + lo + share, n)])
        local[:len(rows)] = rows
        out = fn(params, jax.make_array_from_process_local_data(split, local))
        outs.append(out)
      gathered = [np.asarray(multihost_utils.process_allgather(o, tiled=True)) for o in outs]
      return np.concatenate(gathered)[:n]

    return embed

  return embedder(model.encode_image), embedder(model.encode_text)


def _search_both_ways(image_queries, caption_queries, image_searcher, caption_searcher, k: int,
                      image_gallery=None, caption_gallery=None) -> tuple[np.ndarray, np.ndarray, float | None]:
  """i2t and t2i top-k rows; with an approximate index, also its agreement with exact search."""
  i2t_rows, _ = index.search(caption_searcher, image_queries, k)
  t2i_rows, _ = index.search(image_searcher, caption_queries, k)
  agreements = []
  for searcher, rows, gallery, queries in ((caption_searcher, i2t_rows, caption_gallery, image_queries),
                                           (image_searcher, t2i_rows, image_gallery, caption_queries)):
    if searcher.mode == "approximate":
      if gallery is None:
        raise ValueError("an approximate index needs its gallery embeddings to measure agreement with exact search")
      agreements.append(index.agreement(rows, index.exact_top_k(gallery, queries, rows.shape[1])))
  return i2t_rows, t2i_rows, (float(np.mean(agreements)) if agreements else None)


def query_gallery(image_queries: np.ndarray, caption_queries: np.ndarray, image_searcher, caption_searcher,
                  truth: GroundTruth, ks: Sequence[int], image_gallery=None, caption_gallery=None) -> dict[str, float]:
  """Task-aware search: one task's queries against that task's own gallery.

  With an approximate index the metrics also hold ``ann_agreement``: the
  recall of its top-K against exact search (the gallery embeddings are needed).
  """
  i2t_rows, t2i_rows, agreement = _search_both_ways(image_queries, caption_queries, image_searcher,
                                                    caption_searcher, max(ks), image_gallery, caption_gallery)
  metrics = retrieval_metrics(i2t_rows, t2i_rows, truth, ks)
  if agreement is not None:
    metrics[ANN_AGREEMENT] = agreement
  return metrics


@dataclasses.dataclass(frozen=True)
class UnionGallery:
  """The gallery of every seen task in one index: task-agnostic search.

  Rows of task ``k`` follow those of tasks ``0..k-1``; ``image_task`` and
  ``caption_task`` give each row's task.
  """

  truth: GroundTruth
  image_task: np.ndarray
  caption_task: np.ndarray

  @classmethod
  def from_tasks(cls, tests: Sequence[Examples]) -> "UnionGallery":
    offsets = np.cumsum([0] + [len(e) for e in tests[:-1]])
    captions = [c for e in tests for c in e.captions]
    caption_image = np.concatenate([e.caption_image + o for e, o in zip(tests, offsets)])
    return cls(GroundTruth.from_captions(captions, caption_image),
               np.concatenate([np.full(len(e), k) for k, e in enumerate(tests)]),
               np.concatenate([np.full(e.num_captions, k) for k, e in enumerate(tests)]))

  def query(self, task: int, image_queries: np.ndarray, caption_queries: np.ndarray, image_searcher,
            caption_searcher, ks: Sequence[int], image_gallery=None,
            caption_gallery=None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Task ``task``'s queries against the union; returns metrics and the retrieved rows."""
    i2t_rows, t2i_rows, agreement = _search_both_ways(image_queries, caption_queries, image_searcher,
                                                      caption_searcher, max(ks), image_gallery, caption_gallery)
    metrics = retrieval_metrics(i2t_rows, t2i_rows, self.truth, ks,
                                image_queries=np.flatnonzero(self.image_task == task),
                                caption_queries=np.flatnonzero(self.caption_task == task))
    if agreement is not None:
      metrics[ANN_AGREEMENT] = agreement
    return metrics, {"i2t": i2t_rows, "t2i": t2i_rows}


def continual_summary(matrix: np.ndarray) -> dict:
  """Final average, forgetting and BWT of a ``[t+1, t+1]`` matrix ``R[t, k]`` (NaN above the diagonal).

  With ``T`` rows (tasks trained so far):
    final_average = mean_k R[T-1, k]
    forgetting    = mean_{k < T-1} ( max_{k <= t < T-1} R[t, k]  -  R[T-1, k] )
                    (Chaudhry et al. 2018: best earlier value minus final value)
    bwt           = mean_{k < T-1} ( R[T-1, k] - R[k, k] )
                    (Lopez-Paz & Ranzato 2017: final minus just-learned)
  Forgetting and BWT are ``None`` while only one task has been trained.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  last = len(matrix) - 1
  final = matrix[last, : last + 1]
  out = {"final_average": float(np.mean(final)), "forgetting": None, "bwt": None, "per_task_forgetting": []}
  if last >= 1:
    per_task = [float(np.max(matrix[k:last, k]) - matrix[last, k]) for k in range(last)]
    out["per_task_forgetting"] = per_task
    out["forgetting"] = float(np.mean(per_task))
    out["bwt"] = float(np.mean([matrix[last, k] - matrix[k, k] for k in range(last)]))
  return out
