"""File-backed images: the cache, lazy views, training crops, decode-ahead, and the samplers over them."""

import collections
import dataclasses
import json
import os

import flax.linen as nn
import numpy as np
import pytest

from ccmr_jax import evaluate, sharding
from ccmr_jax.continual.replay import MixedSampler
from ccmr_jax.data import images
from ccmr_jax.data.batches import PairSampler
from ccmr_jax.data.examples import Examples, concatenate
from ccmr_jax.data.tokenizer import build_tokenizer
from conftest import make_examples

STORED, SIZE = 10, 8
shutil_usage = collections.namedtuple("usage", "total used free")


def _store(n=12, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, STORED, STORED, 3), dtype=np.uint8)


def _lazy_examples(store, augment=False):
  """``make_examples`` with its images replaced by a view of ``store`` (same rows)."""
  plain = make_examples([[i % 2] for i in range(len(store))], captions_per_image=2)
  return dataclasses.replace(plain, images=images.CachedImages(store, np.arange(len(store)), SIZE, augment))


def _center(store):
  return store[:, 1:1 + SIZE, 1:1 + SIZE]


def test_views_read_nothing_until_asked_and_return_center_crops():
  store = _store()
  view = images.CachedImages(store, np.arange(12), SIZE)
  assert view.shape == (12, SIZE, SIZE, 3) and view.dtype == np.uint8 and view.ndim == 4 and len(view) == 12
  rows = np.array([5, 2, 2])
  picked = view[rows]
  assert isinstance(picked, images.CachedImages) and picked.rows.tolist() == [5, 2, 2]
  assert isinstance(view[3:6], images.CachedImages)
  np.testing.assert_array_equal(np.asarray(picked), _center(store)[rows])
  np.testing.assert_array_equal(view[7], _center(store)[7])
  joined = np.concatenate([view[:2], view[10:]])
  assert isinstance(joined, images.CachedImages) and joined.rows.tolist() == [0, 1, 10, 11]
  with pytest.raises(TypeError, match="same image cache"):
    np.concatenate([view[:2], images.CachedImages(_store(), np.arange(2), SIZE)])


def test_examples_subset_and_concatenate_stay_lazy():
  examples = _lazy_examples(_store())
  part = examples.subset([4, 1])
  assert isinstance(part.images, images.CachedImages) and part.images.rows.tolist() == [4, 1]
  both = concatenate([part, examples.subset([7])])
  assert both.images.rows.tolist() == [4, 1, 7] and both.caption_image.tolist() == [0, 0, 1, 1, 2, 2]


def test_training_crops_are_windows_of_the_stored_images_flipped_at_random():
  store = _store(n=64)
  view = images.CachedImages(store, np.arange(64), SIZE, augment=True)
  batch = view.training_batch((0, 1, 2, 3))
  np.testing.assert_array_equal(batch, view.training_batch((0, 1, 2, 3)))
  assert not np.array_equal(batch, view.training_batch((0, 1, 2, 4)))
  flipped = 0
  for image, stored in zip(batch, store):
    windows = [stored[t:t + SIZE, l:l + SIZE] for t in range(3) for l in range(3)]
    straight = any(np.array_equal(image, w) for w in windows)
    mirrored = any(np.array_equal(image, w[:, ::-1]) for w in windows)
    assert straight or mirrored
    flipped += mirrored and not straight
  assert 16 < flipped < 48
  np.testing.assert_array_equal(dataclasses.replace(view, augment=False).training_batch((0,)), _center(store))


def test_decode_ahead_keeps_order_appends_the_step_and_raises_when_due():
  view = images.CachedImages(_store(), np.arange(12), SIZE, augment=True)
  batches = [{"image": view[3 * s:3 * s + 3], "step": s} for s in range(4)]
  out = list(images.decode_ahead(iter(batches), view, (7, 0, 1), depth=2))
  assert [b["step"] for b in out] == [0, 1, 2, 3]
  for s, batch in enumerate(out):
    np.testing.assert_array_equal(batch["image"], view[3 * s:3 * s + 3].training_batch((7, 0, 1, s)))

  def failing():
    yield {"image": view[:2]}
    yield {"image": dataclasses.replace(view[:2], rows=np.array([99]))}
  stream = images.decode_ahead(failing(), view, (0,))
  assert next(stream)["image"].shape == (2, SIZE, SIZE, 3)
  with pytest.raises(IndexError):
    next(stream)

  arrays = iter([{"image": np.zeros((2, 4, 4, 3), np.uint8)}])
  assert images.decode_ahead(arrays, np.zeros((2, 4, 4, 3), np.uint8), (0,)) is arrays  # in memory: untouched


def test_samplers_over_lazy_images_match_the_same_images_in_memory():
  store = _store(n=16)
  lazy = _lazy_examples(store)
  eager = dataclasses.replace(lazy, images=np.asarray(lazy.images))
  tokenizer = build_tokenizer(lazy.captions, 8, 4)
  memory_rows = [3, 9, 12]
  for make in (lambda e: PairSampler.create(e, tokenizer),
               lambda e: MixedSampler.create(e.subset(range(10)), e.subset(memory_rows), tokenizer, 0.25)):
    for from_lazy, from_eager in zip(make(lazy).epoch(4, 0, 1, 2), make(eager).epoch(4, 0, 1, 2)):
      assert set(from_lazy) == set(from_eager)
      for key in from_lazy:
        np.testing.assert_array_equal(from_lazy[key], from_eager[key])


