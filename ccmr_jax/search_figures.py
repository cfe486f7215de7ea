"""Pictures of retrieval results: a query's top-K per policy (the search grid) and the report's examples.

A figure is a grid of rows, one per (label, query, hits): the query on the
left, then its hits in rank order; an image is drawn as itself, a caption as
wrapped text. A hit that is a ground-truth match is framed green, one that is
not is framed grey, one of unknown truth (a query not from the split) is
unframed.

The report's examples (:func:`report_examples`) need no encoder: their
queries are test items of the oldest task, whose embeddings by ``S_t`` the
evaluation stored, searched in the stored indexes — after task 0 and after
the last task, under each policy.
"""

from __future__ import annotations

import os
import textwrap
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ccmr_jax import files, manifest  # noqa: E402
from ccmr_jax import workdir as layout  # noqa: E402
from ccmr_jax.search import Hit, Query, StoredGalleries  # noqa: E402

FRAMES = {True: ("#2ca02c", 4.0), False: ("#b0b0b0", 1.0)}
EXAMPLES_PER_DIRECTION = 2


def _tile(ax, image: np.ndarray | None = None, text: str | None = None, correct: bool | None = None) -> None:
  if image is not None:
    ax.imshow(image, interpolation="nearest")
  else:
    ax.text(0.5, 0.5, textwrap.fill(text or "", 18), ha="center", va="center", fontsize=7, wrap=True)
  ax.set_xticks([])
  ax.set_yticks([])
  colour, width = FRAMES.get(correct, ("white", 0.0))
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(width)


def plot_grid(rows: Sequence[tuple[str, Query, Sequence[Hit]]], image_of: Callable[[int], np.ndarray],
              path: str) -> str:
  """Writes the grid of ``rows`` (label, query, hits) to ``path``; ``image_of(image_id)`` gives pixels."""
  figure = grid_figure(rows, image_of)
  files.atomic_save_figure(figure, path)
  plt.close(figure)
  return path


def grid_figure(rows: Sequence[tuple[str, Query, Sequence[Hit]]], image_of: Callable[[int], np.ndarray]):
  """The figure of :func:`plot_grid`: ``len(rows)`` rows of 1 + K axes."""
  width = 1 + max(len(hits) for _, _, hits in rows)
  figure, axes = plt.subplots(len(rows), width, figsize=(1.55 * width, 1.7 * len(rows)), squeeze=False)
  for r, (label, query, hits) in enumerate(rows):
    query_image = query.image if query.image is not None else (
        image_of(query.image_id) if query.image_id is not None else None)
    _tile(axes[r][0], image=query_image, text=query.text)
    axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    for c in range(1, width):
      if c > len(hits):
        axes[r][c].set_axis_off()
        continue
      hit = hits[c - 1]
      if query.direction == "t2i":
        _tile(axes[r][c], image=image_of(hit.image_id), correct=hit.correct)
      else:
        _tile(axes[r][c], text=hit.caption, correct=hit.correct)
      axes[r][c].set_title(f"{hit.rank}. task {hit.task}", fontsize=6)
  axes[0][0].set_title("query", fontsize=7)
  return figure


def _example_queries(galleries: StoredGalleries) -> list[tuple[Query, str, int]]:
  """Fixed test queries of task 0: (query, modality of the stored row, its row), for each direction."""
  gallery = galleries.galleries[0]
  queries = []
  for image_row in range(min(EXAMPLES_PER_DIRECTION, len(gallery.image_ids))):
    queries.append((Query(image_id=int(gallery.image_ids[image_row])), "images", image_row))
  for image_row in range(min(EXAMPLES_PER_DIRECTION, len(gallery.image_ids))):
    caption_row = int(np.flatnonzero(gallery.caption_image == image_row)[0])
    queries.append((Query(text=gallery.captions[caption_row]), "captions", caption_row))
  return queries


EXAMPLE_POLICIES = ("reindex", "no_reindex")  # the paper's pair; the search command shows any policy


def report_examples(workdir: str, num_tasks: int, k: int = 5) -> list[dict]:
  """For each fixed query of task 0, its top-``k`` after task 0 and after the last task, per policy of
  :data:`EXAMPLE_POLICIES`.

  Returns:
    One entry per query: ``{"query": ..., "rows": [{"after_task", "policy", "hits": [...]}]}``, JSON-ready.
  """
  last = num_tasks - 1
  examples = []
  for query, modality, row in _example_queries(StoredGalleries(workdir, 0)):
    entry = {"query": {"direction": query.direction, "text": query.text, "image_id": query.image_id}, "rows": []}
    for after_task in sorted({0, last}):
      galleries = StoredGalleries(workdir, after_task)
      vector = manifest.load_npz(layout.embeddings_path(workdir, after_task, 0))[modality][row:row + 1]
      for policy in EXAMPLE_POLICIES:
        hits = galleries.search(vector, query, policy, "task_aware", 0, k)
        entry["rows"].append({"after_task": after_task, "policy": policy,
                              "hits": [h.__dict__ for h in hits]})
    examples.append(entry)
  return examples


def plot_examples(examples: list[dict], image_of: Callable[[int], np.ndarray], path: str) -> str:
  """``plots/examples.png``: one row per (query, after task, policy) of :func:`report_examples`."""
  rows = []
  for entry in examples:
    query = Query(text=entry["query"]["text"], image_id=entry["query"]["image_id"])
    for row in entry["rows"]:
      rows.append((f"after task {row['after_task']}\n{row['policy']}", query, [Hit(**h) for h in row["hits"]]))
  return plot_grid(rows, image_of, path)


def examples_path(workdir: str) -> str:
  return os.path.join(layout.plots_dir(workdir), "examples.png")
