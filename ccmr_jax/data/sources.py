"""Where a run's data comes from: the embedded scenes, Flickr30K or MS-COCO.

:func:`load_dataset` returns the :class:`~ccmr_jax.data.examples.Dataset`
named by ``config.data.source``; the task split, the tokenizer, the batches
and the evaluation never know which one it was.

  ``scenes``     the embedded synthetic scenes (no files, no TensorFlow)
  ``flickr30k``  TFDS ``flickr30k`` built by :mod:`ccmr_jax.data.flickr30k_builder`
                 from manually downloaded files; tasks by concept groups
                 (:mod:`ccmr_jax.data.flickr30k`)
  ``coco``       TFDS ``coco_captions/2014`` (Karpathy splits, ``restval`` folded
                 into train unless ``data.coco_fold_restval=False``); tasks by
                 supercategory groups (:mod:`ccmr_jax.data.coco`)

The real datasets are read through TensorFlow Datasets from
``data.tfds_data_dir`` (a local folder or ``gs://``), imported only here and
only for them. On first use each host decodes the whole dataset once into an
image cache under ``data.cache_dir`` (a local folder: see
:mod:`ccmr_jax.data.images` for the layout and its size); later runs open it
in a second. Training images are random ``data.image_size`` crops of the
``data.stored_size`` cached images, flipped at random (``data.augment``);
evaluation images are the center crops.

Nothing is trained before the data is known to be there: a missing
TensorFlow, a dataset that was never prepared or a broken cache raise
:class:`DataError` with the exact files and commands that fix it.
"""

from __future__ import annotations

import os
from typing import Callable

import ml_collections
import numpy as np
from absl import logging

from ccmr_jax.data import coco, flickr30k, images
from ccmr_jax.data.examples import SPLITS, Dataset, Examples, concatenate
from ccmr_jax.data.scenes import SceneSpec, make_scenes, make_split

DATA_SOURCES = ("scenes", "flickr30k", "coco")
TFDS_NAMES = {"flickr30k": "flickr30k", "coco": "coco_captions/2014"}
PREPARE_COMMAND = "python -m ccmr_jax.data.prepare"
_CONFIG_FILES = {"flickr30k": "flickr.py", "coco": "coco.py"}


class DataError(Exception):
  """Missing, unprepared or malformed data; the message says what to do."""


def input_image_size(config: ml_collections.ConfigDict) -> int:
  """Side of the square ``uint8`` images the image tower receives."""
  if config.data.source == "scenes":
    return config.data.scenes.image_size
  return config.data.image_size


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Rejects data settings that cannot work.

  Raises:
    ValueError: naming the field and the fix.
  """
  data = config.data
  if data.source not in DATA_SOURCES:
    raise ValueError(f"unknown data.source {data.source!r}; choose one of {list(DATA_SOURCES)}")
  if data.source == "scenes":
    return
  for field in ("tfds_data_dir", "cache_dir", "image_size", "stored_size", "augment"):
    if field not in data:
      raise ValueError(f"data.source={data.source!r} needs data.{field}; "
                       f"start from configs/{_CONFIG_FILES[data.source]}")
  if not 0 < data.image_size <= data.stored_size:
    raise ValueError(f"data.image_size={data.image_size} must be positive and at most "
                     f"data.stored_size={data.stored_size} (training crops are cut from the stored images)")
  if "://" in data.cache_dir:
    raise ValueError(f"data.cache_dir={data.cache_dir!r} must be a local folder (the image cache is memory-mapped)")


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The dataset named by ``config.data.source``, with train / val / test splits.

  Raises:
    DataError: the data is missing, not prepared or unreadable.
  """
  source = config.data.source
  if source == "scenes":
    return make_scenes(SceneSpec(**config.data.scenes))
  if source == "flickr30k":
    return _load_flickr30k(config.data)
  if source == "coco":
    return _load_coco(config.data)
  raise DataError(f"unknown data.source {source!r}; choose one of {list(DATA_SOURCES)}")


