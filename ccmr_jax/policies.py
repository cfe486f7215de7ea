"""Indexing policies: which stored embeddings form a gallery, and how queries meet it.

After training task ``t`` the gallery of a seen task ``k <= t`` is searched
by queries embedded with the current snapshot ``S_t``. A policy names the
snapshot whose embeddings of task ``k`` form that gallery, and prepares the
queries for it:

  * ``reindex``:    the latest snapshot ``S_t`` (every gallery re-embedded);
  * ``no_reindex``: the snapshot ``S_k`` of its own task (embedded once, kept).

Both pass the queries through unchanged. A gallery index is identified by
the pair (snapshot, task) and built once; at ``t = k`` every policy here uses
the same index, so their results on the newest task are identical by
construction.

A new policy is a subclass with its two methods and an entry in
:data:`POLICIES`: the evaluation stage queries every policy listed there,
and the analysis, report and comparison read their names from it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import NamedTuple

import numpy as np


class EmbeddedSplit(NamedTuple):
  """One task's evaluation split embedded by one snapshot: unit vectors, float32."""

  images: np.ndarray  # [N, D]
  captions: np.ndarray  # [C, D]


@dataclasses.dataclass(frozen=True)
class IndexingPolicy(abc.ABC):
  """The rule of one indexing policy (see the module docstring)."""

  name: str

  @abc.abstractmethod
  def gallery_snapshot(self, gallery_task: int, current_task: int) -> int:
    """The snapshot whose embeddings of task ``gallery_task`` form its gallery after ``current_task``."""

  def prepare_queries(self, queries: EmbeddedSplit, gallery_task: int, current_task: int) -> EmbeddedSplit:
    """The vectors that search task ``gallery_task``'s gallery, from its queries embedded by ``S_t``."""
    del gallery_task, current_task
    return queries


class Reindex(IndexingPolicy):
  """Every seen gallery re-embedded with the latest snapshot."""

  def gallery_snapshot(self, gallery_task: int, current_task: int) -> int:
    _check_seen(gallery_task, current_task)
    return current_task


class NoReindex(IndexingPolicy):
  """Each gallery embedded once, by the snapshot of its own task, and kept."""

  def gallery_snapshot(self, gallery_task: int, current_task: int) -> int:
    _check_seen(gallery_task, current_task)
    return gallery_task


def _check_seen(gallery_task: int, current_task: int) -> None:
  if gallery_task > current_task:
    raise ValueError(f"task {gallery_task} is not seen yet after task {current_task}")


POLICIES: dict[str, IndexingPolicy] = {p.name: p for p in (Reindex("reindex"), NoReindex("no_reindex"))}
POLICY_NAMES = tuple(POLICIES)


def get(name: str) -> IndexingPolicy:
  """The policy called ``name``; a ``ValueError`` names the known ones."""
  if name not in POLICIES:
    raise ValueError(f"unknown indexing policy {name!r}; choose from {list(POLICIES)}")
  return POLICIES[name]


def snapshot_for_gallery(policy: str, gallery_task: int, current_task: int) -> int:
  """The snapshot whose encoders embed task ``gallery_task``'s gallery after task ``current_task``."""
  return get(policy).gallery_snapshot(gallery_task, current_task)
