"""Why old tasks are forgotten: embedding drift, query–gallery alignment, inter-task confusion.

Reads the test embeddings a run writes (``embeddings/snapshot_SS/task_KK.npz``:
task ``k``'s test split embedded by snapshot ``S_s`` for every ``s >= k``) and
measures, in numpy (exact searches through :mod:`ccmr_jax.exact`), the three effects the paper's analysis separates:

  * drift — how far ``S_t`` moved an old task's vectors from where ``S_k``
    put them, and whether it kept their neighbourhoods;
  * alignment — how well queries (always embedded by ``S_t``) line up with
    the gallery vectors an indexing policy searches (``S_t`` for ``reindex``,
    ``S_k`` for ``no_reindex``, moved by a drift map for the compensation
    policies): under ``no_reindex`` the two sides come from different
    snapshots, and this measures the price of that mismatch (and how much a
    map recovers);
  * confusion — in task-agnostic search (the union of all seen galleries),
    how often a query's results come from another task's gallery.

Every similarity is a cosine: rows are L2-normalised first (the workdir's
vectors are unit already, so this only removes rounding). Exact search for
the confusion ranks by inner product, as the ``exact`` ScaNN index does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ccmr_jax import drift_maps, files, manifest, policies
from ccmr_jax import workdir as layout
from ccmr_jax.exact import top_k as exact_top_k
from ccmr_jax.metrics import unit_rows

MODALITIES = ("images", "captions")
# Direction → (modality of the queries, modality of the gallery).
QUERY_GALLERY = {"i2t": ("images", "captions"), "t2i": ("captions", "images")}

DEFINITIONS = {
    "drift.mean_cosine[t][k]": "mean over task k's test items of cos(embedding by S_k, embedding by S_t); k < t",
    "drift.knn_overlap[t][k]": "mean over task k's test items of |kNN by S_k ∩ kNN by S_t| / n_neighbours, "
                               "neighbours among task k's items of the same modality, the item itself excluded",
    "alignment.<policy>.<direction>.matched_cosine[t][k]":
        "mean over task k's (image, own caption) pairs of cos(query by S_t, gallery item by the policy's snapshot)",
    "alignment.<policy>.<direction>.unmatched_cosine[t][k]":
        "the same mean over every (image, caption) pair that is not an image and its own caption",
    "alignment.<policy>.<direction>.modality_gap[t][k]":
        "|| mean of the image vectors - mean of the caption vectors ||_2 (Liang et al. 2022)",
    "confusion.<policy>.<direction>.top1_other_task[t][k]":
        "fraction of task k's queries whose first result, in the union gallery of tasks 0..t, belongs to another task",
    "confusion.<policy>.<direction>.topk_other_task[t][k]":
        "mean over task k's queries of the fraction of their top_k results that belong to another task",
    "i2t / t2i": "i2t: image queries by S_t against the caption gallery; "
                 "t2i: caption queries by S_t against the image gallery",
}


def embedding_drift(old: np.ndarray, new: np.ndarray, k: int = 10) -> dict:
  """How far a change of encoders moved the same items, and whether their neighbourhoods survived.

  With ``x_i`` and ``y_i`` the unit vectors of item ``i`` by the old and the
  new encoders (``N`` items) and ``kNN_x(i)`` the ``k`` items ``j != i`` of
  largest ``<x_i, x_j>``:

    mean_cosine = (1/N) Σ_i <x_i, y_i>
    knn_overlap = (1/N) Σ_i |kNN_x(i) ∩ kNN_y(i)| / k

  A rotation of the whole space gives ``mean_cosine < 1`` but
  ``knn_overlap = 1``: search among vectors of one snapshot is unharmed,
  search of new vectors against old ones (``no_reindex``) is not. ``k`` is
  clamped to ``N - 1``.

  Args:
    old: ``[N, D]`` embeddings of the items by the old encoders.
    new: ``[N, D]`` embeddings of the same items, same order, by the new encoders.
    k: neighbours per item.

  Returns:
    ``{"mean_cosine": float, "knn_overlap": float or None (fewer than 2 items), "k": the k used}``.
  """
  old, new = unit_rows(old), unit_rows(new)
  if old.shape != new.shape or len(old) == 0:
    raise ValueError(f"old and new must hold the same non-empty items, got shapes {old.shape} and {new.shape}")
  if k < 1:
    raise ValueError(f"k must be positive, got {k}")
  mean_cosine = float(np.mean(np.sum(old.astype(np.float64) * new, axis=1)))
  k = min(k, len(old) - 1)
  if k == 0:
    return {"mean_cosine": mean_cosine, "knn_overlap": None, "k": 0}
  old_neighbours = exact_top_k(old, old, k, exclude_self=True)
  new_neighbours = exact_top_k(new, new, k, exclude_self=True)
  shared = (old_neighbours[:, :, None] == new_neighbours[:, None, :]).any(axis=2).sum(axis=1)
  return {"mean_cosine": mean_cosine, "knn_overlap": float(np.mean(shared / k)), "k": k}


def cross_modal_alignment(image_emb: np.ndarray, caption_emb: np.ndarray, caption_image: np.ndarray) -> dict:
  """How well captions line up with their own images, and how far apart the two modalities sit.

  With unit image vectors ``v_1..v_N``, unit caption vectors ``u_1..u_C`` and
  ``m(c)`` the image of caption ``c``:

    matched_cosine   = (1/C) Σ_c <u_c, v_m(c)>
    unmatched_cosine = (1/(C (N-1))) Σ_c Σ_{i != m(c)} <u_c, v_i>
                     = (<Σ_c u_c, Σ_i v_i> - C · matched_cosine) / (C (N-1))
    modality_gap     = || (1/N) Σ_i v_i - (1/C) Σ_c u_c ||_2   (Liang et al. 2022, "Mind the gap")

  ``unmatched_cosine`` is the exact mean over all non-matching pairs (by row:
  another image with an identical caption text still counts as non-matching),
  computed from the sums above in ``O((N + C) D)``, so no subsampling is needed.

  Args:
    image_emb: ``[N, D]`` image vectors.
    caption_emb: ``[C, D]`` caption vectors.
    caption_image: int ``[C]``, the row of ``image_emb`` each caption describes.

  Returns:
    ``{"matched_cosine", "unmatched_cosine" (None when N == 1), "modality_gap"}``, floats.
  """
  images, captions = unit_rows(image_emb).astype(np.float64), unit_rows(caption_emb).astype(np.float64)
  caption_image = np.asarray(caption_image, np.int64)
  if len(images) == 0 or len(captions) == 0 or caption_image.shape != (len(captions),):
    raise ValueError(f"need images, captions and one image row per caption; got {len(images)} images, "
                     f"{len(captions)} captions, caption_image of shape {caption_image.shape}")
  if caption_image.min() < 0 or caption_image.max() >= len(images):
    raise ValueError(f"caption_image holds rows outside 0..{len(images) - 1}")
  num_images, num_captions = len(images), len(captions)
  matched_sum = float(np.sum(captions * images[caption_image]))
  unmatched = None
  if num_images > 1:
    all_pairs_sum = float(captions.sum(axis=0) @ images.sum(axis=0))
    unmatched = (all_pairs_sum - matched_sum) / (num_captions * (num_images - 1))
  gap = float(np.linalg.norm(images.mean(axis=0) - captions.mean(axis=0)))
  return {"matched_cosine": matched_sum / num_captions, "unmatched_cosine": unmatched, "modality_gap": gap}


def inter_task_confusion(top_rows: np.ndarray, row_task: np.ndarray, query_task) -> dict:
  """How often task-agnostic search answers a query from another task's gallery.

  With ``r_q1..r_qK`` the ranked gallery rows of query ``q`` (``Q`` queries),
  ``task(r)`` the task of gallery row ``r`` and ``τ_q`` the task of the query:

    top1_other_task = (1/Q) Σ_q [task(r_q1) != τ_q]
    topk_other_task = (1/Q) Σ_q (1/K) Σ_j [task(r_qj) != τ_q]

  Args:
    top_rows: int ``[Q, K]``, rows of the union gallery retrieved for each query, best first.
    row_task: int ``[G]``, the task of each gallery row.
    query_task: int ``[Q]``, or one int for all queries: the task each query belongs to.

  Returns:
    ``{"top1_other_task": float, "topk_other_task": float}``, fractions in [0, 1].
  """
  top_rows, row_task = np.asarray(top_rows, np.int64), np.asarray(row_task, np.int64)
  if top_rows.ndim != 2 or top_rows.shape[0] == 0 or top_rows.shape[1] == 0:
    raise ValueError(f"top_rows must be a non-empty [Q, K] array, got shape {top_rows.shape}")
  if top_rows.min() < 0 or top_rows.max() >= len(row_task):
    raise ValueError(f"top_rows holds rows outside the gallery 0..{len(row_task) - 1}")
  query_task = np.broadcast_to(np.asarray(query_task, np.int64), (len(top_rows),))
  other = row_task[top_rows] != query_task[:, None]
  return {"top1_other_task": float(other[:, 0].mean()), "topk_other_task": float(other.mean())}


def _embedding_loader(workdir: str) -> Callable[[int, int], dict]:
  """``load(snapshot, task)`` → the arrays of ``embeddings/snapshot_SS/task_KK.npz``, each file read once."""
  cache = {}

  def load(snapshot: int, task: int) -> dict:
    if (snapshot, task) not in cache:
      path = layout.embeddings_path(workdir, snapshot, task)
      if not manifest.is_sealed(path):
        raise FileNotFoundError(f"{path} is missing: the analysis needs task {task}'s test embeddings by "
                                f"snapshot {snapshot}; rerun the experiment in this workdir to write them")
      arrays = manifest.load_npz(path)
      cache[snapshot, task] = {"images": unit_rows(arrays["images"]), "captions": unit_rows(arrays["captions"]),
                               "caption_image": arrays["caption_image"]}
    return cache[snapshot, task]

  return load


def _rounded(value):
  return None if value is None else round(float(value), 6)


def _matrix(cells: dict, key: str, size: int) -> list[list]:
  """``[t][k]`` list of lists of ``cells[(t, k)][key]``, ``None`` where a cell is absent."""
  return [[_rounded(cells[t, k][key]) if (t, k) in cells else None for k in range(size)] for t in range(size)]


def analysable_policies(workdir: str, num_tasks_trained: int) -> list[str]:
  """Every policy of :data:`ccmr_jax.policies.POLICY_NAMES` whose vectors the workdir holds: a policy that
  applies drift maps needs ``maps/after_task_TT.npz`` for every trained ``t > 0``."""
  have_maps = all(manifest.is_sealed(layout.drift_maps_path(workdir, t)) for t in range(1, num_tasks_trained))
  return [p for p in policies.POLICY_NAMES if have_maps or not policies.get(p).maps_needed()]


def _policy_cell(view: policies.PolicyView, k: int, modalities: tuple[str, str], caption_image: np.ndarray,
                 top_k: int, per_part: bool) -> tuple[dict, dict]:
  """Alignment and confusion of task ``k``'s queries under one policy's view, one direction."""
  query_modality, gallery_modality = modalities
  q, g = MODALITIES.index(query_modality), MODALITIES.index(gallery_modality)
  queries = view.queries[k][k][q]
  sides = {query_modality: queries, gallery_modality: view.galleries[k][g]}
  alignment = cross_modal_alignment(sides["images"], sides["captions"], caption_image)
  galleries = [gallery[g] for gallery in view.galleries]
  row_task = np.repeat(np.arange(len(galleries)), [len(gallery) for gallery in galleries])
  if per_part:
    found = [exact_top_k(gallery, view.queries[k][j][q], min(top_k, len(gallery)))
             for j, gallery in enumerate(galleries)]
    scores = [policies.found_scores(view.queries[k][j][q], gallery, rows)
              for j, (gallery, rows) in enumerate(zip(galleries, found))]
    top = policies.merge_top_k(found, scores, [len(gallery) for gallery in galleries], min(top_k, len(row_task)))[0]
  else:
    top = exact_top_k(np.concatenate(galleries), queries, min(top_k, len(row_task)))
  return alignment, inter_task_confusion(top, row_task, k)


def analyze_workdir(workdir: str, num_tasks_trained: int, knn_k: int = 10, top_k: int = 10) -> dict:
  """Drift, alignment and confusion of a run, from the embeddings in its workdir.

  Matrices are indexed ``[t][k]`` like ``results.json`` (after training task
  ``t``, on task ``k``), ``None`` where undefined: drift is defined for
  ``k < t``, alignment and confusion for ``k <= t``. For policy ``p`` the
  gallery of task ``k`` after task ``t`` is embedded by ``S_g``, ``g = t``
  (``reindex``) or ``g = k`` (the others); queries by ``S_t``; both moved as
  the policy moves them (:func:`ccmr_jax.policies.policy_view`, with the
  workdir's drift maps). A policy that moves its queries per gallery is
  searched per gallery, hits merged by score.

    drift[modality][stat][t][k]      = embedding_drift(task k by S_k, task k by S_t)
    alignment[p][direction][stat][t][k]
                                     = cross_modal_alignment of task k's queries by S_t
                                       and task k's gallery by S_g
    confusion[p][direction][stat][t][k]
                                     = inter_task_confusion of task k's queries by S_t searched
                                       (exact top_k) in the union of the galleries of tasks 0..t

  Args:
    workdir: the run's workdir.
    num_tasks_trained: tasks 0..num_tasks_trained-1 have their embeddings written.
    knn_k: neighbours per item for the drift's kNN overlap.
    top_k: results per query for the confusion.

  Returns:
    A JSON-serializable dict with ``tasks_trained``, ``knn_k``, ``top_k``,
    ``definitions``, ``drift``, ``alignment`` and ``confusion``.
  """
  if num_tasks_trained < 1:
    raise ValueError(f"num_tasks_trained must be at least 1, got {num_tasks_trained}")
  size = num_tasks_trained
  load = _embedding_loader(workdir)

  drift_cells = {modality: {} for modality in MODALITIES}
  for t in range(1, size):
    for k in range(t):
      for modality in MODALITIES:
        drift_cells[modality][t, k] = embedding_drift(load(k, k)[modality], load(t, k)[modality], knn_k)

  names = analysable_policies(workdir, size)
  alignment_cells = {p: {d: {} for d in QUERY_GALLERY} for p in names}
  confusion_cells = {p: {d: {} for d in QUERY_GALLERY} for p in names}
  for t in range(size):
    maps = drift_maps.DriftMaps.load(layout.drift_maps_path(workdir, t), t) if t and policies.maps_needed(names) \
        else None
    current = [policies.EmbeddedSplit(load(t, k)["images"], load(t, k)["captions"]) for k in range(t + 1)]
    for policy in names:
      view = policies.policy_view(policies.get(policy), t, current,
                                  lambda s, k: policies.EmbeddedSplit(load(s, k)["images"], load(s, k)["captions"]),
                                  maps)
      for direction, modalities in QUERY_GALLERY.items():
        for k in range(t + 1):
          alignment_cells[policy][direction][t, k], confusion_cells[policy][direction][t, k] = _policy_cell(
              view, k, modalities, load(k, k)["caption_image"], top_k,
              per_part=policies.get(policy).query_map is not None)

  def matrices(cells: dict, keys: tuple[str, ...]) -> dict:
    return {key: _matrix(cells, key, size) for key in keys}

  return {
      "tasks_trained": size,
      "knn_k": knn_k,
      "top_k": top_k,
      "definitions": DEFINITIONS,
      "drift": {m: matrices(drift_cells[m], ("mean_cosine", "knn_overlap")) for m in MODALITIES},
      "alignment": {p: {d: matrices(alignment_cells[p][d], ("matched_cosine", "unmatched_cosine", "modality_gap"))
                        for d in QUERY_GALLERY} for p in names},
      "confusion": {p: {d: matrices(confusion_cells[p][d], ("top1_other_task", "topk_other_task"))
                        for d in QUERY_GALLERY} for p in names},
  }


def _mean_of_row(matrix: list[list], t: int, columns: range):
  values = [matrix[t][k] for k in columns if matrix[t][k] is not None]
  return _rounded(np.mean(values)) if values else None


def summarize_analysis(analysis: dict) -> dict:
  """Headline numbers of :func:`analyze_workdir`'s output, at the last trained task ``T-1``.

  ``drift_to_final[modality][stat]`` averages ``drift[modality][stat][T-1][k]``
  over the old tasks ``k < T-1`` (``None`` with one task); the other entries
  average row ``T-1`` over every seen task ``k <= T-1``:
  ``final_matched_cosine[policy][direction]``,
  ``final_modality_gap[policy][direction]`` and
  ``final_top1_other_task[policy][direction]``.

  Args:
    analysis: the dict :func:`analyze_workdir` returns.

  Returns:
    A JSON-serializable dict of floats (or ``None``), keyed as above.
  """
  last = analysis["tasks_trained"] - 1
  old_tasks, seen_tasks = range(last), range(last + 1)

  def per_policy(section: str, stat: str) -> dict:
    return {p: {d: _mean_of_row(analysis[section][p][d][stat], last, seen_tasks) for d in directions}
            for p, directions in analysis[section].items()}

  return {
      "drift_to_final": {m: {stat: _mean_of_row(matrix, last, old_tasks) for stat, matrix in stats.items()}
                         for m, stats in analysis["drift"].items()},
      "final_matched_cosine": per_policy("alignment", "matched_cosine"),
      "final_modality_gap": per_policy("alignment", "modality_gap"),
      "final_top1_other_task": per_policy("confusion", "top1_other_task"),
  }


def _as_array(matrix: list[list]) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row] for row in matrix], np.float64)


def _heatmap(figure: Figure, ax, matrix: list[list], title: str, value_range: tuple[float, float]) -> None:
  values = _as_array(matrix)
  low, high = value_range
  image = ax.imshow(values, vmin=low, vmax=high, cmap="viridis")
  for (t, k), value in np.ndenumerate(values):
    if np.isfinite(value):  # dark text on the bright end of viridis, light text on the dark end
      ax.text(k, t, f"{value:.3f}", ha="center", va="center", fontsize=7,
              color="k" if (value - low) / (high - low) > 0.6 else "w")
  ax.set_title(title, fontsize=9)
  ax.set_xlabel("task k")
  ax.set_xticks(range(len(values)))
  ax.set_yticks(range(len(values)))
  figure.colorbar(image, ax=ax, fraction=0.046)


def _shared_range(matrices: list[list[list]]) -> tuple[float, float]:
  values = np.concatenate([_as_array(m).ravel() for m in matrices])
  values = values[np.isfinite(values)]
  if len(values) == 0:
    return 0.0, 1.0
  low, high = float(values.min()), float(values.max())
  return (low, high) if high > low else (low - 0.5, high + 0.5)


def plot_analysis(analysis: dict, path: str) -> str:
  """One PNG of heatmaps, rows ``t``, columns ``k``: drift on top, query–gallery alignment below.

  Top row: ``drift[modality]["mean_cosine"]``, then ``drift[modality]["knn_overlap"]``,
  for images and captions. Bottom row: ``alignment[policy][direction]["matched_cosine"]``
  for each policy and direction. Panels of one quantity share a colour scale.

  Args:
    analysis: the dict :func:`analyze_workdir` returns.
    path: the PNG to write (atomically).

  Returns:
    ``path``.
  """
  # Panels as (title, matrix, quantity); one colour scale per quantity.
  drift = [(f"drift S_k→S_t, {m}: {label}", analysis["drift"][m][stat], stat)
           for stat, label in (("mean_cosine", "mean cosine"), ("knn_overlap", "kNN overlap"))
           for m in analysis["drift"]]
  matched = [(f"{p} {d}: matched query–gallery cosine", per_direction[d]["matched_cosine"], "matched_cosine")
             for p, per_direction in analysis["alignment"].items() for d in per_direction]
  columns = max(len(drift), len(matched))
  figure = Figure(figsize=(4.2 * columns, 7.6), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(2, columns, squeeze=False)
  for row, panels in enumerate((drift, matched)):
    axes[row][0].set_ylabel("after task t")
    ranges = {q: _shared_range([m for _, m, quantity in panels if quantity == q]) for _, _, q in panels}
    for column, ax in enumerate(axes[row]):
      if column < len(panels):
        title, matrix, quantity = panels[column]
        _heatmap(figure, ax, matrix, title, ranges[quantity])
      else:
        ax.set_axis_off()
  files.atomic_save_figure(figure, path)
  return path
