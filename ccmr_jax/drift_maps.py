"""Maps between two snapshots' embedding spaces, fitted on data the system holds when it fits them.

After task ``t`` the current encoders ``S_t`` embed queries in a space that
has drifted from the space of ``S_k`` (``k < t``), in which task ``k``'s
gallery was stored once (``no_reindex``). A map fitted on pairs
``(x_i, y_i) = (S_t(u_i), S_k(u_i))`` of items ``u_i`` the system holds at
time ``t`` moves vectors between the two spaces without re-encoding the
gallery: ``to_old`` maps ``S_t``'s space into ``S_k``'s (applied to queries),
``to_new`` maps ``S_k``'s into ``S_t``'s (applied to stored gallery vectors).

**Fit data** (:func:`fit_examples`): up to ``fit_images`` of task ``t``'s
training images (a seeded draw) with all their captions, plus the replay
memory of tasks ``0..t-1`` when the strategy keeps one. Never a later task's
data, never an old task's raw data beyond that memory. Each modality gets
its own map, fitted on the images' (or the captions') embeddings.

**Kinds**, for source rows ``X [n, D]`` and target rows ``Y [n, D]``, each
followed by re-normalisation ``f(x) = g(x) / ||g(x)||``:

* ``shift``:      ``g(x) = x + δ``, ``δ = mean_i y_i − mean_i x_i``: the drift
  vector of query drift compensation (Goswami et al., CoLLAs 2025);
* ``linear``:     ``g(x) = (x − μ_X) W + μ_Y``, ``W = (X̃ᵀX̃ + λ n I)⁻¹ X̃ᵀỸ``
  with ``X̃ = X − μ_X``, ``Ỹ = Y − μ_Y``: ridge least squares, ``λ`` = ``ridge``;
* ``residual``:   the same affine form, ``W = (X̃ᵀX̃ + λ n I)⁻¹ (X̃ᵀỸ + λ n I)``: ridge
  toward the identity (``min ||X̃W − Ỹ||² + λn||W − I||²``), so a direction
  the fit data do not span is left where it was instead of being shrunk to
  zero — one task's data span few of the directions other tasks' items use;
* ``procrustes``: ``g(x) = x R``, ``R = U Vᵀ`` for ``U Σ Vᵀ = svd(XᵀY)``: the
  orthogonal matrix minimising ``||X R − Y||_F`` (Schönemann 1966), a pure
  rotation/reflection, so angles within a space are kept.

This module is numpy only; :mod:`ccmr_jax.evaluate` embeds the fit data.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

from ccmr_jax import manifest
from ccmr_jax.data.examples import Examples, concatenate
from ccmr_jax.policies import EmbeddedSplit

MAP_KINDS = ("shift", "linear", "residual", "procrustes")
MODALITIES = EmbeddedSplit._fields  # ("images", "captions")
DEFAULT_FIT_IMAGES = 1000
DEFAULT_RIDGE = 1e-3


def _unit_rows(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class AffineMap:
  """``f(x) = normalise(x @ matrix + bias)``; ``matrix`` None is the identity."""

  matrix: np.ndarray | None
  bias: np.ndarray

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    moved = (x if self.matrix is None else x @ self.matrix) + self.bias
    return _unit_rows(moved).astype(np.float32)


def _check_pairs(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
  if source.ndim != 2 or source.shape != target.shape or len(source) == 0:
    raise ValueError(f"a map is fitted on paired [n, D] rows, got {source.shape} and {target.shape}")
  return source, target


def fit_shift(source: np.ndarray, target: np.ndarray) -> AffineMap:
  """The drift vector ``mean(target) − mean(source)`` (see the module docstring)."""
  source, target = _check_pairs(source, target)
  return AffineMap(None, target.mean(0) - source.mean(0))


def fit_linear(source: np.ndarray, target: np.ndarray, ridge: float = DEFAULT_RIDGE,
               toward_identity: bool = False) -> AffineMap:
  """Ridge least squares on centred rows, shrunk toward zero or (``toward_identity``) toward ``I``.

  ``W = (X̃ᵀX̃ + ridge·n·I)⁻¹ (X̃ᵀỸ + ridge·n·P)`` with ``P = I`` or ``0``;
  bias ``μ_Y − μ_X W``.
  """
  source, target = _check_pairs(source, target)
  if not ridge >= 0:
    raise ValueError(f"ridge must be >= 0, got {ridge!r}")
  source_mean, target_mean = source.mean(0), target.mean(0)
  centred_source, centred_target = source - source_mean, target - target_mean
  penalty = ridge * len(source) * np.eye(source.shape[1])
  moment = centred_source.T @ centred_target + (penalty if toward_identity else 0.0)
  matrix = np.linalg.lstsq(centred_source.T @ centred_source + penalty, moment, rcond=None)[0]
  return AffineMap(matrix, target_mean - source_mean @ matrix)


def fit_procrustes(source: np.ndarray, target: np.ndarray) -> AffineMap:
  """The orthogonal ``R = U Vᵀ`` of ``svd(XᵀY)``, no bias."""
  source, target = _check_pairs(source, target)
  u, _, vt = np.linalg.svd(source.T @ target)
  return AffineMap(u @ vt, np.zeros(source.shape[1]))


def fit(kind: str, source: np.ndarray, target: np.ndarray, ridge: float = DEFAULT_RIDGE) -> AffineMap:
  """The map of ``kind`` (one of :data:`MAP_KINDS`) from ``source``'s rows to ``target``'s."""
  if kind == "shift":
    return fit_shift(source, target)
  if kind in ("linear", "residual"):
    return fit_linear(source, target, ridge, toward_identity=kind == "residual")
  if kind == "procrustes":
    return fit_procrustes(source, target)
  raise ValueError(f"unknown map kind {kind!r}; choose one of {list(MAP_KINDS)}")


def fit_examples(task_train: Examples, task: int, memory: Examples | None, fit_images: int, seed: int) -> Examples:
  """The fit data at time ``task``: a seeded draw of ``task_train``'s images, then the replay memory's.

  Args:
    task_train: task ``task``'s training split (the only task data the system holds at ``task``).
    task: the current task (seeds the draw).
    memory: the replay memory of tasks ``0..task-1`` as examples, or None.
    fit_images: images drawn from ``task_train`` (all of them when it holds fewer).
    seed: the run's seed.
  """
  if fit_images < 1:
    raise ValueError(f"eval.drift_maps.fit_images must be positive, got {fit_images!r}")
  rng = np.random.default_rng([seed, task, 0xD81F])
  rows = np.sort(rng.permutation(len(task_train))[:fit_images])
  parts = [task_train.subset(rows)] + ([memory] if memory is not None and len(memory) else [])
  return concatenate(parts)


@dataclasses.dataclass(frozen=True)
class DriftMaps:
  """The maps fitted after task ``after_task`` between ``S_t`` and each older ``S_k``.

  ``maps[(kind, direction, k, modality)]`` is an :class:`AffineMap`; ``fit_rows``
  counts the fit data's images and captions.
  """

  after_task: int
  maps: dict
  fit_rows: dict

  def apply(self, kind: str, direction: str, old_snapshot: int, split: EmbeddedSplit) -> EmbeddedSplit:
    """``split`` (both modalities) moved by the maps of ``(kind, direction)`` between ``S_t`` and ``S_k``."""
    return EmbeddedSplit(*(self.move(kind, direction, old_snapshot, m, part) for m, part in zip(MODALITIES, split)))

  def move(self, kind: str, direction: str, old_snapshot: int, modality: str, rows: np.ndarray) -> np.ndarray:
    """``rows`` of ``modality`` moved by one map."""
    try:
      affine = self.maps[kind, direction, old_snapshot, modality]
    except KeyError as e:
      raise ValueError(f"no {kind} map {direction} snapshot {old_snapshot} ({modality}) was fitted after task "
                       f"{self.after_task}") from e
    return affine(rows)

  def save(self, path: str) -> None:
    """Writes ``maps/after_task_TT.npz``: one ``KIND.DIRECTION.KK.MODALITY.{matrix,bias}`` pair per map."""
    arrays = {f"fit_rows.{m}": np.asarray(n, np.int64) for m, n in self.fit_rows.items()}
    for (kind, direction, k, modality), affine in self.maps.items():
      name = f"{kind}.{direction}.{k:02d}.{modality}"
      arrays[f"{name}.bias"] = affine.bias
      if affine.matrix is not None:
        arrays[f"{name}.matrix"] = affine.matrix
    manifest.save_npz(path, **arrays)

  @classmethod
  def load(cls, path: str, after_task: int) -> "DriftMaps":
    """The maps :meth:`save` wrote (their bytes checked against the manifest first)."""
    arrays = manifest.load_npz(path)
    maps = {}
    for name in arrays:
      if name.endswith(".bias"):
        kind, direction, k, modality, _ = name.split(".")
        matrix = arrays.get(name.removesuffix(".bias") + ".matrix")
        maps[kind, direction, int(k), modality] = AffineMap(matrix, arrays[name])
    fit_rows = {m: int(arrays[f"fit_rows.{m}"]) for m in MODALITIES}
    return cls(after_task, maps, fit_rows)


def fit_drift_maps(after_task: int, current: EmbeddedSplit, old: Callable[[int], EmbeddedSplit],
                   wanted: Iterable[tuple[str, str]], ridge: float = DEFAULT_RIDGE) -> DriftMaps:
  """Every ``(kind, direction)`` of ``wanted`` between ``S_t`` and each ``S_k``, ``k < t``.

  Args:
    after_task: ``t``.
    current: the fit data embedded by ``S_t``.
    old: ``old(k)`` → the same fit data embedded by ``S_k``.
    wanted: the ``(kind, direction)`` pairs the policies apply.
    ridge: ``λ`` of the ``linear`` kind.
  """
  wanted = sorted(set(wanted))
  maps = {}
  for k in range(after_task):
    previous = old(k)
    for kind, direction in wanted:
      for modality, new_part, old_part in zip(MODALITIES, current, previous):
        source, target = (new_part, old_part) if direction == "to_old" else (old_part, new_part)
        maps[kind, direction, k, modality] = fit(kind, source, target, ridge)
  return DriftMaps(after_task, maps, {m: len(part) for m, part in zip(MODALITIES, current)})

