import numpy as np

from ccmr_jax.data.examples import normalize_caption
from ccmr_jax.data.scenes import SceneSpec, category_table, make_scenes

SMALL = SceneSpec(num_train=120, num_val=20, num_test=40, seed=3)


def test_same_seed_same_data_and_other_seed_differs():
  a, b = make_scenes(SMALL), make_scenes(SMALL)
  c = make_scenes(SceneSpec(num_train=120, num_val=20, num_test=40, seed=4))
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(a.splits[split].images, b.splits[split].images)
    assert a.splits[split].captions == b.splits[split].captions
  assert not np.array_equal(a.splits["train"].images, c.splits["train"].images)


def test_images_captions_and_labels_are_well_formed():
  data = make_scenes(SMALL)
  names, groups, _ = category_table()
  assert len(names) == 20 and len(groups) == 5
  train = data.splits["train"]
  assert train.images.shape == (120, 64, 64, 3) and train.images.dtype == np.uint8
  for row in range(len(train)):
    texts = [train.captions[i] for i in np.flatnonzero(train.caption_image == row)]
    assert len(texts) == 5 and len(set(texts)) == 5, texts
    assert 1 <= len(train.labels[row]) <= 3
    assert all(0 <= label < 20 for label in train.labels[row])
  # Splits are disjoint by image id.
  ids = [set(data.splits[s].image_ids.tolist()) for s in ("train", "val", "test")]
  assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_objects_are_drawn_and_captions_name_them():
  data = make_scenes(SMALL)
  train = data.splits["train"]
  _, _, synonyms = category_table()
  for row in range(20):
    # Objects are painted in flat colours over a noisy background: many pixels stand far from it.
    image = train.images[row].astype(int)
    background = np.median(image.reshape(-1, 3), axis=0)
    assert (np.abs(image - background).max(-1) > 30).sum() >= 15
    words = " ".join(normalize_caption(train.captions[i]) for i in np.flatnonzero(train.caption_image == row))
    assert any(s in words for label in train.labels[row] for s in synonyms[label])


def test_retrieval_is_not_trivial_identical_captions_occur():
  test = make_scenes(SceneSpec(num_train=10, num_val=10, num_test=400, seed=0)).splits["test"]
  texts = [normalize_caption(c) for c in test.captions]
  owners: dict[str, set] = {}
  for text, row in zip(texts, test.caption_image):
    owners.setdefault(text, set()).add(int(row))
  assert any(len(rows) > 1 for rows in owners.values())
