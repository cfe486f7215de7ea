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


def test_unit_rows():
  rows = metrics.unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
  np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0]])
  assert rows.dtype == np.float32
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    metrics.unit_rows(np.zeros(3))
