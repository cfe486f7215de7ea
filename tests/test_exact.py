"""Exact search: the best scores, ties in gallery order, padding that never wins, self-exclusion."""

import numpy as np
import pytest

from ccmr_jax import exact, metrics


def test_exact_top_k_returns_the_best_scores_with_ties_in_gallery_order():
  rng = np.random.default_rng(3)
  gallery = rng.integers(-2, 3, size=(300, 4)).astype(np.float32)  # few distinct values: many ties
  queries = rng.integers(-2, 3, size=(2100, 4)).astype(np.float32)  # more than one block of query rows
  scores = queries @ gallery.T
  rows = exact.top_k(gallery, queries, 7)
  got = np.take_along_axis(scores, rows, axis=1)
  np.testing.assert_array_equal(got, -np.sort(-scores, axis=1)[:, :7])  # the 7 best scores, best first
  assert all(len(set(r)) == 7 for r in rows)
  tied = got[:, 1:] == got[:, :-1]
  assert (rows[:, 1:][tied] > rows[:, :-1][tied]).all()  # equal scores among the returned rows: by gallery row
  assert exact.top_k(gallery, queries[:3], 1000).shape == (3, 300)


def test_exact_top_k_can_leave_each_row_out_of_its_own_results():
  rng = np.random.default_rng(4)
  items = metrics.unit_rows(rng.normal(size=(50, 8)))
  rows = exact.top_k(items, items, 5, exclude_self=True)
  assert not (rows == np.arange(50)[:, None]).any()
  scores = items @ items.T
  np.fill_diagonal(scores, -np.inf)
  np.testing.assert_array_equal(rows, np.argsort(-scores, axis=1, kind="stable")[:, :5])
  assert exact.top_k(items, items, 100, exclude_self=True).shape == (50, 49)


@pytest.mark.parametrize("size", [1, 999, 1024, 1025, 5000])
def test_padded_gallery_rows_never_win_whatever_the_scores(size):
  # Every real score is negative, so a zero padding row would win if it were not masked.
  rng = np.random.default_rng(size)
  gallery = -np.abs(rng.normal(size=(size, 6))).astype(np.float32)
  queries = np.abs(rng.normal(size=(3, 6))).astype(np.float32)
  rows = exact.top_k(gallery, queries, 10)
  assert rows.shape == (3, min(10, size)) and rows.max() < size
  np.testing.assert_array_equal(rows, np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10])


def test_gallery_buckets_grow_by_at_most_an_eighth():
  for size in (1, 1024, 1025, 4097, 600_000, 1_000_001):
    bucket = exact._gallery_bucket(size)
    assert size <= bucket <= max(1024, size * 1.125), size
  assert len({exact._gallery_bucket(n) for n in range(2049, 4097)}) == 8
