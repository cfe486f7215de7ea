"""The jax side of evaluation: a task's queries against its gallery, the union gallery, approximate indexes."""

import ml_collections
import numpy as np
import pytest

from ccmr_jax import evaluate, exact, index, metrics
from ccmr_jax.evaluate import Searchers
from ccmr_jax.policies import EmbeddedSplit
from conftest import captioned_examples


def test_query_gallery_with_exact_search_and_ties():
  truth = metrics.GroundTruth.from_examples(captioned_examples([["a"], ["b"], ["b"]]))
  images = np.eye(3, 4, dtype=np.float32)
  # Captions "b" of images 1 and 2 are identical texts with identical vectors: a tie that cannot matter.
  captions = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], np.float32)
  split = EmbeddedSplit(images, captions)
  searchers = Searchers(index.build_searcher(images, 10), index.build_searcher(captions, 10))
  m = evaluate.query_gallery(split, searchers, split, truth, ks=(1, 5, 10))
  assert m["i2t_r1"] == pytest.approx(100 * 2 / 3)  # image 2's vector matches nothing; others hit
  assert m["t2i_r1"] == pytest.approx(100.0)  # both "b" queries: image 1 first, and it has text "b"
  assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_union_gallery_search_counts_only_true_matches_across_tasks():
  task0 = captioned_examples([["a red circle"], ["a blue square"]])
  task1 = captioned_examples([["a green star"], ["a red circle"]])  # same text as task 0's first caption
  union = metrics.UnionGallery.from_tasks([task0, task1])
  np.testing.assert_array_equal(union.image_task, [0, 0, 1, 1])
  np.testing.assert_array_equal(union.caption_task, [0, 0, 1, 1])
  gallery_images = np.eye(4, 8, dtype=np.float32)
  gallery_captions = np.eye(4, 8, dtype=np.float32)
  # Task 1's queries: image 0 ("green star") points at task 0's "blue square" first, then its own caption;
  # image 1 ("red circle") points at task 0's "a red circle" caption, an identical text: a hit.
  image_queries = np.array([[0, 0.9, 0.5, 0, 0, 0, 0, 0], [1, 0, 0, 0.5, 0, 0, 0, 0]], np.float32)
  caption_queries = np.array([[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]], np.float32)
  searchers = Searchers(index.build_searcher(gallery_images, 10), index.build_searcher(gallery_captions, 10))
  i2t_rows, t2i_rows, agreement = evaluate.search_both_ways(
      EmbeddedSplit(image_queries, caption_queries), searchers, EmbeddedSplit(gallery_images, gallery_captions), 2)
  assert agreement is None  # exact indexes
  assert i2t_rows[0, 0] == 1 and i2t_rows[1, 0] == 0
  values = union.metrics(1, i2t_rows, t2i_rows, ks=(1, 2))
  assert values["i2t_r1"] == pytest.approx(50.0)
  assert values["i2t_r2"] == pytest.approx(100.0)
  assert values["t2i_r1"] == pytest.approx(100.0)


def test_approximate_index_reports_its_agreement_with_exact_search():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(50, 32))
  gallery = (centres[rng.integers(0, 50, 20_000)] + 0.3 * rng.normal(size=(20_000, 32))).astype(np.float32)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  queries = gallery[:200] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  searcher = index.build_searcher(gallery, 10, mode="auto", ann_threshold=10_000)
  assert searcher.mode == "approximate"
  assert index.build_searcher(gallery[:500], 10, mode="auto", ann_threshold=10_000).mode == "exact"
  rows, _ = index.search(searcher, queries, 10)
  exact_rows = exact.top_k(gallery, queries, 10)
  value = index.agreement(rows, exact_rows)
  assert 0.9 <= value <= 1.0
  assert index.agreement(exact_rows, exact_rows) == 1.0
  with pytest.raises(ValueError, match="one row per query"):
    index.agreement(rows[:5], exact_rows)
  truth = metrics.GroundTruth.from_captions([f"c{i}" for i in range(20_000)], np.arange(20_000))
  values = evaluate.query_gallery(EmbeddedSplit(queries, queries), Searchers(searcher, searcher),
                                  EmbeddedSplit(gallery, gallery), truth, (1, 5, 10))
  assert values["ann_agreement"] == pytest.approx(value, abs=1e-6)


def test_each_index_is_tuned_on_the_other_modality_to_the_configured_target():
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(40, 32))

  def draw(count):
    x = (centres[rng.integers(0, 40, count)] + 0.5 * rng.normal(size=(count, 32))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  gallery, queries = EmbeddedSplit(draw(1500), draw(3000)), EmbeddedSplit(draw(600), draw(700))
  config = ml_collections.ConfigDict(dict(eval=dict(ks=(1, 10), index_mode="approximate", ann_threshold=100_000,
                                                    ann_recall_target=0.9)))
  searchers = evaluate.build_searchers(gallery, queries, config)
  for searcher, tuning_count in ((searchers.images, 700), (searchers.captions, 600)):  # t2i: captions; i2t: images
    assert searcher.mode == "approximate" and searcher.settings["tuned_on"] == "queries"
    assert (searcher.settings["recall_target"], searcher.settings["tuning_queries"]) == (0.9, tuning_count)
  del config.eval["ann_recall_target"]  # a run configured before the field existed: the default target
  assert evaluate.build_searchers(gallery, queries, config).images.settings["recall_target"] == 0.95
