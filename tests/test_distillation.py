"""Distillation terms against numpy values computed entry by entry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccmr_jax.continual.distillation import SIMILARITY_PARTS, embedding_distillation, similarity_distillation

TAU = 0.2


def unit_rows(seed, batch=5, dim=4):
  x = np.random.default_rng(seed).standard_normal((batch, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_row_kl(new, old, skip_diagonal):
  """``mean_i KL(softmax(old_i / tau) || softmax(new_i / tau))``, written out with loops."""
  total = 0.0
  for i in range(len(new)):
    cols = [j for j in range(new.shape[1]) if not (skip_diagonal and j == i)]
    p = np.exp(old[i, cols] / TAU) / np.exp(old[i, cols] / TAU).sum()
    q = np.exp(new[i, cols] / TAU) / np.exp(new[i, cols] / TAU).sum()
    total += float(np.sum(p * np.log(p / q)))
  return total / len(new)


def numpy_similarity_distillation(x, y, x_old, y_old, parts):
  x, y, x_old, y_old = (a.astype(np.float64) for a in (x, y, x_old, y_old))
  values = {
      "cross": 0.5 * (numpy_row_kl(x @ y.T, x_old @ y_old.T, False)
                      + numpy_row_kl(y @ x.T, y_old @ x_old.T, False)),
      "image": numpy_row_kl(x @ x.T, x_old @ x_old.T, True),
      "text": numpy_row_kl(y @ y.T, y_old @ y_old.T, True),
  }
  return np.mean([values[p] for p in parts])


@functools.partial(jax.jit, static_argnames="parts")
def distill(x, y, x_old, y_old, parts=SIMILARITY_PARTS):
  return similarity_distillation(x, y, x_old, y_old, TAU, parts)


@pytest.mark.parametrize("parts", [SIMILARITY_PARTS, ("cross",), ("image",), ("text", "image")])
def test_similarity_distillation_matches_the_entrywise_definition(parts):
  x, y, x_old, y_old = (unit_rows(s) for s in range(4))
  expected = numpy_similarity_distillation(x, y, x_old, y_old, parts)
  assert expected > 0.01
  np.testing.assert_allclose(float(distill(x, y, x_old, y_old, parts=parts)), expected, rtol=1e-5)


def test_cross_part_of_two_pairs_is_the_kl_of_two_bernoullis():
  # New: x = y = (e1, e2), so C = I. Old: y_1 turned by an angle a, so C° = [[cos a, sin a], [0, 1]].
  a = 0.6
  e1, e2 = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
  x = np.stack([e1, e2])
  y_old = np.stack([np.array([np.cos(a), np.sin(a)], np.float32), e2])
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  bernoulli_kl = lambda p, q: p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
  q = sigmoid(1 / TAU)  # every row and column of C/tau is (1/tau, 0) up to order
  image_to_text = bernoulli_kl(sigmoid((np.cos(a) - np.sin(a)) / TAU), q) + bernoulli_kl(sigmoid(1 / TAU), q)
  text_to_image = bernoulli_kl(sigmoid(np.cos(a) / TAU), q) + bernoulli_kl(sigmoid((1 - np.sin(a)) / TAU), q)
  expected = 0.5 * (image_to_text / 2 + text_to_image / 2)
  np.testing.assert_allclose(float(distill(x, x, x, y_old, parts=("cross",))), expected, rtol=1e-5)


def test_both_terms_vanish_when_nothing_changed():
  x, y = unit_rows(0), unit_rows(1)
  assert abs(float(distill(x, y, x, y))) < 1e-6
  assert abs(float(jax.jit(embedding_distillation)(x, y, x, y))) < 1e-7


def test_embedding_distillation_is_the_mean_squared_distance():
  x, y, x_old, y_old = (unit_rows(s) for s in range(4))
  expected = 0.5 * (np.mean(np.sum((x - x_old) ** 2, 1)) + np.mean(np.sum((y - y_old) ** 2, 1)))
  np.testing.assert_allclose(float(jax.jit(embedding_distillation)(x, y, x_old, y_old)), expected, rtol=1e-5)
  np.testing.assert_allclose(expected, 0.5 * (np.mean(2 - 2 * np.sum(x * x_old, 1))
                                              + np.mean(2 - 2 * np.sum(y * y_old, 1))), rtol=1e-5)


@pytest.mark.parametrize("term", ["similarity", "embedding"])
def test_gradient_reaches_only_the_new_embeddings(term):
  fn = distill if term == "similarity" else embedding_distillation
  grads = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))(*(unit_rows(s) for s in range(4)))
  assert all(float(jnp.abs(g).max()) > 0 for g in grads[:2])
  assert all(float(jnp.abs(g).max()) == 0 for g in grads[2:])


def test_bad_arguments_are_refused():
  x = unit_rows(0)
  with pytest.raises(ValueError, match="temperature must be positive"):
    similarity_distillation(x, x, x, x, 0.0)
  with pytest.raises(ValueError, match="parts must be a non-empty selection"):
    similarity_distillation(x, x, x, x, TAU, parts=("cross", "audio"))
  with pytest.raises(ValueError, match="parts must be a non-empty selection"):
    similarity_distillation(x, x, x, x, TAU, parts=())
  with pytest.raises(ValueError, match="equal shapes"):
    similarity_distillation(x, x, x[:3], x, TAU)
  with pytest.raises(ValueError, match="batch of at least 2"):
    similarity_distillation(x[:1], x[:1], x[:1], x[:1], TAU, parts=("image",))
