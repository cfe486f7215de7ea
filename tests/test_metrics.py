"""The numpy metrics: ground truth with duplicate captions, recall@K, exact top-k, the continual summary."""

import numpy as np
import pytest

from ccmr_jax import metrics
from conftest import captioned_examples


def test_recall_on_hand_made_rankings_with_duplicate_captions():
  # image 0: "red circle", "big red circle"; image 1: "blue square", "red circle" (same text as image 0's)
  # image 2: "green star"
  truth = metrics.GroundTruth.from_examples(captioned_examples(
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
  m = metrics.retrieval_metrics(i2t, t2i, truth, ks=(1, 2, 3))
  assert m["i2t_r1"] == pytest.approx(100 * 2 / 3)
  assert m["i2t_r2"] == pytest.approx(100 * 2 / 3)
  assert m["i2t_r3"] == pytest.approx(100.0)
  assert m["t2i_r1"] == pytest.approx(100 * 3 / 5)
  assert m["t2i_r2"] == pytest.approx(100 * 4 / 5)
  assert m["t2i_r3"] == pytest.approx(100.0)
  assert m["mean_r1"] == pytest.approx(0.5 * (m["i2t_r1"] + m["t2i_r1"]))


def test_continual_summary_formulas():
  nan = np.nan
  matrix = np.array([[50, nan, nan], [40, 60, nan], [30, 65, 70]], float)
  s = metrics.continual_summary(matrix)
  assert s["final_average"] == pytest.approx((30 + 65 + 70) / 3)
  # task 0: best before the end 50 → 30: 20; task 1: best before the end 60 → 65: -5
  assert s["per_task_forgetting"] == pytest.approx([20, -5])
  assert s["forgetting"] == pytest.approx(7.5)
  assert s["bwt"] == pytest.approx(((30 - 50) + (65 - 60)) / 2)
  one = metrics.continual_summary(np.array([[42.0]]))
  assert one["forgetting"] is None and one["bwt"] is None and one["final_average"] == 42.0


def test_exact_top_k_returns_the_best_scores_with_ties_in_gallery_order():
  rng = np.random.default_rng(3)
  gallery = rng.integers(-2, 3, size=(300, 4)).astype(np.float32)  # few distinct values: many ties
  queries = rng.integers(-2, 3, size=(2100, 4)).astype(np.float32)  # more than one block of query rows
  scores = queries @ gallery.T
  rows = metrics.exact_top_k(gallery, queries, 7)
  got = np.take_along_axis(scores, rows, axis=1)
  np.testing.assert_array_equal(got, -np.sort(-scores, axis=1)[:, :7])  # the 7 best scores, best first
  assert all(len(set(r)) == 7 for r in rows)
  tied = got[:, 1:] == got[:, :-1]
  assert (rows[:, 1:][tied] > rows[:, :-1][tied]).all()  # equal scores among the returned rows: by gallery row
  assert metrics.exact_top_k(gallery, queries[:3], 1000).shape == (3, 300)


def test_exact_top_k_can_leave_each_row_out_of_its_own_results():
  rng = np.random.default_rng(4)
  items = metrics.unit_rows(rng.normal(size=(50, 8)))
  rows = metrics.exact_top_k(items, items, 5, exclude_self=True)
  assert not (rows == np.arange(50)[:, None]).any()
  scores = items @ items.T
  np.fill_diagonal(scores, -np.inf)
  np.testing.assert_array_equal(rows, np.argsort(-scores, axis=1, kind="stable")[:, :5])
  assert metrics.exact_top_k(items, items, 100, exclude_self=True).shape == (50, 49)


def test_unit_rows():
  rows = metrics.unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
  np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0]])
  assert rows.dtype == np.float32
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    metrics.unit_rows(np.zeros(3))
