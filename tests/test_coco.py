"""MS-COCO: the category table, the supercategory task split, and the TFDS path under ``mock_data``."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ccmr_jax import experiment
from ccmr_jax.data import coco, images, sources
from ccmr_jax.data.batches import PairSampler
from ccmr_jax.data.task_split import split_into_tasks
from ccmr_jax.data.tokenizer import build_tokenizer
from configs import coco as coco_config

NUM_MOCK_EXAMPLES = 12


def tiny_coco_config(data_dir: str, cache_dir: str):
  config = coco_config.get_config()
  config.data.update(tfds_data_dir=data_dir, cache_dir=cache_dir, num_tasks=2, image_size=16, stored_size=20)
  return config


def test_category_table_matches_coco():
  assert len(coco.CATEGORIES) == 80 and len(set(coco.CATEGORY_NAMES)) == 80
  assert {sup for _, sup in coco.CATEGORIES} == set(coco.SUPERCATEGORIES) and len(coco.SUPERCATEGORIES) == 12
  assert coco.CATEGORY_NAMES[0] == "person" and coco.CATEGORY_NAMES[-1] == "toothbrush"
  assert coco.CATEGORIES[coco.CATEGORY_NAMES.index("dining table")] == ("dining table", "furniture")
  grouped = sorted(c for ids in coco.category_groups().values() for c in ids)
  assert grouped == list(range(80))  # every category in exactly one group
  assert sorted(s for sups in coco.TASK_GROUPS.values() for s in sups) == sorted(coco.SUPERCATEGORIES)


def test_person_votes_only_when_alone():
  dog, cup = coco.CATEGORY_NAMES.index("dog"), coco.CATEGORY_NAMES.index("cup")
  assert coco.task_labels([0, 0, 0, dog, cup, cup]).tolist() == [dog, cup, cup]
  assert coco.task_labels([0, 0]).tolist() == [0, 0]
  assert coco.task_labels([]).tolist() == []
  with pytest.raises(ValueError, match="COCO labels"):
    coco.task_labels([80])


@pytest.fixture
def mocked_coco(monkeypatch):
  """``tfds.testing.mock_data``: random images, captions and labels for every split of coco_captions.

  ``mock_data`` replaces reading but not the check that the dataset is
  prepared, which is patched here.
  """
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    yield


def test_coco_through_tfds_mock_data(mocked_coco, tmp_path):
  config = tiny_coco_config(str(tmp_path / "tfds"), str(tmp_path / "cache"))
  dataset = sources.load_dataset(config)
  assert dataset.category_names == coco.CATEGORY_NAMES
  train, test = dataset.splits["train"], dataset.splits["test"]
  assert train.images.shape == (2 * NUM_MOCK_EXAMPLES, 16, 16, 3)  # train + restval
  assert test.images.shape == (NUM_MOCK_EXAMPLES, 16, 16, 3) and np.asarray(test.images).dtype == np.uint8
  assert images.is_lazy(train.images) and train.images.augment and not test.images.augment
  assert train.num_captions >= 5 * len(train) and all(len(labels) for labels in train.labels)

  stream = split_into_tasks(dataset, config.data.num_tasks, config.data.unlabeled)
  assert [task.name for task in stream.tasks] == ["vehicles_outdoor+animals+people_sports", "food_kitchen+home"]
  assert sum(len(task.splits["test"]) for task in stream.tasks) == NUM_MOCK_EXAMPLES
  first = stream.tasks[0].splits["train"]
  assert images.is_lazy(first.images)  # the task split reads no image

  tokenizer = build_tokenizer(first.captions, max_length=8, num_oov_buckets=4)
  batch = next(PairSampler.create(first, tokenizer).epoch(4, seed=0, task=0, epoch=0))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert batch["tokens"].shape == (4, 8)

  cache_folder = tmp_path / "cache" / "coco_captions-2014-1.1.0-20px"
  assert images.open_cache(str(cache_folder)).images.shape == (4 * NUM_MOCK_EXAMPLES, 20, 20, 3)
  built = cache_folder.stat().st_mtime_ns
  sources.load_dataset(config)  # a second start opens the cache instead of rebuilding it
  assert cache_folder.stat().st_mtime_ns == built


def test_restval_can_stay_out_of_train(mocked_coco, tmp_path):
  config = tiny_coco_config(str(tmp_path / "tfds"), str(tmp_path / "cache"))
  config.data.coco_fold_restval = False
  assert len(sources.load_dataset(config).splits["train"]) == NUM_MOCK_EXAMPLES


def test_absent_coco_stops_before_training_with_the_commands(tmp_path):
  config = tiny_coco_config(str(tmp_path / "empty"), str(tmp_path / "cache"))
  with pytest.raises(experiment.UserError) as raised:
    experiment.run(config, str(tmp_path / "work"))
  message = str(raised.value)
  for expected in ("coco_captions/2014", "python -m ccmr_jax.data.prepare --dataset=coco",
                   "tfds build coco_captions/2014", f"--config.data.tfds_data_dir={tmp_path / 'empty'}"):
    assert expected in message


def test_a_cache_that_no_longer_matches_the_dataset_is_refused(mocked_coco, tmp_path):
  config = tiny_coco_config(str(tmp_path / "tfds"), str(tmp_path / "cache"))
  sources.load_dataset(config)
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES - 2):
    with pytest.raises(sources.DataError, match="does not match the TFDS dataset .* delete"):
      sources.load_dataset(config)


def test_an_undecodable_image_is_a_clear_error(monkeypatch, tmp_path):
  import tensorflow as tf

  def as_dataset(self, split, **kwargs):
    def example(i):
      image = tf.io.decode_jpeg(tf.where(i == 1, tf.constant(b"not a jpeg"), tf.io.encode_jpeg(tf.zeros((4, 6, 3),
                                                                                                    tf.uint8))))
      return {"image": image, "image/id": tf.cast(i, tf.int64), "captions": {"text": tf.constant(["a cat"])},
              "objects": {"label": tf.constant([15], tf.int64)}}
    return tf.data.Dataset.range(3).map(example).apply(tf.data.experimental.assert_cardinality(3))

  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    with pytest.raises(sources.DataError, match="train: example 1 cannot be read .* prepare the dataset again"):
      sources.load_dataset(tiny_coco_config(str(tmp_path / "tfds"), str(tmp_path / "cache")))
  assert os.listdir(tmp_path / "cache") == []  # the half-written cache was removed
