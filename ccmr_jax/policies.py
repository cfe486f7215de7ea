"""Indexing policies: which stored embeddings form a gallery, and how queries meet it.

After training task ``t`` the gallery of a seen task ``k <= t`` is searched
by queries embedded with the current snapshot ``S_t``. A policy names the
snapshot whose embeddings of task ``k`` form that gallery, and how queries
and stored vectors are moved before they meet:

  * ``reindex``:    the latest snapshot ``S_t`` (every gallery re-embedded);
  * ``no_reindex``: the snapshot ``S_k`` of its own task (embedded once, kept);
  * ``no_reindex+KIND`` (``shift``, ``linear``, ``residual``, ``procrustes``):
    the kept gallery, searched by queries moved into ``S_k``'s space by the
    ``to_old`` map of that kind (query drift compensation; :mod:`ccmr_jax.drift_maps`);
  * ``remap_KIND`` (``linear``, ``residual``): the kept gallery vectors moved
    into ``S_t``'s space by the ``to_new`` map of that kind, searched by
    unchanged queries: no encoder pass, and every gallery in one current space.

Maps are fitted after task ``t`` on data the system holds then (the
current task's training pairs, and the replay memory), never on an old
gallery's raw items. A gallery index is identified by the pair (snapshot,
task) and built once; a moved gallery gets its own index after each task. At
``t = k`` no map applies, so every policy uses the same index and their
results on the newest task are identical by construction.

Task-agnostic search over the union of galleries ``0..t``: a policy whose
queries are the same for every part searches one union index; one that
moves queries per part (``no_reindex+KIND``) searches each part with the
queries moved into its space and merges the hits by score
(:func:`merge_top_k`), as a deployed system with one index per space would.

A new policy is a subclass with its methods and an entry in
:data:`POLICIES`: the evaluation stage queries every policy listed there,
and the analysis, report and comparison read their names from it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np


class EmbeddedSplit(NamedTuple):
  """One task's evaluation split embedded by one snapshot: unit vectors, float32."""

  images: np.ndarray  # [N, D]
  captions: np.ndarray  # [C, D]


class Maps(Protocol):
  """What policies need of :class:`ccmr_jax.drift_maps.DriftMaps`."""

  def apply(self, kind: str, direction: str, old_snapshot: int, split: EmbeddedSplit) -> EmbeddedSplit: ...


@dataclasses.dataclass(frozen=True)
class IndexingPolicy(abc.ABC):
  """The rule of one indexing policy (see the module docstring)."""

  name: str
  query_map: str | None = None  # kind of the to_old map applied to queries aimed at an old gallery
  gallery_map: str | None = None  # kind of the to_new map applied to an old gallery's stored vectors

  @abc.abstractmethod
  def gallery_snapshot(self, gallery_task: int, current_task: int) -> int:
    """The snapshot whose embeddings of task ``gallery_task`` form its gallery after ``current_task``."""

  def maps_needed(self) -> set[tuple[str, str]]:
    """The ``(kind, direction)`` maps this policy applies."""
    return ({(self.query_map, "to_old")} if self.query_map else set()) | \
        ({(self.gallery_map, "to_new")} if self.gallery_map else set())

  def moves_gallery(self, gallery_task: int, current_task: int) -> bool:
    """Whether the stored vectors are moved (so the stored index of their snapshot does not serve)."""
    return self.gallery_map is not None and gallery_task < current_task

  def moves_queries(self, gallery_task: int, current_task: int) -> bool:
    """Whether queries aimed at ``gallery_task``'s gallery are moved out of ``S_t``'s space."""
    return self.query_map is not None and gallery_task < current_task

  def prepare_queries(self, queries: EmbeddedSplit, gallery_task: int, current_task: int,
                      maps: Maps | None = None) -> EmbeddedSplit:
    """The vectors that search task ``gallery_task``'s gallery, from queries embedded by ``S_t``."""
    if not self.moves_queries(gallery_task, current_task):
      return queries
    return _required(maps, self).apply(self.query_map, "to_old", gallery_task, queries)

  def prepare_gallery(self, stored: EmbeddedSplit, gallery_task: int, current_task: int,
                      maps: Maps | None = None) -> EmbeddedSplit:
    """The vectors searched as task ``gallery_task``'s gallery, from those stored by its snapshot."""
    if not self.moves_gallery(gallery_task, current_task):
      return stored
    return _required(maps, self).apply(self.gallery_map, "to_new", gallery_task, stored)

  def encodes_gallery(self, gallery_task: int, current_task: int) -> bool:
    """Whether the gallery of ``gallery_task`` is passed through an encoder after ``current_task``."""
    return self.gallery_snapshot(gallery_task, current_task) == current_task


def _required(maps: Maps | None, policy: IndexingPolicy) -> Maps:
  if maps is None:
    raise ValueError(f"policy {policy.name!r} needs the drift maps fitted after the current task")
  return maps


