"""Forgetting analysis on hand-made vectors with answers computed by hand."""

import json
import os

import numpy as np
import pytest

from ccmr_jax import analysis, manifest, metrics


def _circle(degrees, dims=2):
  """Unit vectors at the given angles in the plane of the first two of ``dims`` axes."""
  radians = np.deg2rad(np.asarray(degrees, np.float64))
  out = np.zeros((len(radians), dims), np.float32)
  out[:, 0], out[:, 1] = np.cos(radians), np.sin(radians)
  return out


def test_identical_embeddings_have_no_drift():
  vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
  drift = analysis.embedding_drift(vectors, vectors, k=5)
  assert drift["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
  assert drift["knn_overlap"] == 1.0 and drift["k"] == 5


def test_a_rotation_moves_every_vector_but_keeps_neighbourhoods():
  angles = [0, 20, 90, 200]  # no ties among the two nearest neighbours of any item
  drift = analysis.embedding_drift(_circle(angles), _circle(np.add(angles, 40)), k=2)
  assert drift["mean_cosine"] == pytest.approx(np.cos(np.deg2rad(40)), abs=1e-6)
  assert drift["knn_overlap"] == 1.0


def test_moving_one_item_breaks_neighbourhoods_by_a_hand_computed_amount():
  # Old angles 0, 20, 90, 180: nearest neighbours 0→20, 20→0, 90→20, 180→90.
  # Item 3 moves from 180 to 30: nearest neighbours 0→20, 20→30, 90→30, 30→20. Only item 0 keeps its own.
  drift = analysis.embedding_drift(_circle([0, 20, 90, 180]), _circle([0, 20, 90, 30]), k=1)
  assert drift["knn_overlap"] == pytest.approx(1 / 4)
  assert drift["mean_cosine"] == pytest.approx((3 + np.cos(np.deg2rad(150))) / 4, abs=1e-6)


def test_drift_clamps_k_to_the_other_items():
  drift = analysis.embedding_drift(_circle([0, 90, 200]), _circle([10, 45, 300]), k=10)
  assert drift["k"] == 2 and drift["knn_overlap"] == 1.0  # every other item is a neighbour
  assert analysis.embedding_drift(_circle([0]), _circle([30]))["knn_overlap"] is None


def test_alignment_of_two_shifted_clouds():
  # Images on a circle at height h, each caption the same point at height -h: captions = images - (0, 0, 2h).
  r, h = 0.8, 0.6
  angles = np.deg2rad([0, 90, 180, 270])
  images = np.stack([r * np.cos(angles), r * np.sin(angles), np.full(4, h)], axis=1)
  captions = images - np.array([0, 0, 2 * h])
  alignment = analysis.cross_modal_alignment(images, captions, np.arange(4))
  assert alignment["modality_gap"] == pytest.approx(2 * h, abs=1e-6)
  assert alignment["matched_cosine"] == pytest.approx(r**2 - h**2, abs=1e-6)
  # The other images sit at 90, 180, 270 degrees: cosines sum to -1 in the plane.
  assert alignment["unmatched_cosine"] == pytest.approx(-r**2 / 3 - h**2, abs=1e-6)


def test_unmatched_cosine_is_the_mean_over_every_non_matching_pair():
  rng = np.random.default_rng(1)
  images = metrics.unit_rows(rng.normal(size=(5, 6)))
  captions = metrics.unit_rows(rng.normal(size=(12, 6)))
  caption_image = rng.integers(0, 5, size=12)
  cosines = captions @ images.T
  matched = cosines[np.arange(12), caption_image]
  non_matching = np.ones_like(cosines, bool)
  non_matching[np.arange(12), caption_image] = False
  alignment = analysis.cross_modal_alignment(images, captions, caption_image)
  assert alignment["matched_cosine"] == pytest.approx(matched.mean(), abs=1e-6)
  assert alignment["unmatched_cosine"] == pytest.approx(cosines[non_matching].mean(), abs=1e-6)


def test_confusion_on_a_hand_made_ranking():
  row_task = np.array([0, 0, 1, 1, 2])
  top_rows = np.array([[0, 2, 1],   # task 0 query: tasks 0, 1, 0 → first own, 1/3 other
                       [3, 4, 0],   # task 1 query: tasks 1, 2, 0 → first own, 2/3 other
                       [4, 1, 2]])  # task 1 query: tasks 2, 0, 1 → first other, 2/3 other
  confusion = analysis.inter_task_confusion(top_rows, row_task, np.array([0, 1, 1]))
  assert confusion["top1_other_task"] == pytest.approx(1 / 3)
  assert confusion["topk_other_task"] == pytest.approx(5 / 9)
  one_task = analysis.inter_task_confusion(top_rows, row_task, 1)
  assert one_task["top1_other_task"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="outside the gallery"):
    analysis.inter_task_confusion(np.array([[5]]), row_task, 0)


THETA = 30.0  # S_1 rotates task 0's plane by this many degrees
W_ANGLE = 40.0  # a task-1 item near where S_1 puts task 0's first item


@pytest.fixture(scope="module")
def fake_workdir(tmp_path_factory):
  """Two tasks of two images (one caption each, caption = image vector), in 3-D.

  Task 0 by S_0: images e0, e1. By S_1: the same rotated by THETA in the (e0, e1) plane.
  Task 1 by S_1: images e2 and w = (cos 40°, sin 40°, 0).
  """
  workdir = str(tmp_path_factory.mktemp("run"))
  task_vectors = {(0, 0): _circle([0, 90], 3), (1, 0): _circle([THETA, 90 + THETA], 3),
                  (1, 1): np.array([[0, 0, 1], _circle([W_ANGLE], 3)[0]], np.float32)}
  for (snapshot, task), vectors in task_vectors.items():
    manifest.save_npz(os.path.join(workdir, "embeddings", f"snapshot_{snapshot:02d}", f"task_{task:02d}.npz"),
                          images=vectors, captions=vectors, image_ids=np.arange(2) + 10 * task,
                          caption_image=np.arange(2))
  return workdir


def test_analyze_workdir_on_a_rotated_snapshot(fake_workdir):
  result = analysis.analyze_workdir(fake_workdir, 2, top_k=2)
  json.dumps(result, allow_nan=False)
  cos = np.cos(np.deg2rad(THETA))
  for modality in ("images", "captions"):
    assert result["drift"][modality]["mean_cosine"][1][0] == pytest.approx(cos, abs=1e-5)
    assert result["drift"][modality]["knn_overlap"] == [[None, None], [1.0, None]]
  for direction in ("i2t", "t2i"):
    reindex = result["alignment"]["reindex"][direction]
    no_reindex = result["alignment"]["no_reindex"][direction]
    assert reindex["matched_cosine"][0][1] is None
    for t, k in ((0, 0), (1, 0), (1, 1)):
      assert reindex["matched_cosine"][t][k] == pytest.approx(1.0, abs=1e-5)
      assert reindex["modality_gap"][t][k] == pytest.approx(0.0, abs=1e-5)
    # No re-indexing: queries by S_1 against task 0's gallery by S_0, rotated THETA apart.
    assert no_reindex["matched_cosine"][1][0] == pytest.approx(cos, abs=1e-5)
    assert no_reindex["unmatched_cosine"][1][0] == pytest.approx(0.0, abs=1e-5)  # cos(90-θ) and cos(90+θ)
    # The mean (0.5, 0.5) rotated by θ moves by 2 sin(θ/2) |(0.5, 0.5)|.
    assert no_reindex["modality_gap"][1][0] == pytest.approx(np.sqrt(2) * np.sin(np.deg2rad(THETA / 2)), abs=1e-5)
    assert no_reindex["matched_cosine"][1][1] == reindex["matched_cosine"][1][1]
    # Task-agnostic search after task 1. reindex: task 0's own gallery item scores 1 and comes first, w second.
    # no_reindex: query (30°) scores cos 10° with w (task 1) above cos 30° with its own item → w first;
    # query (120°) finds its own item (cos 30°) first, then w (cos 80°) above e0 (cos 120°) and e2 (0).
    assert result["confusion"]["reindex"][direction]["top1_other_task"][1][0] == 0.0
    assert result["confusion"]["reindex"][direction]["topk_other_task"][1][0] == 0.5
    assert result["confusion"]["no_reindex"][direction]["top1_other_task"][1][0] == 0.5
    assert result["confusion"]["no_reindex"][direction]["topk_other_task"][1][0] == 0.5
    assert result["confusion"]["no_reindex"][direction]["top1_other_task"][0][0] == 0.0  # one task: nothing else

  summary = analysis.summarize_analysis(result)
  json.dumps(summary, allow_nan=False)
  assert summary["drift_to_final"]["images"]["mean_cosine"] == pytest.approx(cos, abs=1e-5)
  assert summary["final_matched_cosine"]["reindex"]["i2t"] == pytest.approx(1.0, abs=1e-5)
  assert summary["final_matched_cosine"]["no_reindex"]["t2i"] == pytest.approx((cos + 1) / 2, abs=1e-5)
  assert summary["final_top1_other_task"]["no_reindex"]["i2t"] == pytest.approx(0.25)  # task 1's own: 0


def test_one_task_analysis_has_no_drift(fake_workdir):
  result = analysis.analyze_workdir(fake_workdir, 1)
  assert result["drift"]["images"]["mean_cosine"] == [[None]]
  assert analysis.summarize_analysis(result)["drift_to_final"]["captions"]["mean_cosine"] is None


def test_a_missing_embedding_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"snapshot_00.task_00\.npz is missing"):
    analysis.analyze_workdir(str(tmp_path), 1)


def test_plot_analysis_writes_one_png(fake_workdir, tmp_path):
  path = str(tmp_path / "plots" / "analysis.png")
  assert analysis.plot_analysis(analysis.analyze_workdir(fake_workdir, 2), path) == path
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path / "plots") == ["analysis.png"]
