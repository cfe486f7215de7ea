"""TFDS builder for Flickr30K with Karpathy's splits, from manually downloaded files.

TFDS has no Flickr30K builder, and the images cannot be downloaded without
accepting their terms, so this builder reads a ``manual_dir`` holding:

  ``dataset_flickr30k.json``  Karpathy's split file (in ``caption_datasets.zip``
                              from https://cs.stanford.edu/people/karpathy/deepimagesent/)
  the 31,783 JPEG images      a folder (any name, e.g. ``flickr30k-images/``; nested
                              folders are searched) or one archive of it
                              (``.tar``, ``.tar.gz``, ``.tgz`` or ``.zip``)

and writes the splits ``train`` / ``val`` / ``test`` (29,000 / 1,014 / 1,000
images, 5 captions each) with the features of TFDS ``coco_captions`` that
retrieval uses, so one pipeline reads both:

  ``image``           JPEG, ``uint8 [H, W, 3]``
  ``image/id``        int64: the JSON's ``imgid``
  ``image/filename``  the JSON's ``filename``
  ``captions``        sequence of ``{"id": sentid (int64), "text": raw caption}``

Build it (after ``pip install 'ccmr_jax[data]'``)::

  python -m ccmr_jax.data.prepare --dataset=flickr30k --manual_dir=DIR --data_dir=~/tensorflow_datasets

or, with the TFDS command line (in TFDS 4.9.10 it starts only with ``apache-beam`` and
``mlcroissant`` installed)::

  tfds build flickr30k --imports=ccmr_jax.data.flickr30k_builder --manual_dir=DIR

Bad data stops the build with a message naming the problem, never a silently
smaller dataset: a missing or malformed JSON (which entry, which field), an
image named in the JSON but absent (the first few names and how many), or
an image that does not decode completely (its path). Images that decode but
are not RGB JPEGs (grayscale, CMYK, PNG) are converted to RGB and stored as
JPEG (quality 95); the build logs how many.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

SPLIT_FILE = "dataset_flickr30k.json"
SPLITS = ("train", "val", "test")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
_MISSING_SHOWN = 5

_CITATION = """\
@article{young2014image,
  title={From image descriptions to visual denotations},
  author={Young, Peter and Lai, Alice and Hodosh, Micah and Hockenmaier, Julia},
  journal={Transactions of the Association for Computational Linguistics},
  volume={2}, pages={67--78}, year={2014}
}
@inproceedings{karpathy2015deep,
  title={Deep visual-semantic alignments for generating image descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li},
  booktitle={CVPR}, pages={3128--3137}, year={2015}
}
"""


class Flickr30kError(ValueError):
  """The manual files of Flickr30K are missing or malformed; the message says which and how."""


def read_split_file(path: str) -> dict[str, list[dict[str, Any]]]:
  """Reads and checks Karpathy's ``dataset_flickr30k.json``.

  Returns:
    ``{split: [{"filename", "imgid", "captions": [(sentid, raw), ...]}, ...]}``
    for ``train``, ``val`` and ``test``, in file order.

  Raises:
    Flickr30kError: the file is absent, not JSON, a split has no image, or
      an entry lacks a field, has a field of the wrong type, an unknown
      split, no caption, or repeats a filename or an ``imgid``.
  """
  if not os.path.isfile(path):
    raise Flickr30kError(f"{path} does not exist: put Karpathy's {SPLIT_FILE} (from caption_datasets.zip, "
                         "https://cs.stanford.edu/people/karpathy/deepimagesent/) in the manual_dir")
  try:
    with open(path, encoding="utf-8") as f:
      document = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise Flickr30kError(f"{path} is not valid JSON ({e}); download {SPLIT_FILE} again") from e
  if not isinstance(document, dict) or not isinstance(document.get("images"), list):
    raise Flickr30kError(f"{path} must be a JSON object with a list 'images' (Karpathy's format)")
  splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
  filenames, image_ids = set(), set()
  for position, entry in enumerate(document["images"]):
    where = f"{path}: images[{position}]"
    if not isinstance(entry, dict):
      raise Flickr30kError(f"{where} is not an object")
    for field, kind in (("filename", str), ("imgid", int), ("split", str), ("sentences", list)):
      if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
        raise Flickr30kError(f"{where} needs a field '{field}' of type {kind.__name__}, got {entry.get(field)!r:.80}")
    if entry["split"] not in SPLITS:
      raise Flickr30kError(f"{where} has split {entry['split']!r}; expected one of {list(SPLITS)}")
    if not entry["sentences"]:
      raise Flickr30kError(f"{where} ({entry['filename']}) has no caption")
    captions = []
    for number, sentence in enumerate(entry["sentences"]):
      if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str) \
          or not isinstance(sentence.get("sentid"), int):
        raise Flickr30kError(f"{where}.sentences[{number}] needs a string 'raw' and an integer 'sentid'")
      captions.append((sentence["sentid"], sentence["raw"]))
    if entry["filename"] in filenames or entry["imgid"] in image_ids:
      raise Flickr30kError(f"{where} repeats filename {entry['filename']!r} or imgid {entry['imgid']}")
    filenames.add(entry["filename"])
    image_ids.add(entry["imgid"])
    splits[entry["split"]].append({"filename": entry["filename"], "imgid": entry["imgid"], "captions": captions})
  empty = [split for split, entries in splits.items() if not entries]
  if empty:
    raise Flickr30kError(f"{path} has no image in the split(s) {empty}; Karpathy's file has all of {list(SPLITS)}")
  return splits


def find_images(root: str) -> dict[str, str]:
  """``{file name: path}`` of every JPEG under ``root`` (any depth)."""
  found = {}
  for folder, _, names in os.walk(root):
    for name in names:
      if name.lower().endswith(IMAGE_SUFFIXES):
        found.setdefault(name, os.path.join(folder, name))
  return found


def checked_jpeg(path: str) -> tuple[bytes, bool]:
  """The bytes to store for the image at ``path`` and whether it had to be converted.

  Raises:
    Flickr30kError: the file does not decode completely.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format == "JPEG" and image.mode == "RGB":
        return data, False
      converted = io.BytesIO()
      image.convert("RGB").save(converted, format="JPEG", quality=95)
      return converted.getvalue(), True
  except (OSError, SyntaxError, ValueError) as e:
    raise Flickr30kError(f"{path} is not a readable image ({e}); replace it with the original file "
                         "from the Flickr30K download") from e


