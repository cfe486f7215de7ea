"""Contrastive losses over the global batch of matched (image, caption) pairs.

Notation: ``x_i`` image and ``y_j`` caption embeddings (unit vectors) of a
batch of ``B`` pairs, ``s_ij = <x_i, y_j>``; pair ``i`` is the positive of
row/column ``i``. ``valid_negative[i, j]`` is false on the diagonal and for
pairs that are not true negatives (the same image twice, or two captions with
the same text), which are left out of both losses.

Both losses take the whole global batch: under ``jax.jit`` with the batch
sharded over devices, XLA gathers what the similarity matrix needs, so every
example is contrasted with every other example of the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e9


def valid_negatives(image_key: jnp.ndarray, text_key: jnp.ndarray) -> jnp.ndarray:
  """``bool [B, B]``: which off-diagonal pairs are true negatives."""
  same = (image_key[:, None] == image_key[None, :]) | (text_key[:, None] == text_key[None, :])
  return ~same


def info_nce(image_emb: jnp.ndarray, text_emb: jnp.ndarray, scale: jnp.ndarray,
             valid_negative: jnp.ndarray) -> jnp.ndarray:
  """Symmetric InfoNCE (CLIP) with a learnable inverse temperature ``scale``.

  ``L = 1/2 · mean_i [ -log softmax_j(scale·s_ij)_i - log softmax_j(scale·s_ji)_i ]``
  where the softmax runs over the positive and the valid negatives only.
  """
  logits = scale * image_emb @ text_emb.T
  keep = valid_negative | jnp.eye(logits.shape[0], dtype=bool)
  logits = jnp.where(keep, logits, _NEG_INF)
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (i2t.mean() + t2i.mean())


def vse_hinge(image_emb: jnp.ndarray, text_emb: jnp.ndarray, margin: float,
              valid_negative: jnp.ndarray, hardest: bool = True) -> jnp.ndarray:
  """VSE++ hinge loss (Faghri et al. 2018).

  ``L = mean_i [ max_j [m + s_ij - s_ii]_+  +  max_j [m + s_ji - s_ii]_+ ]``
  over valid negatives ``j``; with ``hardest=False`` the max becomes a sum
  (the VSE0 loss). The mean over the batch (VSE++ sums) keeps the learning
  rate independent of the batch size.
  """
  sims = image_emb @ text_emb.T
  diag = jnp.diagonal(sims)
  cost_caption = jnp.where(valid_negative, jax.nn.relu(margin + sims - diag[:, None]), 0.0)
  cost_image = jnp.where(valid_negative, jax.nn.relu(margin + sims - diag[None, :]), 0.0)
  if hardest:
    return (cost_caption.max(axis=1) + cost_image.max(axis=0)).mean()
  return (cost_caption.sum(axis=1) + cost_image.sum(axis=0)).mean()


def backward_compatible(image_emb: jnp.ndarray, text_emb: jnp.ndarray, old_image_emb: jnp.ndarray,
                        old_text_emb: jnp.ndarray, scale: jnp.ndarray, valid_negative: jnp.ndarray) -> jnp.ndarray:
  """Cross-model InfoNCE: the new encoders' queries against the old encoders' gallery vectors.

  With ``x_i``, ``y_i`` the new and ``x'_i``, ``y'_i`` the old (teacher)
  embeddings of the same batch, image queries rank the old captions and
  caption queries the old images:

  ``L = 1/2 · mean_i [ -log softmax_j(scale·<x_i, y'_j>)_i - log softmax_j(scale·<y_i, x'_j>)_i ]``

  over the positive and the valid negatives, so that new queries keep
  finding their items in a gallery the old encoders embedded (the
  backward-compatible training of Shen et al., CVPR 2020, as a contrastive
  cross-modal term). The old embeddings carry no gradient.
  """
  keep = valid_negative | jnp.eye(image_emb.shape[0], dtype=bool)

  def rows_cross_entropy(queries, gallery):
    logits = jnp.where(keep, scale * queries @ jax.lax.stop_gradient(gallery).T, _NEG_INF)
    return (jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)).mean()

  return 0.5 * (rows_cross_entropy(image_emb, old_text_emb) + rows_cross_entropy(text_emb, old_image_emb))


LOSSES = ("info_nce", "vse_hinge")


def contrastive_loss(name: str, image_emb, text_emb, scale, valid_negative, margin: float) -> jnp.ndarray:
  """The loss named by ``config.loss.name``."""
  if name == "info_nce":
    return info_nce(image_emb, text_emb, scale, valid_negative)
  if name == "vse_hinge":
    return vse_hinge(image_emb, text_emb, margin, valid_negative)
  raise ValueError(f"unknown loss.name {name!r}; choose one of {list(LOSSES)}")
