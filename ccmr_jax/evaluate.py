"""Evaluation after a task: embed with the current snapshot, index, query every indexing policy.

After training task ``t``, :func:`evaluate_after_task`

  1. embeds the evaluation split of every seen task ``k <= t`` with ``S_t``
     (these are the queries, and the galleries of ``S_t``), and exports them
     to ``embeddings/snapshot_TT/task_KK.npz`` (task ``t``'s items, once, to
     ``galleries/task_TT.json``);
  2. builds and saves the ScaNN index of each of those galleries
     (``index/snapshot_TT/task_KK/{images,captions}``);
  3. for each policy of :data:`ccmr_jax.policies.POLICIES` and each ``k``,
     searches the gallery the policy names (stored by an earlier snapshot,
     or just embedded) with task ``k``'s queries as the policy prepares them:
     task-aware in ``k``'s own index, task-agnostic in the union of the
     galleries of tasks ``0..t`` (``index/union/POLICY/after_task_TT``).

Metrics and the policies' rules are numpy (:mod:`ccmr_jax.metrics`,
:mod:`ccmr_jax.policies`); this module holds the jax side.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ccmr_jax import exact, files, index, manifest, metrics, sharding
from ccmr_jax import workdir as layout
from ccmr_jax.data.examples import Examples, caption_text_ids
from ccmr_jax.data.tokenizer import Tokenizer
from ccmr_jax.policies import POLICIES, EmbeddedSplit, IndexingPolicy


class Embedders(NamedTuple):
  """Jitted, data-parallel ``(params, inputs) -> float32 [N, D]`` host arrays, one per modality."""

  images: Callable[..., np.ndarray]
  texts: Callable[..., np.ndarray]

  def embed(self, params, split: Examples, tokenizer: Tokenizer) -> EmbeddedSplit:
    """``split``'s images and captions embedded by ``params``."""
    return EmbeddedSplit(self.images(params, split.images), self.texts(params, tokenizer.encode(split.captions)))


