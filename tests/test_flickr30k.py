"""Flickr30K: concept groups, the TFDS builder on a tiny fake download, the real config path, bad data."""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ccmr_jax import experiment
from ccmr_jax.data import flickr30k, images, prepare, sources
from ccmr_jax.data.task_split import assign_tasks
from configs import flickr as flickr_config
from fake_flickr30k import write_fake_flickr30k

# 2 tasks: animals+vehicles+sports, then water+people_street (which also takes captions naming no group).
LAYOUT = ([("train", "animals")] * 8 + [("train", "street")] * 4 + [("train", "none")] * 4
          + [("val", "animals"), ("val", "street"), ("test", "animals"), ("test", "none")])
SMALL_LAYOUT = [("train", "animals"), ("train", "street"), ("val", "animals"), ("test", "none")]


def tiny_flickr_config(data_dir: str, cache_dir: str):
  """configs/flickr.py with a tiny ResNet and Transformer, 32 px crops of 36 px images, 2 tasks."""
  config = flickr_config.get_config()
  config.data.update(tfds_data_dir=data_dir, cache_dir=cache_dir, num_tasks=2, image_size=32, stored_size=36)
  config.tokenizer.update(max_length=12, num_oov_buckets=8)
  config.model.update(embed_dim=16, dtype="float32")
  config.model.resnet.update(stage_sizes=(1,), width=4, groups=2)
  config.model.transformer.update(width=16, depth=1, heads=2)
  config.train.update(batch_size=8, epochs_per_task=1, warmup_steps=1, log_every=1)
  config.eval.batch_size = 8
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The fake Flickr30K built through the real builder: (data_dir, manual_dir)."""
  root = tmp_path_factory.mktemp("flickr30k")
  manual_dir = write_fake_flickr30k(str(root / "manual"), LAYOUT, grayscale_rows=[3])
  data_dir = str(root / "tfds")
  prepare.prepare("flickr30k", data_dir, manual_dir)
  return data_dir, manual_dir


def test_concept_groups_are_disjoint_and_votes_follow_the_rules():
  words = [w for group in flickr30k.CONCEPT_GROUPS.values() for w in group]
  assert len(words) == len(set(words))
  animals, water = flickr30k.GROUP_NAMES.index("animals"), flickr30k.GROUP_NAMES.index("water")
  assert flickr30k.concept_labels(["A dog on the beach."]).tolist() == [animals, water]  # tie: earlier group
  votes = flickr30k.concept_labels(["Surfers ride a wave", "a dog watches the surfer"])
  assert np.bincount(votes).argmax() == water  # 3 water words against 1 animal
  assert flickr30k.concept_labels(["A woman cooks dinner"]).tolist() == [flickr30k.FALLBACK_GROUP]
  assert not flickr30k.names_a_group(["A woman cooks dinner"])


def test_builder_writes_coco_captions_features(prepared):
  data_dir, _ = prepared
  builder = sources.prepared_builder("flickr30k", data_dir)
  assert {s: builder.info.splits[s].num_examples for s in ("train", "val", "test")} == {"train": 16, "val": 2,
                                                                                         "test": 2}
  coco_features = tfds.builder("coco_captions", data_dir=data_dir).info.features
  for name in ("image", "image/id", "image/filename"):
    assert repr(builder.info.features[name]) == repr(coco_features[name])
  assert repr(builder.info.features["captions"]) == repr(coco_features["captions"])
  example = next(iter(tfds.as_numpy(builder.as_dataset(split="train").filter(lambda e: e["image/id"] == 3))))
  assert example["image"].shape == (30, 30, 3)  # the grayscale JPEG, stored as RGB
  assert example["image/filename"] == b"1003.jpg"
  assert example["captions"]["id"].tolist() == list(range(15, 20))


def test_the_image_cache_is_built_without_tfds_auto_cache(prepared, tmp_path, monkeypatch):
  """TFDS would keep every decoded image of a dataset under 250 MiB in memory, and the heap keeps its peak."""
  data_dir, _ = prepared
  read_configs = []
  as_dataset = tfds.core.DatasetBuilder.as_dataset

  def recording_as_dataset(self, *args, read_config=None, **kwargs):
    read_configs.append(read_config)
    return as_dataset(self, *args, read_config=read_config, **kwargs)

  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", recording_as_dataset)
  dataset = sources.load_dataset(tiny_flickr_config(data_dir, str(tmp_path / "cache")))
  assert len(read_configs) == 3 and all(config is not None and not config.try_autocache for config in read_configs)
  assert [len(dataset.splits[split]) for split in ("train", "val", "test")] == [16, 2, 2]


def test_one_training_step_and_evaluation_through_the_flickr_config(prepared, tmp_path):
  data_dir, _ = prepared
  config = tiny_flickr_config(data_dir, str(tmp_path / "cache"))
  results = experiment.run(config, str(tmp_path / "work"))
  tasks = results["tasks"]
  assert [t["name"] for t in tasks] == ["animals+vehicles+sports", "water+people_street"]
  assert [t["counts"]["train"]["images"] for t in tasks] == [8, 8]
  assert [t["counts"]["test"]["images"] for t in tasks] == [1, 1]
  assert results["tasks_trained"] == 2
  assert None not in results["policies"]["reindex"]["mean_r1"]["matrix"][1]
  cache = images.open_cache(str(tmp_path / "cache" / "flickr30k-1.0.0-36px"))
  assert cache.images.shape == (20, 36, 36, 3)


def test_dataset_views_are_lazy_and_the_split_is_by_concepts(prepared, tmp_path):
  data_dir, _ = prepared
  dataset = sources.load_dataset(tiny_flickr_config(data_dir, str(tmp_path / "cache")))
  train = dataset.splits["train"]
  assert images.is_lazy(train.images) and train.images.augment and not dataset.splits["test"].images.augment
  assert train.images.shape == (16, 32, 32, 3) and train.num_captions == 80
  groups = assign_tasks(train.labels, np.arange(len(flickr30k.GROUP_NAMES)))
  assert np.bincount(groups, minlength=5).tolist() == [8, 0, 0, 0, 8]  # animals, ..., people_street


def test_absent_data_stops_before_training_with_the_files_and_commands(tmp_path):
  config = tiny_flickr_config(str(tmp_path / "empty"), str(tmp_path / "cache"))
  with pytest.raises(experiment.UserError) as raised:
    experiment.run(config, str(tmp_path / "work"))
  message = str(raised.value)
  for expected in ("dataset_flickr30k.json", "flickr30k-images/", "python -m ccmr_jax.data.prepare --dataset=flickr30k",
                   "tfds build flickr30k --imports=ccmr_jax.data.flickr30k_builder",
                   f"--config.data.tfds_data_dir={tmp_path / 'empty'}"):
    assert expected in message
  assert not os.path.exists(tmp_path / "work" / "snapshots")


def test_missing_tensorflow_datasets_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(sources.DataError, match=r"pip install 'ccmr_jax\[data\]'"):
    sources.load_dataset(tiny_flickr_config(str(tmp_path), str(tmp_path / "cache")))


def test_images_in_an_archive_build_too(tmp_path):
  manual_dir = write_fake_flickr30k(str(tmp_path / "manual"), SMALL_LAYOUT, archive=True)
  assert not os.path.exists(os.path.join(manual_dir, "flickr30k-images"))
  prepare.prepare("flickr30k", str(tmp_path / "tfds"), manual_dir)
  assert sources.prepared_builder("flickr30k", str(tmp_path / "tfds")).info.splits["val"].num_examples == 1


def _rewrite_json(manual_dir: str, edit) -> None:
  path = os.path.join(manual_dir, "dataset_flickr30k.json")
  with open(path) as f:
    document = json.load(f)
  edit(document)
  with open(path, "w") as f:
    json.dump(document, f)


@pytest.mark.parametrize("damage, expected", [
    (lambda d: os.remove(os.path.join(d, "dataset_flickr30k.json")), r"dataset_flickr30k\.json does not exist"),
    (lambda d: open(os.path.join(d, "dataset_flickr30k.json"), "w").write('{"images": [{"filename"'),
     "is not valid JSON"),
    (lambda d: _rewrite_json(d, lambda doc: doc["images"][1].pop("sentences")),
     r"images\[1\] needs a field 'sentences'"),
    (lambda d: _rewrite_json(d, lambda doc: doc["images"][2].update(split="holdout")),
     r"images\[2\] has split 'holdout'"),
    (lambda d: _rewrite_json(d, lambda doc: doc["images"][3].update(split="val")),
     r"no image in the split\(s\) \['test'\]"),
    (lambda d: os.remove(os.path.join(d, "flickr30k-images", "1001.jpg")), r"1 of the images .* e\.g\. 1001\.jpg"),
    (lambda d: open(os.path.join(d, "flickr30k-images", "1002.jpg"), "wb").write(b"\xff\xd8\xff\xe0 not a jpeg"),
     r"1002\.jpg is not a readable image"),
], ids=["no_json", "malformed_json", "missing_field", "unknown_split", "empty_split", "missing_image",
        "unreadable_image"])
def test_bad_manual_files_stop_the_build_with_a_clear_error(tmp_path, damage, expected):
  manual_dir = write_fake_flickr30k(str(tmp_path / "manual"), SMALL_LAYOUT)
  damage(manual_dir)
  with pytest.raises(sources.DataError, match=expected):
    prepare.prepare("flickr30k", str(tmp_path / "tfds"), manual_dir)
  with pytest.raises(sources.DataError, match="not prepared"):
    sources.prepared_builder("flickr30k", str(tmp_path / "tfds"))


def test_prepare_needs_an_existing_manual_dir(tmp_path):
  with pytest.raises(sources.DataError, match="is not a folder"):
    prepare.prepare("flickr30k", str(tmp_path / "tfds"), str(tmp_path / "nowhere"))
