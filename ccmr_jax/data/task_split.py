"""Deterministic split of a dataset into a task stream by category groups.

The splitter sees only category labels, so the same code cuts the synthetic
scenes (by shape family) and MS-COCO (by supercategory).

Rules:
  * The dataset's category groups, in their given order, are dealt to ``T``
    tasks in contiguous blocks (``G`` groups, ``T <= G``; the first
    ``G mod T`` tasks get one group more). A task is the union of its groups'
    categories.
  * An image belongs to the task that holds most of its object labels (one
    vote per object); a tie goes to the earliest task in the stream. Every
    image lands in exactly one task, so tasks are disjoint by image.
  * Images without labels are dropped (``unlabeled="drop"``) or kept in a
    task of their own appended at the end (``unlabeled="own_task"``); the
    counts say how many.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ccmr_jax.data.examples import SPLITS, Dataset, Examples, concatenate


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the stream: a name, its categories and its three splits."""

  index: int
  name: str
  categories: tuple[int, ...]
  splits: dict[str, Examples]

  def counts(self) -> dict[str, dict[str, int]]:
    return {s: {"images": len(e), "captions": e.num_captions} for s, e in self.splits.items()}


@dataclasses.dataclass(frozen=True)
class TaskStream:
  """The ordered tasks of one dataset."""

  dataset_name: str
  tasks: tuple[Task, ...]
  category_names: tuple[str, ...]
  dropped: dict[str, int]

  def __len__(self) -> int:
    return len(self.tasks)

  def training_data(self, task_indices: Sequence[int]) -> Examples:
    """Training split of the given tasks, concatenated (e.g. for ``joint``)."""
    return concatenate([self.tasks[i].splits["train"] for i in task_indices])


def group_tasks(group_names: Sequence[str], num_tasks: int) -> list[list[int]]:
  """Deals ``len(group_names)`` groups to ``num_tasks`` tasks in contiguous blocks."""
  num_groups = len(group_names)
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
  if num_tasks > num_groups:
    raise ValueError(
        f"num_tasks={num_tasks} but the dataset has only {num_groups} category groups "
        f"({', '.join(group_names)}); set --config.data.num_tasks to at most {num_groups}")
  base, extra = divmod(num_groups, num_tasks)
  blocks, start = [], 0
  for t in range(num_tasks):
    size = base + (1 if t < extra else 0)
    blocks.append(list(range(start, start + size)))
    start += size
  return blocks


def assign_tasks(labels: Sequence[np.ndarray], category_task: np.ndarray) -> np.ndarray:
  """Task index of each image by majority vote of its labels; -1 if unlabeled.

  Args:
    labels: per image, its objects' category ids.
    category_task: ``int [num_categories]``, the task of each category.

  Returns:
    ``int64 [N]``; ties go to the smallest task index.
  """
  num_tasks = int(category_task.max()) + 1
  out = np.full(len(labels), -1, dtype=np.int64)
  for i, image_labels in enumerate(labels):
    if len(image_labels):
      votes = np.bincount(category_task[np.asarray(image_labels)], minlength=num_tasks)
      out[i] = int(np.argmax(votes))  # argmax takes the first maximum: ties go to the earlier task
  return out


def ordered_groups(dataset: Dataset, task_order: Sequence[str] = ()) -> list[str]:
  """The dataset's category groups in the order ``task_order`` gives (empty: the dataset's own order).

  Raises:
    ValueError: ``task_order`` is not a permutation of the group names.
  """
  group_names = list(dataset.category_groups)
  if not task_order:
    return group_names
  if sorted(task_order) != sorted(group_names):
    raise ValueError(f"data.task_order must order every category group of {dataset.name} once: "
                     f"{group_names}, got {list(task_order)}")
  return list(task_order)


def split_into_tasks(dataset: Dataset, num_tasks: int, unlabeled: str = "drop",
                     task_order: Sequence[str] = ()) -> TaskStream:
  """Cuts ``dataset`` into ``num_tasks`` tasks by its category groups.

  Args:
    dataset: a :class:`Dataset` with train/val/test splits and category groups.
    num_tasks: ``T``; at most the number of category groups.
    unlabeled: ``"drop"`` or ``"own_task"`` for images with no labels.
    task_order: the category groups in the order the tasks take them
      (:func:`ordered_groups`); empty for the dataset's own order.

  Returns:
    A :class:`TaskStream`. Raises ``ValueError`` if a task ends up with no
    image in some split, or ``task_order`` is not a permutation of the groups.
  """
  if unlabeled not in ("drop", "own_task"):
    raise ValueError(f"unlabeled must be 'drop' or 'own_task', got {unlabeled!r}")
  group_names = ordered_groups(dataset, task_order)
  blocks = group_tasks(group_names, num_tasks)
  category_task = np.full(len(dataset.category_names), -1, dtype=np.int64)
  task_categories, task_names = [], []
  for t, block in enumerate(blocks):
    cats = [c for g in block for c in dataset.category_groups[group_names[g]]]
    category_task[cats] = t
    task_categories.append(tuple(sorted(cats)))
    task_names.append("+".join(group_names[g] for g in block))
  if (category_task < 0).any():
    missing = [dataset.category_names[c] for c in np.flatnonzero(category_task < 0)]
    raise ValueError(f"categories in no group: {missing}")
  if unlabeled == "own_task":
    task_names.append("unlabeled")
    task_categories.append(())

  per_task: list[dict[str, Examples]] = [{} for _ in task_names]
  dropped = {}
  for split in SPLITS:
    examples = dataset.splits[split]
    assignment = assign_tasks(examples.labels, category_task)
    if unlabeled == "own_task":
      assignment[assignment < 0] = len(blocks)
    dropped[split] = int((assignment < 0).sum())
    for t in range(len(task_names)):
      rows = np.flatnonzero(assignment == t)
      if len(rows) == 0:
        raise ValueError(
            f"task {t} ({task_names[t]}) has no image in the {split} split of {dataset.name}; "
            f"use fewer tasks (--config.data.num_tasks) or more data")
      per_task[t][split] = examples.subset(rows)
  tasks = tuple(Task(t, task_names[t], task_categories[t], per_task[t]) for t in range(len(task_names)))
  return TaskStream(dataset.name, tasks, dataset.category_names, dropped)