def make_embedders(model, mesh: Mesh, batch_size: int) -> Embedders:
  """Jitted, data-parallel image and text embedders of ``model``.

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
        outs.append(fn(params, jax.make_array_from_process_local_data(split, local)))
      gathered = [np.asarray(multihost_utils.process_allgather(o, tiled=True)) for o in outs]
      return np.concatenate(gathered)[:n]

    return embed

  return Embedders(embedder(model.encode_image), embedder(model.encode_text))


class Searchers(NamedTuple):
  """The ScaNN indexes of one gallery: ``images`` answers t2i queries, ``captions`` i2t ones."""

  images: index.Searcher
  captions: index.Searcher


def build_searchers(gallery: EmbeddedSplit, queries: EmbeddedSplit, config: ml_collections.ConfigDict) -> Searchers:
  """The two indexes of ``gallery``; approximate ones are tuned on the ``queries`` that will search them.

  The images index answers caption queries and the captions index image
  queries, so each is tuned (:func:`ccmr_jax.index.tune`) on the other
  modality of ``queries`` to ``eval.ann_recall_target``.
  """
  built = []
  for embeddings, tuning in zip(gallery, (queries.captions, queries.images)):
    built.append(index.build_searcher(embeddings, max(config.eval.ks), config.eval.index_mode,
                                      config.eval.ann_threshold, recall_target=recall_target(config),
                                      tuning_queries=tuning))
  return Searchers(*built)


def recall_target(config: ml_collections.ConfigDict) -> float:
  """``eval.ann_recall_target``; a run configured before it existed gets the default."""
  return config.eval.get("ann_recall_target", index.DEFAULT_RECALL_TARGET)


def build_and_save_indexes(gallery: EmbeddedSplit, queries: EmbeddedSplit, paths: Callable[[str], str],
                           config: ml_collections.ConfigDict) -> None:
  """Builds the two indexes of ``gallery`` (see :func:`build_searchers`) and saves each at ``paths(name)``."""
  for name, searcher in zip(layout.GALLERIES, build_searchers(gallery, queries, config)):
    index.save_searcher(searcher, paths(name))


def load_searchers(paths: Callable[[str], str]) -> Searchers:
  """The two saved indexes of a gallery, from ``paths(name)``."""
  return Searchers(*(index.load_searcher(paths(name)) for name in layout.GALLERIES))


def search_both_ways(queries: EmbeddedSplit, searchers: Searchers, gallery: EmbeddedSplit,
                     k: int) -> tuple[np.ndarray, np.ndarray, float | None]:
  """i2t and t2i top-``k`` rows; with an approximate index, also its agreement with exact search."""
  i2t_rows, _ = index.search(searchers.captions, queries.images, k)
  t2i_rows, _ = index.search(searchers.images, queries.captions, k)
  agreements = [index.agreement(rows, exact.top_k(gallery_part, query_part, rows.shape[1]))
                for searcher, rows, gallery_part, query_part in
                ((searchers.captions, i2t_rows, gallery.captions, queries.images),
                 (searchers.images, t2i_rows, gallery.images, queries.captions))
                if searcher.mode == "approximate"]
  return i2t_rows, t2i_rows, (float(np.mean(agreements)) if agreements else None)


def _with_agreement(values: dict, agreement: float | None) -> dict:
  if agreement is not None:
    values[metrics.ANN_AGREEMENT] = agreement
  return values


def query_gallery(queries: EmbeddedSplit, searchers: Searchers, gallery: EmbeddedSplit,
                  truth: metrics.GroundTruth, ks: Sequence[int]) -> dict[str, float]:
  """Task-aware search: one task's queries against that task's own gallery.

  With an approximate index the metrics also hold ``ann_agreement``: the
  recall of its top-K against exact search over ``gallery``.
  """
  i2t_rows, t2i_rows, agreement = search_both_ways(queries, searchers, gallery, max(ks))
  return _with_agreement(metrics.retrieval_metrics(i2t_rows, t2i_rows, truth, ks), agreement)


def embed_seen_tasks(t: int, params, splits: Sequence[Examples], tokenizer: Tokenizer,
                     embedders: Embedders) -> list[EmbeddedSplit]:
  """The evaluation splits of tasks ``0..t`` embedded by ``S_t`` (every process takes part)."""
  return [embedders.embed(params, splits[k], tokenizer) for k in range(t + 1)]


def gallery_metadata(split: Examples, split_name: str) -> dict:
  """``galleries/task_KK.json``: the items behind the rows of a task's indexes (for the search command)."""
  return {"split": split_name, "image_ids": [int(i) for i in split.image_ids], "captions": list(split.captions),
          "caption_image": [int(i) for i in split.caption_image]}


def export_and_index(t: int, current: Sequence[EmbeddedSplit], splits: Sequence[Examples], workdir: str,
                     config: ml_collections.ConfigDict) -> None:
  """Writes ``S_t``'s embeddings of every seen task (with their ground-truth links) and their indexes."""
  for k, (embedded, split) in enumerate(zip(current, splits)):
    if k == t:
      manifest.write_json(layout.gallery_path(workdir, k), gallery_metadata(split, config.eval.split))
    manifest.save_npz(layout.embeddings_path(workdir, t, k), images=embedded.images, captions=embedded.captions,
                          image_ids=split.image_ids, caption_image=split.caption_image,
                          caption_text_ids=caption_text_ids(split.captions))
    build_and_save_indexes(embedded, embedded, functools.partial(layout.index_dir, workdir, t, k), config)


def stored_gallery(policy: IndexingPolicy, k: int, t: int, current: Sequence[EmbeddedSplit],
                   workdir: str) -> tuple[EmbeddedSplit, Searchers]:
  """Task ``k``'s gallery after task ``t`` as ``policy`` names it, with its saved indexes."""
  snapshot = policy.gallery_snapshot(k, t)
  searchers = load_searchers(functools.partial(layout.index_dir, workdir, snapshot, k))
  if snapshot == t:
    return current[k], searchers
  path = layout.embeddings_path(workdir, snapshot, k)
  stored = manifest.load_npz(path)
  if not all(np.isfinite(stored[part]).all() for part in layout.GALLERIES):
    raise files.CorruptFileError(f"{path} holds NaN or Inf embeddings; delete it (and the evaluations from task "
                                 f"{snapshot} on) to recompute it from snapshot {snapshot}")
  return EmbeddedSplit(stored["images"], stored["captions"]), searchers


