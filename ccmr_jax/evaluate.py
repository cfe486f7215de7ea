"""Evaluation after a task: embed with the current snapshot, index, query every indexing policy.

After training task ``t``, :func:`evaluate_after_task`

  1. embeds the evaluation split of every seen task ``k <= t`` with ``S_t``
     (these are the queries, and the galleries of ``S_t``), and exports them
     to ``embeddings/snapshot_TT/task_KK.npz`` (task ``t``'s items, once, to
     ``galleries/task_TT.json``);
  2. builds and saves the ScaNN index of each of those galleries
     (``index/snapshot_TT/task_KK/{images,captions}``);
  3. for ``t > 0``, embeds the drift maps' fit data (:mod:`ccmr_jax.drift_maps`)
     with ``S_t`` and every older snapshot and fits the maps the policies
     apply (``maps/after_task_TT.npz``);
  4. for each policy of :data:`ccmr_jax.policies.POLICIES` and each ``k``,
     searches the gallery the policy names (stored by an earlier snapshot,
     moved by a map or not, or just embedded) with task ``k``'s queries as
     the policy prepares them: task-aware in ``k``'s own index (a moved
     gallery's in ``index/mapped/POLICY/after_task_TT/task_KK``),
     task-agnostic in the union of the galleries of tasks ``0..t``
     (``index/union/POLICY/after_task_TT``), or, for a policy that moves
     its queries per gallery, in each gallery's index, hits merged by score.

Metrics and the policies' rules are numpy (:mod:`ccmr_jax.metrics`,
:mod:`ccmr_jax.policies`); this module holds the jax side.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ccmr_jax import drift_maps, exact, files, index, manifest, metrics, policies, sharding
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
                     embedders: Embedders) -> tuple[list[EmbeddedSplit], list[float]]:
  """The evaluation splits of tasks ``0..t`` embedded by ``S_t``, and the seconds each took (every process)."""
  embedded, seconds = [], []
  for k in range(t + 1):
    start = time.perf_counter()
    embedded.append(embedders.embed(params, splits[k], tokenizer))
    seconds.append(round(time.perf_counter() - start, 4))
  return embedded, seconds


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


def stored_embeddings(workdir: str) -> Callable[[int, int], EmbeddedSplit]:
  """``stored(snapshot, k)``: task ``k``'s split as ``snapshot`` embedded it, read from the workdir (checked finite)
  once, then kept for the policies that search it too."""

  @functools.cache
  def stored(snapshot: int, k: int) -> EmbeddedSplit:
    path = layout.embeddings_path(workdir, snapshot, k)
    arrays = manifest.load_npz(path)
    if not all(np.isfinite(arrays[part]).all() for part in layout.GALLERIES):
      raise files.CorruptFileError(f"{path} holds NaN or Inf embeddings; delete it (and the evaluations from task "
                                   f"{snapshot} on) to recompute it from snapshot {snapshot}")
    return EmbeddedSplit(arrays["images"], arrays["captions"])

  return stored


def gallery_searchers(policy: IndexingPolicy, view: policies.PolicyView, t: int, workdir: str,
                      config: ml_collections.ConfigDict) -> list[Searchers]:
  """The task-aware indexes of each gallery of ``view``: stored ones, or built (and saved) for moved galleries."""
  searchers = []
  for k, gallery in enumerate(view.galleries):
    if policy.moves_gallery(k, t):
      paths = functools.partial(layout.mapped_index_dir, workdir, policy.name, t, k)
      build_and_save_indexes(gallery, view.queries[k][k], paths, config)
    else:
      paths = functools.partial(layout.index_dir, workdir, policy.gallery_snapshot(k, t), k)
    searchers.append(load_searchers(paths))
  return searchers


def search_parts(query_parts: Sequence[EmbeddedSplit], searchers: Sequence[Searchers],
                 galleries: Sequence[EmbeddedSplit], k: int) -> tuple[np.ndarray, np.ndarray, float | None]:
  """Task-agnostic search, one index per gallery: each searched with its own queries, hits merged by score.

  Returns i2t and t2i rows into the union (galleries concatenated in task
  order) and, with approximate indexes, the mean agreement of the parts.
  """
  found = [search_both_ways(q, s, g, k) for q, s, g in zip(query_parts, searchers, galleries)]
  merged = []
  for direction in range(2):  # 0: i2t (image queries, caption galleries), 1: t2i
    part_rows = [f[direction] for f in found]
    part_scores = [policies.found_scores(q[direction], g[1 - direction], r)
                   for q, g, r in zip(query_parts, galleries, part_rows)]
    merged.append(policies.merge_top_k(part_rows, part_scores, [len(g[1 - direction]) for g in galleries], k)[0])
  agreements = [f[2] for f in found if f[2] is not None]
  return merged[0], merged[1], (float(np.mean(agreements)) if agreements else None)


def _evaluate_policy(policy: IndexingPolicy, t: int, current: Sequence[EmbeddedSplit], splits: Sequence[Examples],
                     workdir: str, config: ml_collections.ConfigDict, stored: Callable[[int, int], EmbeddedSplit],
                     maps=None) -> dict[str, dict]:
  """``{scope: {str(k): metrics}}`` of one policy after task ``t``; ``stored`` from :func:`stored_embeddings`."""
  ks = config.eval.ks
  view = policies.policy_view(policy, t, current, stored, maps)
  searchers = gallery_searchers(policy, view, t, workdir, config)
  task_aware = {str(k): query_gallery(view.queries[k][k], searchers[k], view.galleries[k],
                                      metrics.GroundTruth.from_examples(splits[k]), ks) for k in range(t + 1)}
  union_truth = metrics.UnionGallery.from_tasks(splits[:t + 1])
  if policy.query_map is None:
    union = EmbeddedSplit(*(np.concatenate(part) for part in zip(*view.galleries)))
    union_paths = functools.partial(layout.union_index_dir, workdir, policy.name, t)
    build_and_save_indexes(union, EmbeddedSplit(*(np.concatenate(part) for part in zip(*current))), union_paths,
                           config)
    union_searchers = load_searchers(union_paths)
  task_agnostic = {}
  for k in range(t + 1):
    if policy.query_map is None:
      found = search_both_ways(view.queries[k][k], union_searchers, union, max(ks))
    else:
      found = search_parts(view.queries[k], searchers, view.galleries, max(ks))
    i2t_rows, t2i_rows, agreement = found
    task_agnostic[str(k)] = _with_agreement(union_truth.metrics(k, i2t_rows, t2i_rows, ks), agreement)
  return {"task_aware": task_aware, "task_agnostic": task_agnostic}


def fit_maps(t: int, params, fit_data: Examples, restore: Callable[[int], Any], tokenizer: Tokenizer,
             embedders: Embedders, ridge: float) -> tuple[drift_maps.DriftMaps, dict]:
  """The drift maps between ``S_t`` and each older snapshot, on ``fit_data``, and what fitting them cost.

  Every process embeds (the embedders are collective); ``restore(k)`` gives ``S_k``'s params.

  Returns:
    The maps, and ``{"items": encoder passes over fit items (images + captions, by S_t and every S_k),
    "embed_s": seconds of those passes, "solve_s": seconds of the fits}``.
  """
  embed_seconds = 0.0

  def embed(snapshot_params) -> EmbeddedSplit:
    nonlocal embed_seconds
    start = time.perf_counter()
    embedded = embedders.embed(snapshot_params, fit_data, tokenizer)
    embed_seconds += time.perf_counter() - start
    return embedded

  start = time.perf_counter()
  maps = drift_maps.fit_drift_maps(t, embed(params), lambda k: embed(restore(k)), policies.maps_needed(), ridge)
  total = time.perf_counter() - start
  items = (len(fit_data) + fit_data.num_captions) * (t + 1)
  return maps, {"items": items, "embed_s": round(embed_seconds, 4), "solve_s": round(total - embed_seconds, 4)}


def evaluate_after_task(t: int, params, splits: Sequence[Examples], tokenizer: Tokenizer, embedders: Embedders,
                        workdir: str, config: ml_collections.ConfigDict, fit_data: Examples | None = None,
                        restore: Callable[[int], Any] | None = None) -> dict:
  """Embeds, exports and indexes the seen tasks' splits with ``S_t``, fits the drift maps, then queries every policy.

  Args:
    t: the task just trained.
    params: its snapshot ``S_t``.
    splits: the evaluation split (``config.eval.split``) of every task, in task order.
    tokenizer: the run's tokenizer.
    embedders: from :func:`make_embedders`.
    workdir: where embeddings, maps and indexes are written (by process 0).
    config: the experiment config (``eval.ks``, ``eval.index_mode``, ``eval.ann_threshold``,
      ``eval.ann_recall_target``, ``eval.drift_maps``).
    fit_data: the data the drift maps are fitted on (:func:`ccmr_jax.drift_maps.fit_examples`); needed for ``t > 0``.
    restore: ``restore(k)`` → snapshot ``S_k``'s params; needed for ``t > 0``.

  Returns:
    ``{scope: {policy: {str(k): metrics}}, "cost": ...}``; the cost (every process) holds each seen split's
    ``items`` (images + captions) and the ``embed_s`` ``S_t`` took on it, and the ``fit`` of the maps
    (:func:`fit_maps`). Metrics are empty dicts on processes other than 0.
  """
  current, seconds = embed_seen_tasks(t, params, splits, tokenizer, embedders)
  maps, fit_cost = None, {"items": 0, "embed_s": 0.0, "solve_s": 0.0}
  if t > 0:
    if fit_data is None or restore is None:
      raise ValueError(f"evaluating task {t} needs the drift maps' fit data and the older snapshots")
    maps, fit_cost = fit_maps(t, params, fit_data, restore, tokenizer, embedders, drift_map_settings(config)[1])
  results = {scope: {name: {} for name in POLICIES} for scope in metrics.SCOPES}
  results["cost"] = {"items": [len(split) + split.num_captions for split in splits[:t + 1]], "embed_s": seconds,
                     "fit": fit_cost}
  if jax.process_index() != 0:
    return results
  export_and_index(t, current, splits, workdir, config)
  if maps is not None:
    maps.save(layout.drift_maps_path(workdir, t))
  stored = stored_embeddings(workdir)
  for name, policy in POLICIES.items():
    for scope, per_task in _evaluate_policy(policy, t, current, splits[:t + 1], workdir, config, stored,
                                            maps).items():
      results[scope][name] = per_task
  return results


def drift_map_settings(config: ml_collections.ConfigDict) -> tuple[int, float]:
  """``(eval.drift_maps.fit_images, eval.drift_maps.ridge)``; a run configured before they existed gets the defaults."""
  settings = config.eval.get("drift_maps", None) or {}
  return (settings.get("fit_images", drift_maps.DEFAULT_FIT_IMAGES), settings.get("ridge", drift_maps.DEFAULT_RIDGE))


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