def load_split(config: ml_collections.ConfigDict, split: str) -> Examples:
  """One split of the dataset of ``config.data`` (the synthetic scenes generate only that split).

  Raises:
    DataError: as :func:`load_dataset`.
  """
  if config.data.source == "scenes":
    return make_split(SceneSpec(**config.data.scenes), split)
  return load_dataset(config).splits[split]


def not_prepared_message(source: str, data_dir: str, manual_dir: str = "") -> str:
  """What a user without the prepared ``source`` must do, with the exact commands."""
  if source == "flickr30k":
    manual_dir = manual_dir or os.path.join(data_dir, "downloads", "manual")
    return (
        f"Flickr30K is not prepared in {data_dir} (TFDS dataset flickr30k/1.0.0 not found).\n"
        f"1. Put these files in one folder, e.g. {manual_dir}:\n"
        "     dataset_flickr30k.json   Karpathy's split file, inside caption_datasets.zip from\n"
        "                              https://cs.stanford.edu/people/karpathy/deepimagesent/\n"
        "     flickr30k-images/        the 31,783 JPEG images (or their archive: .tar, .tar.gz, .tgz or .zip),\n"
        "                              from https://shannon.cs.illinois.edu/DenotationGraph/\n"
        "2. Build the TFDS dataset once (pip install 'ccmr_jax[data]' first):\n"
        f"     {PREPARE_COMMAND} --dataset=flickr30k --manual_dir={manual_dir} --data_dir={data_dir}\n"
        "   or, with the TFDS command line (in TFDS 4.9.10 it needs apache-beam and mlcroissant):\n"
        f"     tfds build flickr30k --imports=ccmr_jax.data.flickr30k_builder --manual_dir={manual_dir} "
        f"--data_dir={data_dir}\n"
        f"3. Run with --config.data.tfds_data_dir={data_dir} (the default is ~/tensorflow_datasets).")
  return (
      f"MS-COCO is not prepared in {data_dir} (TFDS dataset coco_captions/2014 not found).\n"
      "1. Build it once on a machine with internet access (downloads ~20 GB: the COCO 2014 train and val\n"
      "   images and annotations from images.cocodataset.org and Karpathy's caption_datasets.zip):\n"
      f"     {PREPARE_COMMAND} --dataset=coco --data_dir={data_dir}\n"
      f"   or: tfds build coco_captions/2014 --data_dir={data_dir}   (needs apache-beam and mlcroissant)\n"
      f"   To build from files you downloaded yourself, put them in {data_dir}/downloads/manual and add\n"
      "   --manual_dir to the command.\n"
      f"2. Run with --config.data.tfds_data_dir={data_dir} (the default is ~/tensorflow_datasets).")


def import_tfds(source: str):
  """``(tensorflow, tensorflow_datasets)``, imported now; a :class:`DataError` saying what to install if absent."""
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(f"data.source={source!r} reads TensorFlow Datasets, which is not installed ({e}); "
                    "install it with: pip install 'ccmr_jax[data]'") from e
  return tf, tfds


def prepared_builder(source: str, data_dir: str, manual_dir: str = ""):
  """The TFDS builder of ``source`` in ``data_dir``, checked to be prepared.

  Raises:
    DataError: TensorFlow Datasets is missing or the dataset is not prepared
      (:func:`not_prepared_message`).
  """
  _, tfds = import_tfds(source)
  if source == "flickr30k":
    from ccmr_jax.data import flickr30k_builder  # noqa: F401  (registers the builder with TFDS)
  builder = tfds.builder(TFDS_NAMES[source], data_dir=data_dir)
  if not builder.is_prepared():
    raise DataError(not_prepared_message(source, data_dir, manual_dir))
  return builder


