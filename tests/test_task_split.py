import numpy as np
import pytest

from ccmr_jax.data.examples import Dataset
from ccmr_jax.data.scenes import SceneSpec, make_scenes
from ccmr_jax.data.task_split import assign_tasks, group_tasks, split_into_tasks
from conftest import make_examples

CATEGORIES = ("cat", "dog", "car", "bus", "cup", "fork")
GROUPS = {"animal": (0, 1), "vehicle": (2, 3), "kitchen": (4, 5)}


def _dataset(labels_per_split):
  return Dataset("handmade", {s: make_examples(l) for s, l in labels_per_split.items()}, CATEGORIES, GROUPS)


def test_groups_are_dealt_in_contiguous_blocks():
  assert group_tasks(["a", "b", "c", "d", "e"], 5) == [[0], [1], [2], [3], [4]]
  assert group_tasks(["a", "b", "c", "d", "e"], 2) == [[0, 1, 2], [3, 4]]
  with pytest.raises(ValueError, match="only 5 category groups"):
    group_tasks(["a", "b", "c", "d", "e"], 6)


def test_majority_vote_and_ties_go_to_the_earlier_task():
  category_task = np.array([0, 0, 1, 1, 2, 2])
  labels = [np.array([0]), np.array([2, 3, 0]), np.array([4, 1]), np.array([5, 5, 2]), np.array([], np.int32)]
  np.testing.assert_array_equal(assign_tasks(labels, category_task), [0, 1, 0, 2, -1])


def test_split_is_disjoint_complete_and_works_on_labels_only():
  labels = {"train": [[0], [1, 2], [2, 3], [4], [5, 0, 5], [3], []],
            "val": [[0], [2], [4]], "test": [[1], [3], [5, 5]]}
  stream = split_into_tasks(_dataset(labels), 3)
  assert [t.name for t in stream.tasks] == ["animal", "vehicle", "kitchen"]
  train_ids = [set(t.splits["train"].image_ids.tolist()) for t in stream.tasks]
  assert train_ids == [{0, 1}, {2, 5}, {3, 4}]
  assert stream.dropped == {"train": 1, "val": 0, "test": 0}
  # Captions travel with their images.
  task0 = stream.tasks[0].splits["train"]
  assert task0.captions == ("image 0 caption 0", "image 0 caption 1", "image 1 caption 0", "image 1 caption 1")


def test_unlabeled_images_can_form_their_own_task():
  labels = {"train": [[0], [2], [4], []], "val": [[0], [2], [4], []], "test": [[1], [3], [5], []]}
  stream = split_into_tasks(_dataset(labels), 3, unlabeled="own_task")
  assert len(stream) == 4 and stream.tasks[3].name == "unlabeled"
  assert len(stream.tasks[3].splits["train"]) == 1


def test_an_empty_task_is_an_error_naming_the_fix():
  labels = {"train": [[0], [2]], "val": [[0], [2], [4]], "test": [[1], [3], [5]]}
  with pytest.raises(ValueError, match="kitchen.*no image in the train split"):
    split_into_tasks(_dataset(labels), 3)


def test_scenes_split_by_family_is_deterministic_and_covers_every_image():
  data = make_scenes(SceneSpec(num_train=200, num_val=40, num_test=60, seed=1))
  a, b = split_into_tasks(data, 5), split_into_tasks(data, 5)
  assert [t.name for t in a.tasks] == ["round", "boxy", "pointed", "lines", "symbols"]
  for split in ("train", "val", "test"):
    sizes = [len(t.splits[split]) for t in a.tasks]
    assert sum(sizes) == len(data.splits[split])
    for ta, tb in zip(a.tasks, b.tasks):
      np.testing.assert_array_equal(ta.splits[split].image_ids, tb.splits[split].image_ids)


def _untied_images(examples, family_of):
  """Image ids whose labels give one family the most votes: no tie for the task order to break."""
  out = []
  for image_id, labels in zip(examples.image_ids, examples.labels):
    votes = np.bincount(family_of[labels], minlength=family_of.max() + 1)
    if (votes == votes.max()).sum() == 1:
      out.append(int(image_id))
  return sorted(out)


def test_task_order_changes_the_order_of_the_tasks_and_nothing_else():
  dataset = make_scenes(SceneSpec(num_train=300, num_val=40, num_test=60, seed=3))
  default = split_into_tasks(dataset, 5)
  order = ("symbols", "round", "lines", "boxy", "pointed")
  reordered = split_into_tasks(dataset, 5, task_order=order)
  assert [t.name for t in reordered.tasks] == list(order)
  family_of = np.zeros(len(dataset.category_names), np.int64)
  for g, cats in enumerate(dataset.category_groups.values()):
    family_of[list(cats)] = g
  by_name = {t.name: t for t in default.tasks}
  for split in ("train", "val", "test"):
    def every(stream):
      return sorted(int(i) for t in stream.tasks for i in t.splits[split].image_ids)

    assert every(reordered) == every(default)  # the same images, none lost, none twice
    for task in reordered.tasks:
      same = by_name[task.name]
      assert task.categories == same.categories
      untied = _untied_images(task.splits[split], family_of)
      assert untied and untied == _untied_images(same.splits[split], family_of)
  with pytest.raises(ValueError, match="must order every category group of scenes once"):
    split_into_tasks(dataset, 5, task_order=("symbols", "round"))
