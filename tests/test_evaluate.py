import numpy as np
import pytest

from ccmr_jax import evaluate
from ccmr_jax.data.examples import Examples


def _examples(captions_per_image):
  captions = tuple(c for caps in captions_per_image for c in caps)
  owner = np.repeat(np.arange(len(captions_per_image)), [len(c) for c in captions_per_image])
  n = len(captions_per_image)
  return Examples(np.zeros((n, 2, 2, 3), np.uint8), np.arange(n), captions, owner,
                  tuple(np.array([0], np.int32) for _ in range(n)))


def test_recall_on_hand_made_rankings_with_duplicate_captions():
  # image 0: "red circle", "big red circle"; image 1: "blue square", "red circle" (same text as image 0's)
  # image 2: "green star"
  truth = evaluate.GroundTruth.from_examples(_examples(
      [["red circle", "big red circle"], ["blue square", "Red circle."], ["green star"]]))
  # i2t: caption rows retrieved for each image query (best first).
  i2t = np.array([[3, 2, 4],   # image 0: row 3 is image 1's "red circle" = its own text → hit at 1
                  [0, 4, 2],   # image 1: row 0 "red circle" is also its text → hit at 1
                  [0, 1, 4]])  # image 2: own caption at rank 3
  # t2i: image rows retrieved for each caption query.
  t2i = np.array([[1, 0, 2],   # "red circle" of image 0 → image 1 also has that text → hit at 1
                  [1, 2, 0],   # "big red circle" → only image 0 → hit at 3
                  [2, 1, 0],   # "blue square" → image 1 at rank 2
                  [0, 1, 2],   # "red circle" of image 1 → image 0 has it too → hit at 1
                  [2, 0, 1]])  # "green star" → hit at 1
  m = evaluate.retrieval_metrics(i2t, t2i, truth, ks=(1, 2, 3))
  assert m["i2t_r1"] == pytest.approx(100 * 2 / 3)
  assert m["i2t_r2"] == pytest.approx(100 * 2 / 3)
  assert m["i2t_r3"] == pytest.approx(100.0)
  assert m["t2i_r1"] == pytest.approx(100 * 3 / 5)
  assert m["t2i_r2"] == pytest.approx(100 * 4 / 5)
  assert m["t2i_r3"] == pytest.approx(100.0)
  assert m["mean_r1"] == pytest.approx(0.5 * (m["i2t_r1"] + m["t2i_r1"]))


def test_query_gallery_with_exact_search_and_ties():
  truth = evaluate.GroundTruth.from_examples(_examples([["a"], ["b"], ["b"]]))
  images = np.eye(3, 4, dtype=np.float32)
  # Captions "b" of images 1 and 2 are identical texts with identical vectors: a tie that cannot matter.
  captions = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], np.float32)
  from ccmr_jax import index
  m = evaluate.query_gallery(images, captions, index.build_searcher(images, 10), index.build_searcher(captions, 10),
                             truth, ks=(1, 5, 10))
  assert m["i2t_r1"] == pytest.approx(100 * 2 / 3)  # image 2's vector matches nothing; others hit
  assert m["t2i_r1"] == pytest.approx(100.0)  # both "b" queries: image 1 first, and it has text "b"
  assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_snapshot_for_gallery_follows_the_policies():
  assert evaluate.snapshot_for_gallery("reindex", 1, 3) == 3
  assert evaluate.snapshot_for_gallery("no_reindex", 1, 3) == 1
  assert evaluate.snapshot_for_gallery("no_reindex", 3, 3) == evaluate.snapshot_for_gallery("reindex", 3, 3)
  with pytest.raises(ValueError, match="not seen yet"):
    evaluate.snapshot_for_gallery("reindex", 4, 3)
  with pytest.raises(ValueError, match="unknown indexing policy"):
    evaluate.snapshot_for_gallery("sometimes", 0, 3)


def test_continual_summary_formulas():
  nan = np.nan
  matrix = np.array([[50, nan, nan], [40, 60, nan], [30, 65, 70]], float)
  s = evaluate.continual_summary(matrix)
  assert s["final_average"] == pytest.approx((30 + 65 + 70) / 3)
  # task 0: best before the end 50 → 30: 20; task 1: best before the end 60 → 65: -5
  assert s["per_task_forgetting"] == pytest.approx([20, -5])
  assert s["forgetting"] == pytest.approx(7.5)
  assert s["bwt"] == pytest.approx(((30 - 50) + (65 - 60)) / 2)
  one = evaluate.continual_summary(np.array([[42.0]]))
  assert one["forgetting"] is None and one["bwt"] is None and one["final_average"] == 42.0


def test_union_gallery_search_counts_only_true_matches_across_tasks():
  task0 = _examples([["a red circle"], ["a blue square"]])
  task1 = _examples([["a green star"], ["a red circle"]])  # same text as task 0's first caption
  union = evaluate.UnionGallery.from_tasks([task0, task1])
  np.testing.assert_array_equal(union.image_task, [0, 0, 1, 1])
  np.testing.assert_array_equal(union.caption_task, [0, 0, 1, 1])
  from ccmr_jax import index
  gallery_images = np.eye(4, 8, dtype=np.float32)
  gallery_captions = np.eye(4, 8, dtype=np.float32)
  # Task 1's queries: image 0 ("green star") points at task 0's "blue square" first, then its own caption;
  # image 1 ("red circle") points at task 0's "a red circle" caption, an identical text: a hit.
  image_queries = np.array([[0, 0.9, 0.5, 0, 0, 0, 0, 0], [1, 0, 0, 0.5, 0, 0, 0, 0]], np.float32)
  caption_queries = np.array([[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]], np.float32)
  metrics, rows = union.query(1, image_queries, caption_queries, index.build_searcher(gallery_images, 10),
                              index.build_searcher(gallery_captions, 10), ks=(1, 2))
  assert rows["i2t"][0, 0] == 1 and rows["i2t"][1, 0] == 0
  assert metrics["i2t_r1"] == pytest.approx(50.0)
  assert metrics["i2t_r2"] == pytest.approx(100.0)
  assert metrics["t2i_r1"] == pytest.approx(100.0)


def test_approximate_index_reports_its_agreement_with_exact_search():
  from ccmr_jax import index
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
  exact = index.exact_top_k(gallery, queries, 10)
  value = index.agreement(rows, exact)
  assert 0.9 <= value <= 1.0
  assert index.agreement(exact, exact) == 1.0
  with pytest.raises(ValueError, match="one row per query"):
    index.agreement(rows[:5], exact)
  truth = evaluate.GroundTruth.from_captions([f"c{i}" for i in range(20_000)], np.arange(20_000))
  metrics = evaluate.query_gallery(queries, queries, searcher, searcher, truth, (1, 5, 10), gallery, gallery)
  assert metrics["ann_agreement"] == pytest.approx(value, abs=1e-6)
  with pytest.raises(ValueError, match="needs its gallery embeddings"):
    evaluate.query_gallery(queries, queries, searcher, searcher, truth, (1, 5, 10))
