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
  for policy in policies.POLICIES.values():
    prepared = policy.prepare_queries(queries, 0, 2)
    assert prepared.images is queries.images and prepared.captions is queries.captions
  assert policies.POLICY_NAMES == ("reindex", "no_reindex")


def test_a_policy_without_its_gallery_rule_cannot_be_made():
  class Incomplete(policies.IndexingPolicy):
    pass

  with pytest.raises(TypeError, match="abstract"):
    Incomplete("incomplete")