class Reindex(IndexingPolicy):
  """Every seen gallery re-embedded with the latest snapshot."""

  def gallery_snapshot(self, gallery_task: int, current_task: int) -> int:
    _check_seen(gallery_task, current_task)
    return current_task


class NoReindex(IndexingPolicy):
  """Each gallery embedded once, by the snapshot of its own task, and kept (its vectors moved or not)."""

  def gallery_snapshot(self, gallery_task: int, current_task: int) -> int:
    _check_seen(gallery_task, current_task)
    return gallery_task


def _check_seen(gallery_task: int, current_task: int) -> None:
  if gallery_task > current_task:
    raise ValueError(f"task {gallery_task} is not seen yet after task {current_task}")


POLICIES: dict[str, IndexingPolicy] = {p.name: p for p in (
    Reindex("reindex"), NoReindex("no_reindex"),
    NoReindex("no_reindex+shift", query_map="shift"), NoReindex("no_reindex+linear", query_map="linear"),
    NoReindex("no_reindex+residual", query_map="residual"), NoReindex("no_reindex+procrustes", query_map="procrustes"),
    NoReindex("remap_linear", gallery_map="linear"), NoReindex("remap_residual", gallery_map="residual"))}
POLICY_NAMES = tuple(POLICIES)


def maps_needed(names: Sequence[str] = POLICY_NAMES) -> set[tuple[str, str]]:
  """Every ``(kind, direction)`` map the policies ``names`` apply."""
  return set().union(*(get(name).maps_needed() for name in names))


def get(name: str) -> IndexingPolicy:
  """The policy called ``name``; a ``ValueError`` names the known ones."""
  if name not in POLICIES:
    raise ValueError(f"unknown indexing policy {name!r}; choose from {list(POLICIES)}")
  return POLICIES[name]


def snapshot_for_gallery(policy: str, gallery_task: int, current_task: int) -> int:
  """The snapshot whose encoders embed task ``gallery_task``'s gallery after task ``current_task``."""
  return get(policy).gallery_snapshot(gallery_task, current_task)


class PolicyView(NamedTuple):
  """What one policy searches after task ``t``.

  Attributes:
    galleries: per task ``k <= t``, the gallery vectors as searched.
    queries: ``queries[k][j]``: task ``k``'s queries (by ``S_t``) prepared for gallery ``j``.
  """

  galleries: list[EmbeddedSplit]
  queries: list[list[EmbeddedSplit]]


def policy_view(policy: IndexingPolicy, t: int, current: Sequence[EmbeddedSplit],
                stored: Callable[[int, int], EmbeddedSplit], maps: Maps | None = None) -> PolicyView:
  """The galleries and prepared queries of ``policy`` after task ``t``.

  Args:
    policy: the policy.
    t: the current task.
    current: every seen task's split embedded by ``S_t`` (the queries, and ``S_t``'s galleries).
    stored: ``stored(snapshot, k)`` → task ``k``'s split as ``snapshot`` embedded it.
    maps: the drift maps fitted after task ``t`` (needed by policies that move vectors).
  """
  galleries = []
  for k in range(t + 1):
    snapshot = policy.gallery_snapshot(k, t)
    vectors = current[k] if snapshot == t else stored(snapshot, k)
    galleries.append(policy.prepare_gallery(vectors, k, t, maps))
  queries = [[policy.prepare_queries(current[k], j, t, maps) for j in range(t + 1)] for k in range(t + 1)]
  return PolicyView(galleries, queries)


def found_scores(queries: np.ndarray, gallery: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """``[Q, k]`` inner products of each query with the gallery rows found for it: scores of one part that
  compare with another part's (whatever index found them), for :func:`merge_top_k`."""
  return np.einsum("qd,qkd->qk", np.asarray(queries, np.float32), np.asarray(gallery, np.float32)[rows])


def merge_top_k(rows: Sequence[np.ndarray], scores: Sequence[np.ndarray], sizes: Sequence[int],
                k: int) -> tuple[np.ndarray, np.ndarray]:
  """The top-``k`` over parts searched separately: rows offset into the parts' concatenation.

  Args:
    rows: per part, ``[Q, k_j]`` rows into that part (best first).
    scores: per part, their ``[Q, k_j]`` scores.
    sizes: each part's size (the offsets of the concatenation).
    k: results kept.

  Returns:
    ``(rows [Q, min(k, total)], scores)``, best first; equal scores keep the earlier part first.
  """
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  all_rows = np.concatenate([np.asarray(r, np.int64) + o for r, o in zip(rows, offsets)], axis=1)
  all_scores = np.concatenate([np.asarray(s, np.float32) for s in scores], axis=1)
  order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(all_rows, order, 1), np.take_along_axis(all_scores, order, 1)
