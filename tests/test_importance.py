"""Tests for ccmr_jax.continual.importance (Fisher and MAS importance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccmr_jax.continual import fisher_diagonal, mas_importance

N_BATCHES, B, D, K = 3, 5, 3, 2


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((N_BATCHES, B, D)).astype(np.float32)
  y = rng.standard_normal((N_BATCHES, B)).astype(np.float32)
  return x, y


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {
      "w": jnp.asarray(rng.standard_normal(D), jnp.float32),
      "b": jnp.asarray(0.3, jnp.float32),
      "W": jnp.asarray(rng.standard_normal((D, K)), jnp.float32),
      "unused": jnp.ones((2,), jnp.float32),
  }


def _loss(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y)**2)


def _fisher_by_hand(params, x, y):
  """Closed form: for r = x w + b - y, dL/dw = 2/B X^T r, dL/db = 2/B sum r."""
  w, b = np.asarray(params["w"], np.float64), float(params["b"])
  fw, fb = np.zeros(D), 0.0
  for xb, yb in zip(x.astype(np.float64), y.astype(np.float64)):
    r = xb @ w + b - yb
    fw += (2.0 / len(r) * xb.T @ r)**2
    fb += (2.0 / len(r) * r.sum())**2
  n = len(x)
  return {"w": fw / n, "b": fb / n, "W": np.zeros((D, K)), "unused": np.zeros(2)}


def _close(tree, expected, rtol=1e-5, atol=1e-6):
  assert set(tree) == set(expected)
  for k in expected:
    assert tree[k].shape == np.shape(expected[k]), k
    np.testing.assert_allclose(np.asarray(tree[k]), expected[k], rtol=rtol, atol=atol, err_msg=k)


def test_fisher_diagonal_matches_closed_form():
  params = _params()
  x, y = _data()
  batches = [(x[i], y[i]) for i in range(N_BATCHES)]
  expected = _fisher_by_hand(params, x, y)
  assert expected["w"].min() > 1e-3  # non-trivial

  _close(fisher_diagonal(_loss, params, batches), expected)
  # Stacked input, usable inside jit.
  stacked = jax.jit(lambda p, xs, ys: fisher_diagonal(_loss, p, (xs, ys), stacked=True))
  _close(stacked(params, x, y), expected)
  # Generators, has_aux and max_batches.
  aux_loss = lambda p, bt: (_loss(p, bt), {"aux": 1.0})
  _close(fisher_diagonal(aux_loss, params, iter(batches), has_aux=True), expected)
  _close(fisher_diagonal(_loss, params, batches * 5, max_batches=N_BATCHES), expected)
  two = _fisher_by_hand(params, x[:2], y[:2])
  _close(fisher_diagonal(_loss, params, (x, y), stacked=True, max_batches=2), two)


def test_fisher_diagonal_errors():
  params = _params()
  with pytest.raises(ValueError, match="empty"):
    fisher_diagonal(_loss, params, [])
  with pytest.raises(ValueError, match="max_batches"):
    fisher_diagonal(_loss, params, [], max_batches=0)


def _embed(params, batch):
  x, _ = batch
  return x @ params["W"]


def _mas_by_hand(params, x, per_example):
  """||x W||^2 has gradient 2 x x^T W w.r.t. W."""
  W = np.asarray(params["W"], np.float64)
  x = x.astype(np.float64)
  if per_example:
    grads = [np.abs(2.0 * np.outer(xn, xn) @ W) for xb in x for xn in xb]
    omega = np.mean(grads, axis=0)
  else:
    omega = np.mean([np.abs(2.0 / len(xb) * xb.T @ xb @ W) for xb in x], axis=0)
  return {"w": np.zeros(D), "b": 0.0, "W": omega, "unused": np.zeros(2)}


@pytest.mark.parametrize("per_example", [False, True])
def test_mas_importance_matches_closed_form(per_example):
  params = _params()
  x, y = _data()
  batches = [(x[i], y[i]) for i in range(N_BATCHES)]
  expected = _mas_by_hand(params, x, per_example)
  _close(mas_importance(_embed, params, batches, per_example=per_example), expected)
  stacked = jax.jit(
      lambda p, xs, ys: mas_importance(_embed, p, (xs, ys), per_example=per_example, stacked=True))
  _close(stacked(params, x, y), expected)


def _mas_elementwise(W, batches):
  """Both MAS forms, written out element by element (no matrix algebra shared with `_mas_by_hand`).

    For one example x, s(x) = sum_k (sum_j x_j W_jk)^2, so ds/dW_jk = 2 x_j (x W)_k.
    """
  W = np.asarray(W, np.float64)
  rows, cols = W.shape
  per_example, per_batch, count = np.zeros_like(W), np.zeros_like(W), 0
  for xb in batches:
    xb = np.asarray(xb, np.float64)
    batch_mean = np.zeros_like(W)
    for xn in xb:
      out = [sum(xn[j] * W[j, k] for j in range(rows)) for k in range(cols)]
      g = np.array([[2.0 * xn[j] * out[k] for k in range(cols)] for j in range(rows)])
      per_example += np.abs(g)
      batch_mean += g / len(xb)
      count += 1
    per_batch += np.abs(batch_mean)
  return per_example / count, per_batch / len(batches)


def test_mas_per_example_differs_from_batch_approximation_and_bounds_it():
  params = _params()
  x = np.random.default_rng(5).standard_normal((4, 6, D)).astype(np.float32)  # 4 batches of 6
  batches = [(x[i], None) for i in range(len(x))]
  exact, approx = _mas_elementwise(params["W"], x)
  got_exact = np.asarray(mas_importance(_embed, params, batches, per_example=True)["W"])
  got_approx = np.asarray(mas_importance(_embed, params, batches)["W"])
  np.testing.assert_allclose(got_exact, exact, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_approx, approx, rtol=1e-5, atol=1e-6)
  # The implementation's two forms differ, and the batch approximation is a lower bound (|mean g| <= mean |g|).
  assert not np.allclose(got_exact, got_approx, rtol=1e-2)
  assert np.all(got_exact >= got_approx - 1e-6)
  assert np.any(got_exact > got_approx * 1.05)


def test_mas_pytree_outputs_and_uneven_batches():
  """Outputs as a dict (image/text embeddings): squared norms are summed.
    Per-example mode averages over all examples, even with uneven batch sizes."""
  params = _params()
  x, y = _data()
  batches = [(x[0], y[0]), (x[1, :2], y[1, :2])]

  def two_towers(p, batch):
    xb, _ = batch
    return {"img": xb @ p["W"], "txt": (xb @ p["w"])[:, None]}

  W = np.asarray(params["W"], np.float64)
  w = np.asarray(params["w"], np.float64)
  xs = [xn for xb, _ in batches for xn in xb.astype(np.float64)]
  exp_W = np.mean([np.abs(2 * np.outer(xn, xn) @ W) for xn in xs], axis=0)
  exp_w = np.mean([np.abs(2 * (xn @ w) * xn) for xn in xs], axis=0)
  got = mas_importance(two_towers, params, batches, per_example=True)
  np.testing.assert_allclose(np.asarray(got["W"]), exp_W, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got["w"]), exp_w, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got["unused"]), 0.0)

  # Batch-level approximation: mean over batches of |grad of the batch mean|.
  per_batch = []
  for xb, _ in batches:
    xb = xb.astype(np.float64)
    per_batch.append(np.abs(2.0 / len(xb) * xb.T @ (xb @ w)))
  got = mas_importance(two_towers, params, batches)
  np.testing.assert_allclose(np.asarray(got["w"]), np.mean(per_batch, axis=0), rtol=1e-5)
