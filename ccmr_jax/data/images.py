"""File-backed images for real datasets: a one-time uint8 cache, lazy views, crops, decode-ahead.

Storage. A real dataset's images are decoded once, resized so the shorter
side is ``stored_size`` and center-cropped to ``stored_size x stored_size``,
and written as one uint8 ``.npy`` file per dataset (all splits, one row per
image) in a cache folder, with a ``meta.json`` beside it (ids, captions,
labels, the row range of each split). Training then memory-maps the file:
reading a batch is a copy of its rows, not a JPEG decode, and the operating
system's page cache (not the Python heap) holds what fits in RAM. Size:
``stored_size² · 3`` bytes per image, e.g. 196,608 at 256 px: 6.2 GB for
Flickr30K's 31,783 images, 24.2 GB for COCO's 123,287. The alternative, a
random-access TFDS data source (``array_record``), would decode every JPEG
again in every epoch and needs the dataset built in that format; the cache
costs disk once and makes an epoch's reads cheap.

A cache folder is written aside under a temporary name and renamed into
place when complete, so a killed build never leaves a cache a later run
would trust. Each host builds its own (every host needs every image over
an epoch's random order) and then reads only the rows of its own share of
each batch.

Views. :class:`CachedImages` is an array-like ``uint8 [N, size, size, 3]``
over some rows of the file: indexing it with a slice or an integer array
gives another view (nothing is read), so :meth:`Examples.subset`,
:func:`~ccmr_jax.data.examples.concatenate` and ``np.concatenate`` of views
stay lazy; ``np.asarray(view)`` reads the rows and returns their center
``size x size`` crops (what evaluation sees). :meth:`CachedImages.training_batch`
returns random ``size x size`` crops, flipped left-right with probability
1/2, drawn from a key, when the view's ``augment`` is on.

Decode-ahead. :func:`decode_ahead` turns the lazy image views of a stream of
batches into arrays on a small thread pool, a few batches ahead of the
consumer, so the accelerator does not wait for the disk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import shutil
import uuid
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

IMAGES_FILE = "images.npy"
META_FILE = "meta.json"

# Appended to the (seed, task, epoch, step) of a training batch so that its
# crops and flips never share a random stream with the sampler's own draws.
_AUGMENT_STREAM = 0xC209


@dataclasses.dataclass(frozen=True, eq=False)
class CachedImages:
  """A lazy ``uint8 [N, size, size, 3]`` view of some rows of an image cache.

  Attributes:
    store: ``uint8 [M, S, S, 3]``, the whole cache (normally a read-only
      ``np.memmap``), ``S >= size``.
    rows: ``int64 [N]``, the rows of ``store`` this view shows, in order.
    size: side of the images the view returns.
    augment: whether :meth:`training_batch` crops at random and flips.
  """

  store: np.ndarray
  rows: np.ndarray
  size: int
  augment: bool = False

  def __post_init__(self):
    if self.store.ndim != 4 or self.store.dtype != np.uint8 or self.store.shape[1] != self.store.shape[2]:
      raise ValueError(f"an image cache must be uint8 [M, S, S, 3], got {self.store.dtype} {self.store.shape}")
    if not 0 < self.size <= self.store.shape[1]:
      raise ValueError(f"image size {self.size} must be in [1, {self.store.shape[1]}] (the cached size)")
    object.__setattr__(self, "rows", np.asarray(self.rows, np.int64).reshape(-1))

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self.rows), self.size, self.size, 3)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint8)

  @property
  def ndim(self) -> int:
    return 4

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index) -> "CachedImages | np.ndarray":
    """A view for slices, integer arrays and masks; one center-cropped image for an integer."""
    if isinstance(index, (int, np.integer)):
      return self._center_crops(self.rows[[index]])[0]
    return dataclasses.replace(self, rows=self.rows[index])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    crops = self._center_crops(self.rows)
    return crops if dtype is None else crops.astype(dtype)

  def __array_function__(self, func, types, args, kwargs):
    if func is not np.concatenate:
      return NotImplemented
    return concatenate_views(*args, **kwargs)

  def _center_crops(self, rows: np.ndarray) -> np.ndarray:
    offset = (self.store.shape[1] - self.size) // 2
    window = slice(offset, offset + self.size)
    return np.asarray(self.store[rows, window, window])

  def training_batch(self, key: Sequence[int]) -> np.ndarray:
    """The images of this view as a training batch, ``uint8 [N, size, size, 3]``.

    With ``augment`` each image is a ``size x size`` window at a uniformly
    random offset, flipped left-right with probability 1/2, all drawn from
    ``np.random.default_rng([*key, _AUGMENT_STREAM])``; without, the center
    crops of ``np.asarray(self)``.
    """
    if not self.augment:
      return np.asarray(self)
    rng = np.random.default_rng([*key, _AUGMENT_STREAM])
    slack = self.store.shape[1] - self.size
    tops = rng.integers(0, slack + 1, size=len(self.rows))
    lefts = rng.integers(0, slack + 1, size=len(self.rows))
    flips = rng.random(len(self.rows)) < 0.5
    out = np.empty(self.shape, np.uint8)
    for i, (row, top, left, flip) in enumerate(zip(self.rows, tops, lefts, flips)):
      window = self.store[row, top:top + self.size, left:left + self.size]
      out[i] = window[:, ::-1] if flip else window
    return out


def concatenate_views(arrays: Sequence[CachedImages], axis: int = 0, out=None, **kwargs) -> CachedImages:
  """``np.concatenate`` of views of the same cache: one view of all their rows (nothing is read)."""
  if axis != 0 or out is not None or kwargs:
    raise TypeError("cached images concatenate along axis 0 only, without out= or dtype=")
  first = arrays[0]
  for other in arrays[1:]:
    if not isinstance(other, CachedImages) or other.store is not first.store or other.size != first.size \
        or other.augment != first.augment:
      raise TypeError("only views of the same image cache with the same size and augmentation concatenate")
  return dataclasses.replace(first, rows=np.concatenate([a.rows for a in arrays]))


def is_lazy(images: Any) -> bool:
  """Whether ``images`` is a file-backed view (not an in-memory array)."""
  return isinstance(images, CachedImages)


def decode_ahead(batches: Iterable[dict[str, Any]], images: Any, key: Sequence[int],
                 depth: int = 4) -> Iterator[dict[str, Any]]:
  """Batches with their ``"image"`` views read into arrays, ``depth`` batches ahead.

  Batch ``s`` (counting from 0) is read with ``view.training_batch((*key, s))``
  on a pool of ``depth`` threads while the consumer works on earlier
  batches; batches come out in order, and an error reading one is raised
  when that batch is due. When ``images`` (the sampled data's images) is an
  in-memory array, ``batches`` is returned untouched.

  Args:
    batches: dicts whose ``"image"`` entry is a :class:`CachedImages` view.
    images: the images the batches were sampled from.
    key: e.g. ``(seed, task, epoch)``; the step is appended.
    depth: batches read ahead (and threads).
  """
  if not is_lazy(images):
    return iter(batches)
  return _decode_ahead(batches, tuple(int(k) for k in key), depth)


def _decode_ahead(batches: Iterable[dict[str, Any]], key: tuple[int, ...], depth: int) -> Iterator[dict[str, Any]]:
  def read(batch: dict[str, Any], step: int) -> dict[str, Any]:
    return {**batch, "image": batch["image"].training_batch((*key, step))}

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=depth, thread_name_prefix="decode_ahead")
  pending: collections.deque = collections.deque()
  try:
    for step, batch in enumerate(batches):
      pending.append(pool.submit(read, batch, step))
      if len(pending) > depth:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


@dataclasses.dataclass(frozen=True)
class ImageCache:
  """An opened cache folder: the memory-mapped images and their metadata."""

  path: str
  images: np.ndarray
  meta: Mapping[str, Any]

  def view(self, split: str, size: int, augment: bool = False) -> CachedImages:
    """The images of ``split`` (rows ``meta["splits"][split]["rows"]``) as a lazy view."""
    start, stop = self.meta["splits"][split]["rows"]
    return CachedImages(self.images, np.arange(start, stop), size, augment)


def open_cache(path: str) -> ImageCache | None:
  """The complete cache in folder ``path``, or None when there is none.

  Raises:
    ValueError: the folder exists but its files disagree (e.g. copied in part):
      the message says to delete it.
  """
  meta_path, images_path = os.path.join(path, META_FILE), os.path.join(path, IMAGES_FILE)
  if not os.path.exists(meta_path):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    images = np.load(images_path, mmap_mode="r")
    expected = (int(meta["num_images"]), int(meta["stored_size"]), int(meta["stored_size"]), 3)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"the image cache {path} is unreadable ({e}); delete that folder to rebuild it") from e
  if images.shape != expected or images.dtype != np.uint8:
    raise ValueError(f"the image cache {path} holds {images.dtype} {images.shape}, its meta.json says uint8 "
                     f"{expected}; delete that folder to rebuild it")
  return ImageCache(path, images, meta)


def _write_rows(path: str, num_images: int, stored_size: int, rows: Iterable[np.ndarray]) -> None:
  """Writes the ``.npy`` file of ``rows`` (``uint8 [num_images, S, S, 3]``) row by row.

  Plain file writes, not a writable memory map: the rows then pass through
  the page cache without ever being mapped into this process, whose resident
  size would otherwise grow by the whole cache (6.2 GB for Flickr30K) as it
  is written. The file is the one ``np.lib.format.open_memmap`` would write.
  """
  shape = (num_images, stored_size, stored_size, 3)
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                             "fortran_order": False, "shape": shape})
    count = 0
    for count, image in enumerate(rows, start=1):
      if count > num_images:
        raise ValueError(f"the image source yields more than the {num_images} images it announced")
      if image.shape != shape[1:]:
        raise ValueError(f"image {count - 1} has shape {image.shape}, expected {shape[1:]}")
      f.write(np.ascontiguousarray(image, np.uint8).tobytes())
    if count != num_images:
      raise ValueError(f"the image source yielded {count} images but announced {num_images}")


def write_cache(path: str, num_images: int, stored_size: int, rows: Iterable[np.ndarray],
                meta: Mapping[str, Any]) -> ImageCache:
  """Writes a cache folder all-or-nothing and opens it.

  Args:
    path: the cache folder; must not exist yet (another process that wins
      the race to create it is fine: its cache is used).
    num_images: ``M``, the rows ``rows`` yields.
    stored_size: ``S``.
    rows: ``M`` images ``uint8 [S, S, 3]``, in row order.
    meta: JSON-able metadata, written once ``rows`` is exhausted (so the
      generator of ``rows`` may fill it); ``num_images`` and
      ``stored_size`` are added.

  Raises:
    ValueError: the disk has too little free space (checked first, before
      any decoding), or ``rows`` yields a wrong shape or a wrong number of
      images.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  needed, free = num_images * stored_size * stored_size * 3, shutil.disk_usage(parent).free
  if free < needed:
    raise ValueError(f"the image cache {path} needs {needed / 1e9:.1f} GB but {parent} has {free / 1e9:.1f} GB "
                     "free; free space or set data.cache_dir to a local disk with room")
  temporary = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
  os.makedirs(temporary)
  try:
    _write_rows(os.path.join(temporary, IMAGES_FILE), num_images, stored_size, rows)
    with open(os.path.join(temporary, META_FILE), "w") as f:
      json.dump({**meta, "num_images": num_images, "stored_size": stored_size}, f)
    try:
      os.rename(temporary, path)
    except OSError:
      if open_cache(path) is None:  # not a concurrent writer's complete cache: a real failure
        raise
  finally:
    if os.path.exists(temporary):
      shutil.rmtree(temporary)
  return open_cache(path)