class Flickr30k(tfds.core.GeneratorBasedBuilder):
  """Flickr30K images with 5 captions each, Karpathy's train / val / test splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Karpathy splits; features aligned with coco_captions."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Put in the manual_dir (default ~/tensorflow_datasets/downloads/manual/):
    {SPLIT_FILE}   Karpathy's split file, from caption_datasets.zip at
                   https://cs.stanford.edu/people/karpathy/deepimagesent/
    the Flickr30K images: a folder (e.g. flickr30k-images/) or its archive (.tar, .tar.gz, .tgz, .zip),
                   from the Flickr30K authors (https://shannon.cs.illinois.edu/DenotationGraph/)
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Flickr30K: 31,783 Flickr photos of everyday scenes, 5 captions each, "
                    "with Karpathy's train / val / test splits (29,000 / 1,014 / 1,000).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/id": np.int64,
            "image/filename": tfds.features.Text(),
            "captions": tfds.features.Sequence({"id": np.int64, "text": np.str_}),
        }),
        homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = read_split_file(os.path.join(manual_dir, SPLIT_FILE))
    images = find_images(manual_dir)
    if not any(entry["filename"] in images for entries in splits.values() for entry in entries):
      archives = sorted(name for name in os.listdir(manual_dir) if name.lower().endswith(ARCHIVE_SUFFIXES))
      for archive in archives:
        images.update(find_images(os.fspath(dl_manager.extract(os.path.join(manual_dir, archive)))))
    missing = [entry["filename"] for entries in splits.values() for entry in entries if entry["filename"] not in images]
    if missing:
      raise Flickr30kError(
          f"{len(missing)} of the images named in {SPLIT_FILE} are in neither a folder nor an archive "
          f"({', '.join(ARCHIVE_SUFFIXES)}) of the manual_dir {manual_dir}, e.g. "
          f"{', '.join(missing[:_MISSING_SHOWN])}; put all the Flickr30K images there")
    for split, entries in splits.items():
      logging.info("flickr30k %s: %d images, %d captions", split, len(entries),
                   sum(len(entry["captions"]) for entry in entries))
    return {split: self._generate_examples(entries, images) for split, entries in splits.items()}

  def _generate_examples(self, entries: list[dict[str, Any]], images: dict[str, str]) -> Iterator[tuple[str, dict]]:
    converted = 0
    for entry in entries:
      data, was_converted = checked_jpeg(images[entry["filename"]])
      converted += was_converted
      yield entry["filename"], {
          "image": data,
          "image/id": entry["imgid"],
          "image/filename": entry["filename"],
          "captions": [{"id": sentid, "text": text} for sentid, text in entry["captions"]],
      }
    if converted:
      logging.info("flickr30k: %d images were not RGB JPEGs and were stored converted", converted)