def test_augmented_batches_are_deterministic_per_seed_task_epoch():
  lazy = _lazy_examples(_store(n=16), augment=True)
  sampler = PairSampler.create(lazy, build_tokenizer(lazy.captions, 8, 4))
  first = [b["image"] for b in sampler.epoch(4, 0, 1, 2)]
  again = [b["image"] for b in sampler.epoch(4, 0, 1, 2)]
  other = [b["image"] for b in sampler.epoch(4, 0, 1, 3)]
  assert all(isinstance(b, np.ndarray) and b.shape == (4, SIZE, SIZE, 3) for b in first)
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))


class _PixelEmbedder(nn.Module):
  """Embeds an image as its first 16 pixel values scaled to [0, 1], a caption as its tokens (no parameters)."""

  def encode_image(self, images):
    return images.reshape(len(images), -1)[:, :16].astype(np.float32) / 255.0

  def encode_text(self, tokens):
    return tokens.astype(np.float32)


def test_embedder_reads_lazy_images_batch_by_batch_with_the_same_result(devices):
  model = _PixelEmbedder()
  embed_images = evaluate.make_embedders(model, sharding.make_mesh(), batch_size=8).images
  lazy = images.CachedImages(_store(n=13), np.arange(13), SIZE)
  from_lazy = embed_images({}, lazy)
  np.testing.assert_array_equal(from_lazy, embed_images({}, np.asarray(lazy)))
  np.testing.assert_allclose(from_lazy, np.asarray(lazy).reshape(13, -1)[:, :16] / 255.0, rtol=1e-6)


def test_cache_is_written_all_or_nothing_and_reopened(tmp_path):
  store = _store(n=5)
  path = str(tmp_path / "cache" / "toy")
  meta = {"splits": {"train": {"rows": [0, 3]}, "test": {"rows": [3, 5]}}}
  with pytest.raises(ValueError, match="yielded 4 images but announced 5"):
    images.write_cache(path, 5, STORED, iter(store[:4]), meta)
  with pytest.raises(ValueError, match="has shape"):
    images.write_cache(path, 5, STORED, iter(store[:, :4]), meta)
  assert os.listdir(tmp_path / "cache") == [] and images.open_cache(path) is None
  cache = images.write_cache(path, 5, STORED, iter(store), meta)
  np.testing.assert_array_equal(cache.images, store)
  test = cache.view("test", SIZE)
  assert test.rows.tolist() == [3, 4] and not test.augment and cache.view("train", SIZE, augment=True).augment
  np.testing.assert_array_equal(images.open_cache(path).images, store)

  with open(os.path.join(path, images.META_FILE)) as f:
    broken = json.load(f)
  broken["num_images"] = 6
  with open(os.path.join(path, images.META_FILE), "w") as f:
    json.dump(broken, f)
  with pytest.raises(ValueError, match="delete that folder"):
    images.open_cache(path)


def test_the_cache_is_written_without_mapping_it_into_the_process(tmp_path):
  """A writable memory map would hold the whole cache resident (6.2 GB for Flickr30K) until it is closed."""
  store = _store(n=5)
  mapped = []

  def rows():
    for image in store:
      with open("/proc/self/maps") as f:
        mapped.extend(line for line in f if images.IMAGES_FILE in line)
      yield image

  cache = images.write_cache(str(tmp_path / "toy"), 5, STORED, rows(), {})
  assert mapped == []
  expected = np.lib.format.open_memmap(str(tmp_path / "expected.npy"), mode="w+", dtype=np.uint8, shape=store.shape)
  expected[:] = store
  expected.flush()
  del expected
  with open(os.path.join(cache.path, images.IMAGES_FILE), "rb") as f, open(tmp_path / "expected.npy", "rb") as g:
    assert f.read() == g.read()  # the file numpy's own writer makes


def test_a_cache_that_does_not_fit_on_the_disk_is_refused_before_writing(tmp_path, monkeypatch):
  monkeypatch.setattr(images.shutil, "disk_usage", lambda path: shutil_usage(total=10**6, used=10**6 - 100, free=100))
  with pytest.raises(ValueError, match="needs 0.0 GB but .* free; free space or set data.cache_dir"):
    images.write_cache(str(tmp_path / "toy"), 5, STORED, iter(_store(n=5)), {})
  assert os.listdir(tmp_path) == []


def test_views_refuse_impossible_sizes():
  with pytest.raises(ValueError, match="at most|in \\[1"):
    images.CachedImages(_store(), np.arange(2), STORED + 1)
  with pytest.raises(ValueError, match="uint8"):
    images.CachedImages(np.zeros((2, 4, 5, 3), np.uint8), np.arange(2), 4)


def test_examples_accept_views():
  view = images.CachedImages(_store(n=2), np.arange(2), SIZE)
  examples = Examples(view, np.arange(2), ("a", "b"), np.arange(2), (np.zeros(0, np.int32),) * 2)
  assert len(examples) == 2