def _existing_cache(path: str, counts: dict[str, int], data_dir: str) -> images.ImageCache | None:
  """The complete cache at ``path`` if there is one; a :class:`DataError` if it is not the dataset's."""
  try:
    cache = images.open_cache(path)
  except ValueError as e:
    raise DataError(str(e)) from e
  if cache is None:
    return None
  cached_counts = {split: cache.meta["splits"].get(split, {}).get("rows", [0, 0]) for split in counts}
  if all(stop - start == counts[split] for split, (start, stop) in cached_counts.items()):
    return cache
  raise DataError(f"the image cache {path} does not match the TFDS dataset in {data_dir} "
                  f"(images per split: cache {cached_counts}, dataset {counts}); delete {path} to rebuild it")


def _cache_example_fn(tf, stored_size: int, with_object_labels: bool):
  """The tf.data map from a TFDS example to what the cache keeps: the square image, its id, captions (labels)."""

  def prepare(example):
    image = example["image"]
    sides = tf.cast(tf.shape(image)[:2], tf.float32)
    new_sides = tf.maximum(tf.cast(tf.round(sides * stored_size / tf.reduce_min(sides)), tf.int32), stored_size)
    image = tf.image.resize(image, new_sides, method="bilinear", antialias=True)
    image = tf.image.resize_with_crop_or_pad(image, stored_size, stored_size)
    out = {"image": tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), "id": example["image/id"],
           "captions": example["captions"]["text"]}
    if with_object_labels:
      out["labels"] = example["objects"]["label"]
    return out

  return prepare


def image_cache(builder, splits: tuple[str, ...], stored_size: int, cache_dir: str,
                with_object_labels: bool) -> images.ImageCache:
  """The image cache of ``splits`` of a prepared TFDS builder; built on first use.

  Each image is resized (bilinear, antialiased) so that its shorter side is
  ``stored_size`` and center-cropped to a square; its ``image/id``, caption
  texts and (COCO) ``objects.label`` go to the cache's ``meta.json``.

  Raises:
    DataError: the cache is broken or does not match the dataset, the disk
      is too small for it, or an example cannot be decoded.
  """
  tf, tfds = import_tfds(builder.name)
  name = f"{builder.name}-{builder.builder_config.name}-" if builder.builder_config else f"{builder.name}-"
  path = os.path.join(cache_dir, f"{name}{builder.version}-{stored_size}px")
  # One pass over each split: no TFDS auto-cache, which would keep every decoded image of a dataset
  # under 250 MiB in memory (0.56 MB per 500x375 image: 1.7 GB for 3,000) and, with the heap that
  # ccmr_jax.host_memory never trims, for the rest of the run.
  read_config = tfds.ReadConfig(try_autocache=False)
  datasets = {split: builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
              for split in splits}
  counts = {split: int(ds.cardinality()) for split, ds in datasets.items()}
  cache = _existing_cache(path, counts, builder.data_dir)
  if cache is not None:
    return cache
  prepare = _cache_example_fn(tf, stored_size, with_object_labels)
  meta = {"tfds_name": builder.name, "tfds_version": str(builder.version), "splits": {}}

  def rows():
    start = 0
    for split, ds in datasets.items():
      part = {"rows": [start, start + counts[split]], "image_ids": [], "captions": [], "object_labels": []}
      meta["splits"][split] = part
      iterator = iter(tfds.as_numpy(ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(8)))
      for position in range(counts[split]):
        try:
          example = next(iterator)
        except StopIteration:
          raise DataError(f"{builder.name} {split} yields {position} images but its size is {counts[split]}; "
                          f"delete {builder.data_dir} and prepare the dataset again ({PREPARE_COMMAND})") from None
        except tf.errors.OpError as e:
          raise DataError(f"{builder.name} {split}: example {position} cannot be read ({e.message.strip()[:300]}); "
                          f"the prepared files in {builder.data_dir} are damaged: delete that folder and "
                          f"prepare the dataset again ({PREPARE_COMMAND})") from e
        part["image_ids"].append(int(example["id"]))
        part["captions"].append([text.decode("utf-8") for text in example["captions"]])
        if with_object_labels:
          part["object_labels"].append([int(label) for label in example["labels"]])
        yield example["image"]
      start += counts[split]

  logging.info("building the image cache %s: %s images at %d px (once per host)", path, counts, stored_size)
  try:
    return images.write_cache(path, sum(counts.values()), stored_size, rows(), meta)
  except ValueError as e:
    raise DataError(str(e)) from e


