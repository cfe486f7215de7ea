"""Plain containers for captioned images: the currency of the data stage.

Every source (the embedded synthetic scenes, MS-COCO, Flickr30K) produces the
same :class:`Examples` per split, so the task splitter, the tokenizer, the
batcher and the evaluation never know where the data came from.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def normalize_caption(text: str) -> str:
  """Lower-cases and collapses everything that is not a letter or digit.

  Two captions with the same normalised text are the same description: the
  ground truth of retrieval treats them as interchangeable.
  """
  return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


@dataclasses.dataclass(frozen=True)
class Examples:
  """Images with their captions and object category labels.

  Attributes:
    images: ``uint8 [N, H, W, 3]``.
    image_ids: ``int64 [N]``, unique within a dataset.
    captions: the caption texts, all images' captions concatenated.
    caption_image: ``int64 [C]``, the row in ``images`` each caption describes.
    labels: one ``int32`` array per image: its objects' category ids (one
      entry per object, repeats allowed, as COCO's ``objects.label``).
  """

  images: np.ndarray
  image_ids: np.ndarray
  captions: tuple[str, ...]
  caption_image: np.ndarray
  labels: tuple[np.ndarray, ...]

  def __post_init__(self):
    n = len(self.images)
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}")
    if len(self.image_ids) != n or len(self.labels) != n:
      raise ValueError("images, image_ids and labels must have the same length")
    if len(self.captions) != len(self.caption_image):
      raise ValueError("captions and caption_image must have the same length")
    if len(self.caption_image) and (self.caption_image.min() < 0 or self.caption_image.max() >= n):
      raise ValueError("caption_image points outside the images")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def num_captions(self) -> int:
    return len(self.captions)

  def subset(self, rows: Sequence[int] | np.ndarray) -> "Examples":
    """The examples at ``rows`` (in that order) with their captions."""
    rows = np.asarray(rows, dtype=np.int64)
    new_row = np.full(len(self), -1, dtype=np.int64)
    new_row[rows] = np.arange(len(rows))
    keep = np.flatnonzero(new_row[self.caption_image] >= 0)
    keep = keep[np.argsort(new_row[self.caption_image[keep]], kind="stable")]
    return Examples(
        images=self.images[rows],
        image_ids=self.image_ids[rows],
        captions=tuple(self.captions[i] for i in keep),
        caption_image=new_row[self.caption_image[keep]],
        labels=tuple(self.labels[i] for i in rows),
    )


def concatenate(parts: Sequence[Examples]) -> Examples:
  """Joins several :class:`Examples` (e.g. the training data of seen tasks)."""
  if not parts:
    raise ValueError("nothing to concatenate")
  offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
  return Examples(
      images=np.concatenate([p.images for p in parts]),
      image_ids=np.concatenate([p.image_ids for p in parts]),
      captions=tuple(c for p in parts for c in p.captions),
      caption_image=np.concatenate([p.caption_image + o for p, o in zip(parts, offsets)]),
      labels=tuple(l for p in parts for l in p.labels),
  )


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A captioned-image dataset before it is cut into tasks.

  Attributes:
    name: e.g. ``"scenes"``, ``"coco"``.
    splits: ``{"train"|"val"|"test": Examples}``.
    category_names: name of each category id.
    category_groups: ``{group name: [category ids]}``, in the order tasks are
      formed (COCO's supercategories, the scenes' shape families).
  """

  name: str
  splits: Mapping[str, Examples]
  category_names: tuple[str, ...]
  category_groups: Mapping[str, tuple[int, ...]]


def caption_text_ids(captions) -> np.ndarray:
  """``int32 [C]``: equal ids exactly for captions with the same normalised text."""
  ids: dict[str, int] = {}
  return np.asarray([ids.setdefault(normalize_caption(c), len(ids)) for c in captions], np.int32)
