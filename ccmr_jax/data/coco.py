"""MS-COCO's categories and the task split by supercategory groups.

TFDS ``coco_captions`` (config ``2014``: Karpathy's train / val / test /
restval splits) labels each object with an index ``0..79`` into COCO's 80
categories sorted by their COCO id, but its prepared files carry no names
and no supercategories offline. :data:`CATEGORIES` is that table (index,
name, supercategory), from COCO 2014's ``instances_*.json``.

Task groups. The 12 supercategories are joined into 5 groups of related
scenes, in this order (ties of the majority vote go to the earlier group)::

  vehicles_outdoor  vehicle, outdoor              (street scenes, traffic, transport)
  animals           animal
  people_sports     person, sports, accessory      (people and what they play with or carry)
  food_kitchen      food, kitchen
  home              furniture, electronic, appliance, indoor

The default stream is one task per group (``data.num_tasks=5``); fewer
tasks join neighbouring groups (``task_split.group_tasks``). This is in the
spirit of the category-split COCO streams of the paper and of later work
(e.g. KDR's themed tasks: trains, birds, surfing, food, bathrooms), with
every image of the dataset placed in exactly one task.

Which labels vote (:func:`task_labels`). ``person`` is in about half of
COCO's images, usually several times and beside other objects; counted
like any category it would pull most of the dataset into ``people_sports``.
So an image votes with its objects' categories (one vote per object), with
``person`` left out whenever any other category is present: a dining table
with six people, three cups and a fork is a ``food_kitchen`` image, a crowd
with nothing else is a ``people_sports`` image. Images without any object
(about 1% of COCO) have no vote; ``data.unlabeled`` decides: ``"drop"``
(the default; the count is logged and written to ``results.json``) or
``"own_task"`` (a last task of their own).
"""

from __future__ import annotations

import numpy as np

# (name, supercategory) of TFDS label 0..79, i.e. COCO category ids 1..90 in order, with gaps removed.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("person", "person"),
    ("bicycle", "vehicle"), ("car", "vehicle"), ("motorcycle", "vehicle"), ("airplane", "vehicle"),
    ("bus", "vehicle"), ("train", "vehicle"), ("truck", "vehicle"), ("boat", "vehicle"),
    ("traffic light", "outdoor"), ("fire hydrant", "outdoor"), ("stop sign", "outdoor"),
    ("parking meter", "outdoor"), ("bench", "outdoor"),
    ("bird", "animal"), ("cat", "animal"), ("dog", "animal"), ("horse", "animal"), ("sheep", "animal"),
    ("cow", "animal"), ("elephant", "animal"), ("bear", "animal"), ("zebra", "animal"), ("giraffe", "animal"),
    ("backpack", "accessory"), ("umbrella", "accessory"), ("handbag", "accessory"), ("tie", "accessory"),
    ("suitcase", "accessory"),
    ("frisbee", "sports"), ("skis", "sports"), ("snowboard", "sports"), ("sports ball", "sports"),
    ("kite", "sports"), ("baseball bat", "sports"), ("baseball glove", "sports"), ("skateboard", "sports"),
    ("surfboard", "sports"), ("tennis racket", "sports"),
    ("bottle", "kitchen"), ("wine glass", "kitchen"), ("cup", "kitchen"), ("fork", "kitchen"),
    ("knife", "kitchen"), ("spoon", "kitchen"), ("bowl", "kitchen"),
    ("banana", "food"), ("apple", "food"), ("sandwich", "food"), ("orange", "food"), ("broccoli", "food"),
    ("carrot", "food"), ("hot dog", "food"), ("pizza", "food"), ("donut", "food"), ("cake", "food"),
    ("chair", "furniture"), ("couch", "furniture"), ("potted plant", "furniture"), ("bed", "furniture"),
    ("dining table", "furniture"), ("toilet", "furniture"),
    ("tv", "electronic"), ("laptop", "electronic"), ("mouse", "electronic"), ("remote", "electronic"),
    ("keyboard", "electronic"), ("cell phone", "electronic"),
    ("microwave", "appliance"), ("oven", "appliance"), ("toaster", "appliance"), ("sink", "appliance"),
    ("refrigerator", "appliance"),
    ("book", "indoor"), ("clock", "indoor"), ("vase", "indoor"), ("scissors", "indoor"),
    ("teddy bear", "indoor"), ("hair drier", "indoor"), ("toothbrush", "indoor"),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(name for name, _ in CATEGORIES)
SUPERCATEGORIES: tuple[str, ...] = ("person", "vehicle", "outdoor", "animal", "accessory", "sports", "kitchen",
                                    "food", "furniture", "electronic", "appliance", "indoor")
PERSON = CATEGORY_NAMES.index("person")

# Task groups of supercategories, in stream order.
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "vehicles_outdoor": ("vehicle", "outdoor"),
    "animals": ("animal",),
    "people_sports": ("person", "sports", "accessory"),
    "food_kitchen": ("food", "kitchen"),
    "home": ("furniture", "electronic", "appliance", "indoor"),
}


def category_groups() -> dict[str, tuple[int, ...]]:
  """``{group name: category indices}`` of :data:`TASK_GROUPS`, in stream order."""
  return {group: tuple(i for i, (_, sup) in enumerate(CATEGORIES) if sup in supercategories)
          for group, supercategories in TASK_GROUPS.items()}


def task_labels(object_labels) -> np.ndarray:
  """The labels an image votes with: its objects' categories, ``person`` dropped beside any other.

  Args:
    object_labels: the image's ``objects.label`` (one per object, 0..79).

  Returns:
    ``int32`` labels, one per object kept (empty for an image without objects).
  """
  labels = np.asarray(object_labels, np.int32).reshape(-1)
  if len(labels) and (labels.min() < 0 or labels.max() >= len(CATEGORIES)):
    raise ValueError(f"COCO labels must be in [0, {len(CATEGORIES)}), got {labels.min()}..{labels.max()}")
  others = labels[labels != PERSON]
  return others if len(others) else labels
