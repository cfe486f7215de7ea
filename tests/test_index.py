"""Approximate ScaNN indexes built to a recall target: tuning, its stored settings, its fallbacks."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ccmr_jax import exact, index


def _clustered(count: int, seed: int, dim: int = 48, clusters: int = 60, spread: float = 0.6) -> np.ndarray:
  """Unit vectors around ``clusters`` fixed centres (the same centres for every ``seed``)."""
  centres = np.random.default_rng(123).normal(size=(clusters, dim))
  rng = np.random.default_rng(seed)
  x = (centres[rng.integers(0, clusters, count)] + spread * rng.normal(size=(count, dim))).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery_and_queries():
  return _clustered(20_000, 0), _clustered(1000, 1), _clustered(1000, 2)  # gallery, tuning, held-out


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_the_tuned_index_meets_its_recall_target_on_queries_it_never_saw(gallery_and_queries, target):
  gallery, tuning, held_out = gallery_and_queries
  searcher = index.build_searcher(gallery, 10, "approximate", recall_target=target, tuning_queries=tuning)
  assert searcher.mode == "approximate"
  settings = searcher.settings
  assert settings["recall_target"] == target and settings["tuning_queries"] == 1000
  assert settings["tuning_recall_lower_bound"] >= target
  # The recall it reports is the recall of its tuned setting on the tuning queries, and the bound it
  # cleared is that mean less two standard errors of the per-query recall...
  rows, _ = index.search(searcher, tuning, 10)
  truth = exact.top_k(gallery, tuning, 10)
  per_query = np.array([len(np.intersect1d(a, e)) / 10 for a, e in zip(rows, truth)])
  assert per_query.mean() == pytest.approx(settings["tuning_recall"])
  assert per_query.mean() - 2 * per_query.std(ddof=1) / np.sqrt(1000) == pytest.approx(
      settings["tuning_recall_lower_bound"])
  # ...and new queries from the same distribution get it too (1000 queries: s.e. about 0.005).
  rows, _ = index.search(searcher, held_out, 10)
  assert index.agreement(rows, exact.top_k(gallery, held_out, 10)) >= target - 0.015


def test_a_lower_target_buys_a_cheaper_setting_and_no_cheaper_candidate_met_the_target(monkeypatch):
  # Wide clusters: a query's neighbours spread over many leaves, so leaves and candidates trade off.
  gallery, tuning = _clustered(20_000, 0, spread=1.5), _clustered(1000, 1, spread=1.5)
  tuned = {t: index.build_searcher(gallery, 10, "approximate", recall_target=t, tuning_queries=tuning)
           for t in (0.8, 0.97)}
  leaves = tuned[0.97].settings["num_leaves"]
  cost = {t: index.query_cost(s.settings, len(gallery), leaves) for t, s in tuned.items()}
  assert cost[0.8] < cost[0.97]
  truth = exact.top_k(gallery, tuning, 10)
  for setting in index.candidate_settings(len(gallery), leaves, 10):
    rows, _ = tuned[0.97].scann.search_batched(tuning, final_num_neighbors=10, **setting)
    bound = index.recall_lower_bound(np.asarray(rows), truth)[1]
    for target, chosen in cost.items():
      if index.query_cost(setting, len(gallery), leaves) < chosen:
        assert bound < target, (target, setting)
  # The cheapest, whatever order the candidates come in.
  in_order = index.candidate_settings
  monkeypatch.setattr(index, "candidate_settings", lambda *args: in_order(*args)[::-1])
  backwards = index.build_searcher(gallery, 10, "approximate", recall_target=0.8, tuning_queries=tuning)
  assert index.query_cost(backwards.settings, len(gallery), leaves) == cost[0.8]


def test_tuned_settings_are_stored_with_the_index_and_used_after_loading(gallery_and_queries, tmp_path):
  gallery, tuning, held_out = gallery_and_queries
  searcher = index.build_searcher(gallery, 10, "approximate", recall_target=0.6, tuning_queries=tuning)
  loaded = index.load_searcher(index.save_searcher(searcher, str(tmp_path / "idx")))
  assert (loaded.mode, loaded.size, loaded.settings) == ("approximate", len(gallery), searcher.settings)
  rows, scores = index.search(loaded, held_out, 10)
  settings = {name: searcher.settings[name] for name in ("leaves_to_search", "pre_reorder_num_neighbors")}
  expected_rows, expected_scores = searcher.scann.search_batched(held_out, final_num_neighbors=10, **settings)
  np.testing.assert_array_equal(rows, expected_rows)
  np.testing.assert_array_equal(scores, expected_scores)
  # The build's own default (5% of the leaves, reorder 100) answers differently: the stored setting is in force.
  default_rows, _ = searcher.scann.search_batched(held_out, final_num_neighbors=10)
  assert not np.array_equal(rows, default_rows)


def test_the_same_gallery_gets_the_same_index_every_build(gallery_and_queries):
  gallery, tuning, held_out = gallery_and_queries
  builds = [index.build_searcher(gallery, 10, "approximate", recall_target=0.9, tuning_queries=tuning)
            for _ in range(2)]
  assert builds[0].settings == builds[1].settings
  np.testing.assert_array_equal(index.search(builds[0], held_out, 10)[0], index.search(builds[1], held_out, 10)[0])
  # Without a fixed seed for its centres, ScaNN's default tree would differ here from build to build.
  np.testing.assert_array_equal(builds[0].scann.search_batched(held_out, leaves_to_search=1)[0],
                                builds[1].scann.search_batched(held_out, leaves_to_search=1)[0])


def test_without_queries_the_gallery_tunes_itself_and_no_row_finds_itself(gallery_and_queries):
  gallery, _, held_out = gallery_and_queries
  searcher = index.build_searcher(gallery, 10, "approximate", recall_target=0.9)
  assert searcher.settings["tuned_on"] == "gallery rows" and searcher.settings["tuning_recall_lower_bound"] >= 0.9
  own = np.array([3, 0, 7])
  rows = np.array([[5, 3, 9, 1], [2, 4, 6, 8], [7, 7, 1, 2]])
  np.testing.assert_array_equal(index._drop_own(rows, own, 3), [[5, 9, 1], [2, 4, 6], [1, 2, 7]])


def test_small_galleries_and_unreachable_targets_are_searched_exactly(monkeypatch):
  small = _clustered(999, 3)
  searcher = index.build_searcher(small, 10, "approximate")
  assert searcher.mode == "exact" and "fewer than 1000" in searcher.settings["reason"]
  noise = np.random.default_rng(4).normal(size=(3000, 64)).astype(np.float32)  # no structure to exploit
  noise /= np.linalg.norm(noise, axis=1, keepdims=True)
  # Only one setting to try, one leaf of 55 and no spare candidates: far from recall 0.99 on noise.
  monkeypatch.setattr(index, "candidate_settings",
                      lambda *_: [{"leaves_to_search": 1, "pre_reorder_num_neighbors": 10}])
  strict = index.build_searcher(noise, 10, "approximate", recall_target=0.99, tuning_queries=noise[:200] * -1)
  assert strict.mode == "exact" and "no tried setting reached" in strict.settings["reason"]
  rows, _ = index.search(strict, noise[:50], 10)
  np.testing.assert_array_equal(rows, exact.top_k(noise, noise[:50], 10))
  with pytest.raises(ValueError, match="recall target must be in"):
    index.build_searcher(small, 10, "approximate", recall_target=1.5)
  with pytest.raises(ValueError, match="tuning queries contain NaN"):
    index.build_searcher(_clustered(2000, 5), 10, "approximate", tuning_queries=np.full((4, 48), np.nan, np.float32))


_WITHOUT_TENSORFLOW = """
import sys
import numpy as np
from ccmr_jax import index
assert "tensorflow" not in sys.modules, "importing the index loaded TensorFlow"
gallery = np.eye(4, dtype=np.float32)
rows, _ = index.search(index.build_searcher(gallery, 2), gallery[[2]], 2)
assert rows[0, 0] == 2, rows
import tensorflow
print("tensorflow", tensorflow.__version__)
"""


def test_scann_is_imported_without_tensorflow_which_still_imports_after():
  # A process of its own: this one may have imported TensorFlow already. The test extra installs TensorFlow.
  completed = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert completed.stdout.startswith("tensorflow 2.")
