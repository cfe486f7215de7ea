"""The indexing policies: which snapshot's embeddings form a gallery, and the queries they search with."""

import numpy as np
import pytest

from ccmr_jax import policies
from ccmr_jax.policies import EmbeddedSplit


def test_snapshot_for_gallery_follows_the_policies():
  assert policies.snapshot_for_gallery("reindex", 1, 3) == 3
  assert policies.snapshot_for_gallery("no_reindex", 1, 3) == 1
  for t in range(4):  # on the newest task every policy searches the same gallery
    assert len({p.gallery_snapshot(t, t) for p in policies.POLICIES.values()}) == 1
  with pytest.raises(ValueError, match="not seen yet"):
    policies.snapshot_for_gallery("reindex", 4, 3)
  with pytest.raises(ValueError, match="not seen yet"):
    policies.snapshot_for_gallery("no_reindex", 4, 3)
  with pytest.raises(ValueError, match="unknown indexing policy"):
    policies.snapshot_for_gallery("sometimes", 0, 3)


def test_the_paper_policies_search_with_the_queries_unchanged():
  queries = EmbeddedSplit(np.eye(2, dtype=np.float32), np.ones((3, 2), np.float32))
  for name in ("reindex", "no_reindex"):
    prepared = policies.get(name).prepare_queries(queries, 0, 2)
    assert prepared.images is queries.images and prepared.captions is queries.captions
    assert policies.get(name).prepare_gallery(queries, 0, 2) is queries
  assert policies.POLICY_NAMES[:2] == ("reindex", "no_reindex")


class _NegatingMaps:
  """Stands in for DriftMaps: records what was asked, negates the vectors."""

  def __init__(self):
    self.calls = []

  def apply(self, kind, direction, old_snapshot, split):
    self.calls.append((kind, direction, old_snapshot))
    return EmbeddedSplit(-split.images, -split.captions)


def test_compensation_policies_move_queries_or_stored_galleries_of_old_tasks_only():
  split = EmbeddedSplit(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32))
  for kind in ("shift", "linear", "residual", "procrustes"):
    policy, maps = policies.get(f"no_reindex+{kind}"), _NegatingMaps()
    assert policy.gallery_snapshot(1, 3) == 1 and policy.maps_needed() == {(kind, "to_old")}
    np.testing.assert_array_equal(policy.prepare_queries(split, 1, 3, maps).images, -split.images)
    assert policy.prepare_queries(split, 3, 3, maps) is split and policy.prepare_gallery(split, 1, 3, maps) is split
    assert maps.calls == [(kind, "to_old", 1)]
  remap, maps = policies.get("remap_linear"), _NegatingMaps()
  assert remap.moves_gallery(0, 2) and not remap.moves_gallery(2, 2)
  np.testing.assert_array_equal(remap.prepare_gallery(split, 0, 2, maps).captions, -split.captions)
  assert remap.prepare_queries(split, 0, 2, maps) is split and maps.calls == [("linear", "to_new", 0)]
  with pytest.raises(ValueError, match="needs the drift maps"):
    remap.prepare_gallery(split, 0, 2)
  assert policies.maps_needed() == {("shift", "to_old"), ("linear", "to_old"), ("residual", "to_old"),
                                    ("procrustes", "to_old"), ("linear", "to_new"), ("residual", "to_new")}


def test_only_reindex_passes_old_galleries_through_an_encoder():
  for name, policy in policies.POLICIES.items():
    assert policy.encodes_gallery(2, 2)
    assert policy.encodes_gallery(0, 2) == (name == "reindex")


def test_policy_view_takes_stored_vectors_and_prepares_queries_per_gallery():
  current = [EmbeddedSplit(np.full((1, 2), t + 1.0, np.float32), np.full((2, 2), t + 1.0, np.float32))
             for t in range(2)]
  stored = lambda snapshot, k: EmbeddedSplit(np.full((1, 2), 10.0 * snapshot + k, np.float32),
                                             np.zeros((2, 2), np.float32))
  view = policies.policy_view(policies.get("no_reindex+shift"), 1, current, stored, _NegatingMaps())
  assert view.galleries[0].images[0, 0] == 0.0 and view.galleries[1] is current[1]
  assert view.queries[1][0].images[0, 0] == -2.0 and view.queries[1][1] is current[1]
  assert policies.policy_view(policies.get("reindex"), 1, current, stored).galleries[0] is current[0]


def test_merge_top_k_ranks_hits_of_separate_parts_by_score():
  rows, scores = policies.merge_top_k([np.array([[1, 0]]), np.array([[0]])], [np.array([[0.9, 0.2]]),
                                                                              np.array([[0.5]])], [3, 4], 3)
  np.testing.assert_array_equal(rows, [[1, 3, 0]])
  np.testing.assert_allclose(scores, [[0.9, 0.5, 0.2]])
  tied, _ = policies.merge_top_k([np.array([[2]]), np.array([[0]])], [np.array([[0.5]]), np.array([[0.5]])], [3, 1], 2)
  np.testing.assert_array_equal(tied, [[2, 3]])  # equal scores: the earlier part first


def test_a_policy_without_its_gallery_rule_cannot_be_made():
  class Incomplete(policies.IndexingPolicy):
    pass

  with pytest.raises(TypeError, match="abstract"):
    Incomplete("incomplete")
