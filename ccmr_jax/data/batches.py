"""Training batches: image-caption pairs sampled deterministically.

One epoch visits every image of the training data once, in an order drawn
from ``(seed, task, epoch)``, each time with one of its captions picked at
random; the last incomplete batch is dropped so every step sees the same
global batch size. In a multi-host run every process draws the same global
order and keeps only its own contiguous share of each batch.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from ccmr_jax.data.examples import Examples, caption_text_ids
from ccmr_jax.data.images import decode_ahead
from ccmr_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PairSampler:
  """Samples (image, caption) training pairs from one :class:`Examples`.

  Batches are dicts of numpy arrays:
    ``image``: ``uint8 [B, H, W, 3]``; ``tokens``: ``int32 [B, L]``;
    ``image_key`` / ``text_key``: ``int32 [B]``, equal for the same image /
    the same normalised caption text, so the loss never treats a duplicate as
    a negative.
  """

  examples: Examples
  tokens: np.ndarray
  text_keys: np.ndarray
  captions_of_image: tuple[np.ndarray, ...]

  @classmethod
  def create(cls, examples: Examples, tokenizer: Tokenizer) -> "PairSampler":
    order = np.argsort(examples.caption_image, kind="stable")
    bounds = np.searchsorted(examples.caption_image[order], np.arange(len(examples) + 1))
    per_image = tuple(order[bounds[i]:bounds[i + 1]] for i in range(len(examples)))
    if any(len(c) == 0 for c in per_image):
      raise ValueError("every training image needs at least one caption")
    return cls(examples, tokenizer.encode(examples.captions), caption_text_ids(examples.captions), per_image)

  def steps_per_epoch(self, batch_size: int) -> int:
    return len(self.examples) // batch_size

  def epoch(self, batch_size: int, seed: int, task: int, epoch: int,
            process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch (this process's share of each global batch).

    File-backed images (:class:`~ccmr_jax.data.images.CachedImages`) are read
    a few batches ahead, as training crops drawn from ``(seed, task, epoch,
    step)`` when their ``augment`` is on; in-memory images are indexed as is.
    """
    return decode_ahead(self.lazy_epoch(batch_size, seed, task, epoch, process_index, process_count),
                        self.examples.images, (seed, task, epoch))

  def lazy_epoch(self, batch_size: int, seed: int, task: int, epoch: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The batches of :meth:`epoch` before any image is read: file-backed images stay lazy views."""
    steps = self.steps_per_epoch(batch_size)
    if steps == 0:
      raise ValueError(f"batch_size={batch_size} is larger than the {len(self.examples)} training images of task {task}")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
    rng = np.random.default_rng([seed, task, epoch])
    order = rng.permutation(len(self.examples))
    pick = rng.random(len(self.examples))
    share = batch_size // process_count
    for step in range(steps):
      rows = order[step * batch_size + process_index * share:][:share]
      choices = self.captions_of_image
      caption_rows = np.asarray([choices[r][int(pick[r] * len(choices[r]))] for r in rows])
      yield {
          "image": self.examples.images[rows],
          "tokens": self.tokens[caption_rows],
          "image_key": rows.astype(np.int32),
          "text_key": self.text_keys[caption_rows],
      }
