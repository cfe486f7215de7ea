"""Evaluation: which snapshot embeds which gallery, queries, recall@K, matrices.

Indexing policies (DESIGN.md): after training task ``t``, the gallery of a
seen task ``k <= t`` is embedded by

  * ``reindex``:    the latest snapshot ``S_t`` (every gallery re-embedded);
  * ``no_reindex``: the snapshot ``S_k`` of its own task (embedded once, kept).

Queries always use ``S_t``. A gallery index is therefore identified by the
pair (snapshot, task) and built once; at ``t = k`` both policies use the same
index, so their results on the newest task are identical by construction.

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
DIRECTIONS = ("i2t", "t2i")
HEADLINE = "mean_r1"


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
  """Which (image, caption text) pairs are matches, for one test split."""

  caption_image: np.ndarray  # int64 [C]
  text_ids: np.ndarray  # int32 [C]
  pair_keys: np.ndarray  # sorted unique int64: image_row * num_texts + text_id

  @classmethod
  def from_examples(cls, examples: Examples) -> "GroundTruth":
    text_ids = caption_text_ids(examples.captions)
    num_texts = int(text_ids.max()) + 1 if len(text_ids) else 1
    keys = np.unique(examples.caption_image * num_texts + text_ids)
    return cls(examples.caption_image, text_ids, keys)

  @property
  def num_texts(self) -> int:
    return int(self.text_ids.max()) + 1 if len(self.text_ids) else 1

  def i2t_hits(self, caption_rows: np.ndarray) -> np.ndarray:
    """``bool [num_images, K]`` for retrieved caption rows of each image query."""
    image_rows = np.arange(len(caption_rows))[:, None]
    return np.isin(image_rows * self.num_texts + self.text_ids[caption_rows], self.pair_keys)

  def t2i_hits(self, image_rows: np.ndarray) -> np.ndarray:
    """``bool [num_captions, K]`` for retrieved image rows of each caption query."""
    return np.isin(image_rows * self.num_texts + self.text_ids[:, None], self.pair_keys)


def recall_at_k(hits: np.ndarray, k: int) -> float:
  """Percentage of queries (rows) with a hit among their first ``k`` results."""
  return float(100.0 * hits[:, :k].any(axis=1).mean())


def retrieval_metrics(i2t_rows: np.ndarray, t2i_rows: np.ndarray, truth: GroundTruth,
                      ks: Sequence[int]) -> dict[str, float]:
  """R@K both ways, rsum and the headline ``mean_r1`` (mean of the two R@1)."""
  hits = {"i2t": truth.i2t_hits(i2t_rows), "t2i": truth.t2i_hits(t2i_rows)}
  out = {f"{d}_r{k}": recall_at_k(hits[d], k) for d in DIRECTIONS for k in ks}
  out["rsum"] = sum(out[f"{d}_r{k}"] for d in DIRECTIONS for k in (1, 5, 10) if f"{d}_r{k}" in out)
  out[HEADLINE] = 0.5 * (out["i2t_r1"] + out["t2i_r1"])
  return out


def make_embedder(model, mesh: Mesh, batch_size: int) -> tuple[Callable, Callable]:
  """Jitted, data-parallel ``embed_images(params, images)`` and ``embed_texts(params, tokens)``.

  Inputs are cut into batches of ``batch_size`` (the last one padded, so one
  compiled program serves every call); returns host ``float32 [N, D]``.
  """
  sharding.check_divisible(batch_size, mesh, "eval.batch_size")
  replicated, split = sharding.replicated(mesh), sharding.batch_sharded(mesh)

  def embedder(method):
    fn = jax.jit(lambda params, x: model.apply(params, x, method=method),
                 in_shardings=(replicated, split), out_shardings=split)

    def embed(params, inputs: np.ndarray) -> np.ndarray:
      n = len(inputs)
      padded = -(-n // batch_size) * batch_size
      inputs = np.concatenate([inputs, np.zeros((padded - n, *inputs.shape[1:]), inputs.dtype)])
      share = batch_size // jax.process_count()
      lo = jax.process_index() * share
      outs = []
      for start in range(0, padded, batch_size):
        local = inputs[start + lo:start + lo + share]
        out = fn(params, jax.make_array_from_process_local_data(split, local))
        outs.append(out)
      gathered = [np.asarray(multihost_utils.process_allgather(o, tiled=True)) for o in outs]
      return np.concatenate(gathered)[:n]

    return embed

  return embedder(model.encode_image), embedder(model.encode_text)


def query_gallery(image_queries: np.ndarray, caption_queries: np.ndarray, image_searcher, caption_searcher,
                  truth: GroundTruth, ks: Sequence[int]) -> dict[str, float]:
  """Searches the two indexes of one gallery with the current encoders' queries."""
  k = max(ks)
  i2t_rows, _ = index.search(caption_searcher, image_queries, min(k, len(caption_queries)))
  t2i_rows, _ = index.search(image_searcher, caption_queries, min(k, len(image_queries)))
  return retrieval_metrics(i2t_rows, t2i_rows, truth, ks)


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
