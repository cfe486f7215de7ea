"""Retrieval metrics, numpy only: ground truth, recall@K, union galleries, the continual summary.

Every module that reads or writes recall numbers (evaluation, analysis,
report, compare) takes its names from here: the scopes, the directions, the
headline metric.

Ground truth. Captions are compared by normalised text: for image→text (i2t)
a retrieved caption is correct if its text equals the text of one of the
query image's own captions; for text→image (t2i) a retrieved image is correct
if one of its captions has the query's text. So identical captions of
different images count as correct for each other, and ties between identical
gallery vectors cannot change the result.

``Recall@K`` is the percentage of queries with at least one correct item in
the top ``K``; ``rsum`` is the sum of R@1, R@5, R@10 in both directions.

Scopes: *task-aware* search looks only in the query's own task's gallery;
*task-agnostic* search looks in the union of every seen task's gallery (each
part embedded by the snapshot its indexing policy names), as a deployed
system would.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ccmr_jax.data.examples import Examples, caption_text_ids

# Scope → the key of results.json that holds {policy: {metric: summary}} for it.
SCOPES = {"task_aware": "policies", "task_agnostic": "policies_agnostic"}
DIRECTIONS = ("i2t", "t2i")
HEADLINE = "mean_r1"
ANN_AGREEMENT = "ann_agreement"


def metric_names(ks: Sequence[int]) -> list[str]:
  """``i2t_r1 … t2i_r10, rsum, mean_r1`` for the recall cut-offs ``ks``."""
  return [f"{d}_r{k}" for d in DIRECTIONS for k in ks] + ["rsum", HEADLINE]


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

  def metrics(self, task: int, i2t_rows: np.ndarray, t2i_rows: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall of task ``task``'s queries from the union rows they retrieved (i2t: caption rows; t2i: image rows)."""
    return retrieval_metrics(i2t_rows, t2i_rows, self.truth, ks,
                             image_queries=np.flatnonzero(self.image_task == task),
                             caption_queries=np.flatnonzero(self.caption_task == task))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
  """``float32 [N, D]`` rows divided by their L2 norms (zero rows stay zero)."""
  vectors = np.asarray(vectors, np.float32)
  if vectors.ndim != 2:
    raise ValueError(f"expected a [N, D] array of vectors, got shape {vectors.shape}")
  return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


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
