"""Distillation from the previous snapshot (LwF-style), as pure loss terms.

Learning without Forgetting keeps a frozen copy of the model from the end of
the previous task (the *teacher*, snapshot ``S_{t-1}``) and penalises the
new model for answering differently on the current data. A retrieval model
answers with similarities, so the penalty here compares the *similarity
structure* of a batch under both models, not the embeddings one by one.

Notation for a batch of ``B`` pairs: ``x_i`` / ``y_i`` are the new model's
unit image / caption embeddings, ``x°_i`` / ``y°_i`` the teacher's, and
``tau > 0`` a temperature. For a matrix of logits ``Z``,
``softmax_r(Z)_ij = exp(Z_ij) / sum_j' exp(Z_ij')`` runs over the row.

Both functions are differentiable in the new embeddings only: the teacher's
embeddings pass through ``jax.lax.stop_gradient`` inside, so a caller may
compute them with the same ``apply`` and never leak gradient into the
teacher's parameters.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

SIMILARITY_PARTS = ("cross", "image", "text")

_NEG_INF = -1e9


def _check_pair(new: jnp.ndarray, old: jnp.ndarray, what: str) -> None:
  if new.ndim != 2 or new.shape != old.shape:
    raise ValueError(f"{what}: new and old embeddings must both be [B, D] with equal shapes, "
                     f"got {new.shape} and {old.shape}")


def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
  parts = tuple(parts)
  unknown = [p for p in parts if p not in SIMILARITY_PARTS]
  if not parts or unknown or len(set(parts)) != len(parts):
    raise ValueError(f"parts must be a non-empty selection of {list(SIMILARITY_PARTS)} without repeats, "
                     f"got {list(parts)}")
  return parts


def _row_kl(new_logits: jnp.ndarray, old_logits: jnp.ndarray, keep: jnp.ndarray | None) -> jnp.ndarray:
  """``mean_i KL(softmax_r(old)_i || softmax_r(new)_i)`` over the entries ``keep`` (all if None)."""
  if keep is not None:
    new_logits = jnp.where(keep, new_logits, _NEG_INF)
    old_logits = jnp.where(keep, old_logits, _NEG_INF)
  log_q = jax.nn.log_softmax(new_logits, axis=-1)
  log_p = jax.nn.log_softmax(old_logits, axis=-1)
  terms = jnp.exp(log_p) * (log_p - log_q)
  if keep is not None:
    terms = jnp.where(keep, terms, 0.0)
  return terms.sum(axis=-1).mean()


def similarity_distillation(new_image: jnp.ndarray, new_text: jnp.ndarray, old_image: jnp.ndarray,
                            old_text: jnp.ndarray, temperature: float,
                            parts: Sequence[str] = SIMILARITY_PARTS) -> jnp.ndarray:
  r"""KL divergence between the teacher's and the new model's in-batch similarity distributions.

  Each part compares row-softmaxes of a similarity matrix divided by ``tau``,
  the teacher's as target::

      KL(Z°, Z) = 1/R sum_i sum_j p_ij (log p_ij - log q_ij),
      p = softmax_r(Z° / tau),  q = softmax_r(Z / tau)      (R rows)

  * ``cross``: the cross-modal matrix ``C_ij = x_i . y_j`` in both retrieval
    directions, ``1/2 [KL(C°, C) + KL(C°^T, C^T)]`` (rows: image→text, then
    text→image), like the symmetric contrastive loss;
  * ``image``: ``I_ij = x_i . x_j`` over ``j != i``;
  * ``text``: ``T_ij = y_i . y_j`` over ``j != i``.

  The diagonal of the intra-modal matrices is left out: for unit vectors it
  is always ``1/tau`` in both models, carries no information and would
  dominate the softmax. The result is the mean over the chosen parts, so a
  weight tuned for one selection keeps its scale for another. It is ``>= 0``
  and exactly 0 when the new embeddings equal the teacher's.

  Args:
    new_image: ``[B, D]`` image embeddings of the model being trained.
    new_text: ``[B, D]`` caption embeddings of the model being trained.
    old_image: ``[B, D]`` the teacher's image embeddings of the same batch.
    old_text: ``[B, D]`` the teacher's caption embeddings of the same batch.
    temperature: ``tau > 0``.
    parts: which of ``"cross"``, ``"image"``, ``"text"`` to compare.

  Returns:
    A float32 scalar; its gradient reaches only ``new_image`` and ``new_text``.

  Raises:
    ValueError: for a non-positive temperature, unknown or repeated parts,
      mismatched shapes, or an intra-modal part on a batch of one.
  """
  parts = _check_parts(parts)
  if isinstance(temperature, numbers.Real) and not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature!r}")
  _check_pair(new_image, old_image, "similarity_distillation (image)")
  _check_pair(new_text, old_text, "similarity_distillation (text)")
  batch = new_image.shape[0]
  if new_text.shape[0] != batch:
    raise ValueError(f"similarity_distillation: {batch} images but {new_text.shape[0]} captions")
  if batch < 2 and ("image" in parts or "text" in parts):
    raise ValueError("similarity_distillation: intra-modal parts need a batch of at least 2")
  x, y = new_image.astype(jnp.float32), new_text.astype(jnp.float32)
  x_old = jax.lax.stop_gradient(old_image).astype(jnp.float32)
  y_old = jax.lax.stop_gradient(old_text).astype(jnp.float32)
  off_diagonal = ~jnp.eye(batch, dtype=bool)

  terms = []
  if "cross" in parts:
    cross, cross_old = x @ y.T / temperature, x_old @ y_old.T / temperature
    terms.append(0.5 * (_row_kl(cross, cross_old, None) + _row_kl(cross.T, cross_old.T, None)))
  if "image" in parts:
    terms.append(_row_kl(x @ x.T / temperature, x_old @ x_old.T / temperature, off_diagonal))
  if "text" in parts:
    terms.append(_row_kl(y @ y.T / temperature, y_old @ y_old.T / temperature, off_diagonal))
  return sum(terms) / len(terms)


def embedding_distillation(new_image: jnp.ndarray, new_text: jnp.ndarray, old_image: jnp.ndarray,
                           old_text: jnp.ndarray) -> jnp.ndarray:
  r"""Mean squared distance between the new and the teacher's unit embeddings.

  ::

      L = 1/2 [ 1/B sum_i ||x_i - x°_i||^2 + 1/B sum_i ||y_i - y°_i||^2 ]

  For unit vectors ``||x - x°||^2 = 2 - 2 cos(x, x°)``, so ``0 <= L <= 4``.
  Stricter than :func:`similarity_distillation`: it pins every embedding,
  while that one allows any change that keeps the in-batch similarities
  (a rotation of the whole space, for instance).

  Args:
    new_image: ``[B, D]`` image embeddings of the model being trained.
    new_text: ``[B, D]`` caption embeddings of the model being trained.
    old_image: ``[B, D]`` the teacher's image embeddings of the same batch.
    old_text: ``[B, D]`` the teacher's caption embeddings of the same batch.

  Returns:
    A float32 scalar; its gradient reaches only ``new_image`` and ``new_text``.
  """
  _check_pair(new_image, old_image, "embedding_distillation (image)")
  _check_pair(new_text, old_text, "embedding_distillation (text)")

  def mean_squared_distance(new, old):
    difference = new.astype(jnp.float32) - jax.lax.stop_gradient(old).astype(jnp.float32)
    return jnp.sum(jnp.square(difference), axis=-1).mean()

  return 0.5 * (mean_squared_distance(new_image, old_image) + mean_squared_distance(new_text, old_text))