def split_examples(cache: images.ImageCache, split: str, labels_of: Callable[[int, list[str]], np.ndarray],
                   image_size: int, augment: bool) -> Examples:
  """One split of the cache as :class:`Examples` with lazy images.

  Args:
    cache: an opened image cache.
    split: a split held by the cache.
    labels_of: ``(row in the split, its captions) -> int32 labels``.
    image_size: side of the images the view returns.
    augment: random training crops and flips (:meth:`CachedImages.training_batch`).

  Raises:
    DataError: an image has no caption.
  """
  part = cache.meta["splits"][split]
  captions = part["captions"]
  uncaptioned = [part["image_ids"][i] for i, texts in enumerate(captions) if not texts]
  if uncaptioned:
    raise DataError(f"{len(uncaptioned)} images of the {split} split in {cache.path} have no caption "
                    f"(image/id {uncaptioned[:5]}); the dataset is malformed")
  return Examples(
      images=cache.view(split, image_size, augment),
      image_ids=np.asarray(part["image_ids"], np.int64),
      captions=tuple(text for texts in captions for text in texts),
      caption_image=np.repeat(np.arange(len(captions), dtype=np.int64), [len(texts) for texts in captions]),
      labels=tuple(labels_of(i, texts) for i, texts in enumerate(captions)),
  )


def _log_splits(name: str, splits: dict[str, Examples]) -> None:
  for split, examples in splits.items():
    logging.info("%s %s: %d images, %d captions", name, split, len(examples), examples.num_captions)


def _load_flickr30k(data: ml_collections.ConfigDict) -> Dataset:
  data_dir = os.path.expanduser(data.tfds_data_dir)
  builder = prepared_builder("flickr30k", data_dir, os.path.expanduser(data.get("manual_dir", "")))
  cache = image_cache(builder, SPLITS, data.stored_size, os.path.expanduser(data.cache_dir), False)
  splits = {split: split_examples(cache, split, lambda _, texts: flickr30k.concept_labels(texts),
                                  data.image_size, data.augment and split == "train") for split in SPLITS}
  _log_splits("flickr30k", splits)
  for split in SPLITS:
    unmatched = sum(not flickr30k.names_a_group(texts) for texts in cache.meta["splits"][split]["captions"])
    logging.info("flickr30k %s: %d images name no concept group and join %s", split, unmatched,
                 flickr30k.GROUP_NAMES[flickr30k.FALLBACK_GROUP])
  return Dataset("flickr30k", splits, flickr30k.GROUP_NAMES, flickr30k.category_groups())


def _load_coco(data: ml_collections.ConfigDict) -> Dataset:
  data_dir = os.path.expanduser(data.tfds_data_dir)
  builder = prepared_builder("coco", data_dir)
  cache_splits = SPLITS + ("restval",)  # all four, so that data.coco_fold_restval can change without a rebuild
  cache = image_cache(builder, cache_splits, data.stored_size, os.path.expanduser(data.cache_dir), True)

  def labels_of(split: str) -> Callable[[int, list[str]], np.ndarray]:
    object_labels = cache.meta["splits"][split]["object_labels"]
    return lambda row, _: coco.task_labels(object_labels[row])

  parts = {split: split_examples(cache, split, labels_of(split), data.image_size,
                                 data.augment and split in ("train", "restval")) for split in cache_splits}
  splits = {split: parts[split] for split in SPLITS}
  if data.get("coco_fold_restval", True):
    splits["train"] = concatenate([parts["train"], parts["restval"]])
  _log_splits("coco", splits)
  for split, examples in splits.items():
    logging.info("coco %s: %d images without objects (data.unlabeled decides)", split,
                 sum(1 for labels in examples.labels if len(labels) == 0))
  return Dataset("coco", splits, coco.CATEGORY_NAMES, coco.category_groups())
