"""A tiny fake Flickr30K download (Karpathy JSON + generated JPEGs) for the tests."""

from __future__ import annotations

import json
import os
import tarfile
from typing import Sequence

import numpy as np
from PIL import Image

CAPTIONS = {
    "animals": "a brown dog runs across the grass",
    "street": "two men talk on a busy city street",
    "none": "a woman cooks dinner at home",
}


def write_fake_flickr30k(folder: str, layout: Sequence[tuple[str, str]], archive: bool = False,
                         grayscale_rows: Sequence[int] = ()) -> str:
  """Writes ``folder/dataset_flickr30k.json`` and one small JPEG per ``(split, caption kind)``.

  Image ``i`` is ``{1000 + i}.jpg`` (``imgid`` ``i``) with 5 captions
  ``"{CAPTIONS[kind]} {j}"``. With ``archive`` the images are in
  ``flickr30k-images.tar.gz`` instead of the folder ``flickr30k-images/``.

  Returns:
    ``folder`` (the manual_dir).
  """
  rng = np.random.default_rng(0)
  image_dir = os.path.join(folder, "flickr30k-images")
  os.makedirs(image_dir, exist_ok=True)
  entries = []
  for i, (split, kind) in enumerate(layout):
    name = f"{1000 + i}.jpg"
    pixels = rng.integers(0, 256, size=(24 + 2 * i, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    (image.convert("L") if i in grayscale_rows else image).save(os.path.join(image_dir, name), quality=90)
    entries.append({"filename": name, "imgid": i, "split": split, "sentids": list(range(5 * i, 5 * i + 5)),
                    "sentences": [{"raw": f"{CAPTIONS[kind]} {j}", "sentid": 5 * i + j, "imgid": i, "tokens": []}
                                  for j in range(5)]})
  with open(os.path.join(folder, "dataset_flickr30k.json"), "w") as f:
    json.dump({"images": entries, "dataset": "flickr30k"}, f)
  if archive:
    with tarfile.open(os.path.join(folder, "flickr30k-images.tar.gz"), "w:gz") as tar:
      tar.add(image_dir, arcname="flickr30k-images")
    for name in os.listdir(image_dir):
      os.remove(os.path.join(image_dir, name))
    os.rmdir(image_dir)
  return folder