def _evaluate_policy(policy: IndexingPolicy, t: int, current: Sequence[EmbeddedSplit], splits: Sequence[Examples],
                     workdir: str, config: ml_collections.ConfigDict) -> dict[str, dict]:
  """``{scope: {str(k): metrics}}`` of one policy after task ``t``."""
  ks = config.eval.ks
  queries = [policy.prepare_queries(current[k], k, t) for k in range(t + 1)]
  galleries, task_aware = [], {}
  for k in range(t + 1):
    gallery, searchers = stored_gallery(policy, k, t, current, workdir)
    galleries.append(gallery)
    task_aware[str(k)] = query_gallery(queries[k], searchers, gallery, metrics.GroundTruth.from_examples(splits[k]),
                                       ks)
  union = EmbeddedSplit(*(np.concatenate(part) for part in zip(*galleries)))
  union_paths = functools.partial(layout.union_index_dir, workdir, policy.name, t)
  build_and_save_indexes(union, EmbeddedSplit(*(np.concatenate(part) for part in zip(*queries))), union_paths,
                         config)
  union_searchers = load_searchers(union_paths)
  union_truth = metrics.UnionGallery.from_tasks(splits[:t + 1])
  task_agnostic = {}
  for k in range(t + 1):
    i2t_rows, t2i_rows, agreement = search_both_ways(queries[k], union_searchers, union, max(ks))
    task_agnostic[str(k)] = _with_agreement(union_truth.metrics(k, i2t_rows, t2i_rows, ks), agreement)
  return {"task_aware": task_aware, "task_agnostic": task_agnostic}


def evaluate_after_task(t: int, params, splits: Sequence[Examples], tokenizer: Tokenizer, embedders: Embedders,
                        workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Embeds, exports and indexes the seen tasks' splits with ``S_t``, then queries every policy.

  Args:
    t: the task just trained.
    params: its snapshot ``S_t``.
    splits: the evaluation split (``config.eval.split``) of every task, in task order.
    tokenizer: the run's tokenizer.
    embedders: from :func:`make_embedders`.
    workdir: where embeddings and indexes are written (by process 0).
    config: the experiment config (``eval.ks``, ``eval.index_mode``, ``eval.ann_threshold``,
      ``eval.ann_recall_target``).

  Returns:
    ``{scope: {policy: {str(k): metrics}}}``; empty dicts on processes other than 0.
  """
  current = embed_seen_tasks(t, params, splits, tokenizer, embedders)
  results = {scope: {name: {} for name in POLICIES} for scope in metrics.SCOPES}
  if jax.process_index() != 0:
    return results
  export_and_index(t, current, splits, workdir, config)
  for name, policy in POLICIES.items():
    for scope, per_task in _evaluate_policy(policy, t, current, splits[:t + 1], workdir, config).items():
      results[scope][name] = per_task
  return results


def evaluate_zero_shot(params, splits: Sequence[Examples], tokenizer: Tokenizer, embedders: Embedders,
                       config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The zero-shot row ``R[-1, k]``: the starting encoders on every task, task-aware, before any training.

  Queries and gallery are both embedded by the starting encoders, so every
  policy gives the same numbers; the indexes are built in memory, not saved.

  Returns:
    ``{str(k): metrics}`` for every task ``k``; empty on processes other than 0.
  """
  row = {}
  for k, split in enumerate(splits):
    embedded = embedders.embed(params, split, tokenizer)
    if jax.process_index() == 0:
      searchers = build_searchers(embedded, embedded, config)
      row[str(k)] = query_gallery(embedded, searchers, embedded, metrics.GroundTruth.from_examples(split),
                                  config.eval.ks)
  return row
