"""Tests for ccmr_jax.continual.regularizers (optax continual-learning regularizers)."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ccmr_jax.continual import (
    EWCState,
    L2AnchorState,
    MASState,
    OnlineEWCState,
    SIState,
    consolidate,
    ewc,
    fisher_diagonal,
    l2_anchor,
    mas,
    mas_importance,
    online_ewc,
    penalty,
    regularizer_states,
    si,
    transfer_regularizer_states,
)
from ccmr_jax.continual.regularizers import RegularizerSpec, regularizer_specs

LR = 0.1
STRENGTH = 0.7
DAMPING = 0.05
DECAY = 0.5
KINDS = ["l2", "ewc", "online_ewc", "mas", "si"]


def make_reg(kind, strength=STRENGTH):
  return {
      "l2": lambda: l2_anchor(strength),
      "ewc": lambda: ewc(strength),
      "online_ewc": lambda: online_ewc(strength, decay=DECAY),
      "mas": lambda: mas(strength),
      "si": lambda: si(strength, damping=DAMPING),
  }[kind]()


def tree_like(seed, positive=False):
  rng = np.random.default_rng(seed)
  draw = lambda shape: rng.standard_normal(shape).astype(np.float32)
  tree = {"w": draw((3, 2)), "b": draw((2,)), "nested": {"v": draw((4,))}}
  if positive:
    tree = jax.tree.map(lambda x: np.abs(x) + np.float32(0.1), tree)
  return tree  # numpy: expected values are computed without compiling eager JAX ops


def tmap(f, *trees):
  return jax.tree.map(f, *trees)


# Expected values are computed with numpy, and JAX functions of the tests are
# jitted: compiling a handful of programs is much cheaper than compiling every
# eager JAX op for every shape.


def to_np(tree):
  return jax.tree.map(np.asarray, tree)


def value_and_grad_np(f, theta):
  value, grad = jax.jit(jax.value_and_grad(f))(theta)
  return float(value), to_np(grad)


def grad_np(f, theta):
  return value_and_grad_np(f, theta)[1]


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


ALL_TRUE = {"w": True, "b": True, "nested": {"v": True}}


def hand_penalty(kind, theta, anchor, importance, theta_init, theta0, g0, leaf_mask=ALL_TRUE):
  """Penalty written out by hand for one consolidation (see `run_one_task`)."""

  def leaf(th, a, f, ti, t0, gg, m):
    if not m:
      return jnp.zeros(())
    if kind == "l2":
      return STRENGTH / 2 * jnp.sum((th - a)**2)
    if kind in ("ewc", "online_ewc", "mas"):
      return STRENGTH / 2 * jnp.sum(f * (th - a)**2)
    # SI: the task started at theta_init; the first update (at theta0, with
    # g0) only records; its step theta0 -> anchor is added by consolidate.
    omega = -gg * (a - t0) / ((a - ti)**2 + DAMPING)
    return STRENGTH * jnp.sum(omega * (th - a)**2)

  terms = jax.tree.map(leaf, theta, anchor, importance, theta_init, theta0, g0, leaf_mask)
  return sum(jax.tree.leaves(terms))


CONSOLIDATE_JIT = jax.jit(consolidate)


def run_one_task(opt, leaf_mask=ALL_TRUE):
  """init at theta_init; one update at theta0 (!= theta_init) with g0;
    consolidate at anchor = theta0 - 0.3 g0 with a hand-made importance.

    Before the consolidation the penalty must be exactly zero: checked here.
    Returns the consolidated state, the jitted update and the hand-made context.
    """
  theta_init, theta0, g0 = tree_like(7), tree_like(0), tree_like(1)
  anchor = tmap(lambda t, g: t - 0.3 * g, theta0, g0)
  importance = tree_like(2, positive=True)
  update = jax.jit(opt.update)
  state = opt.init(theta_init)
  updates, state = update(g0, state, theta0)
  for u, gi in zip(jax.tree.leaves(updates), jax.tree.leaves(g0)):  # no penalty yet
    np.testing.assert_array_equal(np.asarray(u), -LR * gi)
  assert float(penalty(state, theta0)) == 0.0
  assert all(int(s.num_tasks) == 0 for s in regularizer_states(state))
  state = CONSOLIDATE_JIT(state, anchor, importance)
  ctx = dict(anchor=anchor, importance=importance, theta_init=theta_init, theta0=theta0, g0=g0)
  return state, update, ctx


# ---------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------


def test_specs_describe_every_regularizer_in_chain_order():
  specs = regularizer_specs()
  # The chain order is part of the results (si must see the raw loss gradient first).
  assert [spec.name for spec in specs] == ["si", "l2", "ewc", "online_ewc", "mas"]
  assert [spec.transform for spec in specs] == ["si", "l2_anchor", "ewc", "online_ewc", "mas"]
  assert [spec.importance for spec in specs] == [None, None, "fisher", "fisher", "mas"]
  params = tree_like(0)
  section = {"strength": STRENGTH, "damping": DAMPING, "decay": DECAY}
  for spec, kind in zip(specs, ["si", "l2", "ewc", "online_ewc", "mas"]):
    assert {field for field, _, _ in spec.hyperparameters} <= set(section)
    built = spec.build({field: section[field] for field, _, _ in spec.hyperparameters}).init(params)
    assert type(built) is type(make_reg(kind).init(params)) is spec.state_type
    assert jax.tree.structure(getattr(built, spec.template_field)) == jax.tree.structure(params)
    assert float(built.strength) == pytest.approx(STRENGTH)
  with pytest.raises(ValueError, match="importance must be None or one of"):
    RegularizerSpec(**{**vars(specs[0]), "importance": "hessian"})


# ---------------------------------------------------------------------------
# Core property: chain(reg, sgd)(g) == sgd(g + grad penalty)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_update_equals_sgd_on_penalized_gradient_and_penalty_matches(kind):
  opt = optax.chain(make_reg(kind), optax.sgd(LR))
  state, update, ctx = run_one_task(opt)
  (reg_state,) = regularizer_states(state)
  assert int(reg_state.num_tasks) == 1
  theta, g = tree_like(3), tree_like(4)
  hand = lambda th: hand_penalty(kind, th, **ctx)
  expected_value, hand_grad = value_and_grad_np(hand, theta)
  assert max(np.abs(x).max() for x in jax.tree.leaves(hand_grad)) > 1e-2  # not trivially 0
  expected = tmap(lambda gi, pg: -LR * (gi + pg), g, hand_grad)

  assert_tree_close(update(g, state, theta)[0], expected)  # jitted
  if kind == "l2":  # eager too (other kinds: jitted only, to keep the suite fast)
    assert_tree_close(opt.update(g, state, theta)[0], expected)

  # Explicit penalty: value, gradient, single-state form, zero at the anchor.
  assert expected_value > 1e-2
  value, grad = value_and_grad_np(lambda th: penalty(state, th), theta)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  assert_tree_close(grad, hand_grad)
  np.testing.assert_allclose(float(penalty(reg_state, theta)), expected_value, rtol=1e-5)
  np.testing.assert_allclose(float(penalty(state, ctx["anchor"])), 0.0, atol=1e-6)


# ---------------------------------------------------------------------------
# optax.masked
# ---------------------------------------------------------------------------

# One mask exercising both forms of optax.masked: a masked-out leaf ("b") and a
# masked-out subtree given by a prefix mask ("nested": False for a dict).
MASK = {"w": True, "b": False, "nested": False}
LEAF_MASK = {"w": True, "b": False, "nested": {"v": False}}


@pytest.mark.parametrize("kind", KINDS)
def test_masked(kind):
  opt = optax.chain(optax.masked(make_reg(kind), MASK), optax.sgd(LR))
  state, update, ctx = run_one_task(opt)  # full params/importance passed
  (reg_state,) = regularizer_states(state)
  assert int(reg_state.num_tasks) == 1
  anchor_field = reg_state.fisher_sum if kind == "ewc" else reg_state.anchor
  assert isinstance(anchor_field["b"], optax.MaskedNode)
  assert isinstance(anchor_field["nested"], optax.MaskedNode)

  theta, g = tree_like(3), tree_like(4)
  updates, _ = update(g, state, theta)
  hand = lambda th: hand_penalty(kind, th, leaf_mask=LEAF_MASK, **ctx)
  hand_value, hand_grad = value_and_grad_np(hand, theta)
  expected = tmap(lambda gi, pg: -LR * (gi + pg), g, hand_grad)
  assert_tree_close(updates, expected)
  # Masked-out leaves receive exactly the plain SGD update, the others do not.
  for u, gi, m in zip(jax.tree.leaves(updates), jax.tree.leaves(g), jax.tree.leaves(LEAF_MASK)):
    if not m:
      np.testing.assert_array_equal(np.asarray(u), np.asarray(-LR * gi))
    else:
      assert not np.allclose(np.asarray(u), np.asarray(-LR * gi))
  np.testing.assert_allclose(float(penalty(state, theta)), hand_value, rtol=1e-5)


def test_nested_named_chain_masked_and_inject_hyperparams():
  opt = optax.named_chain(
      ("anchor", optax.masked(l2_anchor(STRENGTH), MASK)),
      ("fisher", optax.inject_hyperparams(ewc)(strength=STRENGTH)),
      ("sgd", optax.sgd(LR)),
  )
  state, update, ctx = run_one_task(opt)
  states = regularizer_states(state)
  assert [type(s) for s in states] == [L2AnchorState, EWCState]
  assert all(int(s.num_tasks) == 1 for s in states)

  def total(th, ewc_strength=STRENGTH):
    l2 = hand_penalty("l2", th, leaf_mask=LEAF_MASK, **ctx)
    return l2 + ewc_strength / STRENGTH * hand_penalty("ewc", th, **ctx)

  theta, g = tree_like(3), tree_like(4)
  updates, new_state = update(g, state, theta)
  total_value, total_grad = value_and_grad_np(total, theta)
  expected = tmap(lambda gi, pg: -LR * (gi + pg), g, total_grad)
  assert_tree_close(updates, expected)
  np.testing.assert_allclose(float(penalty(state, theta)), total_value, rtol=1e-5)

  # Changing the injected strength changes the penalty gradient and the stored strength.
  state["fisher"].hyperparams["strength"] = jnp.asarray(3.0)
  updates, new_state = update(g, state, theta)
  grad3 = grad_np(lambda th: total(th, ewc_strength=3.0), theta)
  assert_tree_close(updates, tmap(lambda gi, pg: -LR * (gi + pg), g, grad3))
  np.testing.assert_allclose(float(regularizer_states(new_state)[1].strength), 3.0)


def test_consolidate_preserves_structure_and_dtypes():
  params = tmap(lambda x: x.astype(jnp.bfloat16), tree_like(0))
  opt = optax.chain(ewc(1.0), optax.masked(si(1.0), MASK), optax.sgd(1e-3, momentum=0.9))
  state = opt.init(params)
  fisher = tree_like(2, positive=True)  # float32 importance for bf16 params
  new_state = consolidate(state, params, importance=fisher)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  # The sharding helper of optax understands the states.
  specs = optax.tree_map_params(opt, lambda p: p.shape, state, transform_non_params=lambda _: None)
  assert regularizer_states(specs)[0].fisher_sum["w"] == (3, 2)


def test_state_never_aliases_params_so_train_steps_can_donate():
  params = tree_like(0)
  opt = optax.chain(si(1.0), online_ewc(1.0, decay=1.0), optax.sgd(LR))
  state = opt.init(params)

  def step(p, s, g):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step, donate_argnums=(0, 1))
  for t in range(2):
    params, state = step(params, state, tree_like(40 + t))
    state = consolidate(state, params, importance=params)  # importance copied too
  params, state = step(params, state, tree_like(50))
  assert np.isfinite(float(penalty(state, params)))


def test_transfer_regularizer_states_into_fresh_optimizer_state():
  params = tree_like(0)
  opt = optax.chain(mas(1.0), si(1.0), optax.sgd(1e-2, momentum=0.9))
  state = opt.init(params)

  @jax.jit
  def step(p, s, g):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  for t in range(3):
    params, state = step(params, state, tree_like(60 + t))
  old = consolidate(state, params, importance=tree_like(2, positive=True))
  fresh = opt.init(params)
  moved = transfer_regularizer_states(old, fresh)
  assert jax.tree.structure(moved) == jax.tree.structure(fresh)
  for a, b in zip(regularizer_states(moved), regularizer_states(old)):
    assert type(a) is type(b)
    assert_tree_close(a, b, rtol=0, atol=0)
  assert_tree_close(moved[2], fresh[2], rtol=0, atol=0)  # optimizer state is the fresh one
  assert not np.allclose(np.asarray(state[2][0].trace["w"]), 0.0)
  with pytest.raises(ValueError, match="no matching state"):
    transfer_regularizer_states(old, optax.chain(si(1.0), mas(1.0)).init(params))
  with pytest.raises(ValueError, match="has 2 regularizer"):
    transfer_regularizer_states(old, optax.chain(mas(1.0), optax.sgd(1.0)).init(params))


# ---------------------------------------------------------------------------
# Multi-task semantics
# ---------------------------------------------------------------------------


def test_ewc_separate_two_tasks_equals_explicit_sum():
  opt = optax.chain(ewc(STRENGTH), optax.sgd(LR))
  state = opt.init(tree_like(0))
  a1, f1 = tree_like(1), tree_like(2, positive=True)
  a2, f2 = tree_like(3), tree_like(4, positive=True)
  state = consolidate(state, a1, importance=f1)
  state = consolidate(state, a2, importance=f2)

  def explicit(th):
    t1 = sum(jax.tree.leaves(tmap(lambda t, a, f: jnp.sum(f * (t - a)**2), th, a1, f1)))
    t2 = sum(jax.tree.leaves(tmap(lambda t, a, f: jnp.sum(f * (t - a)**2), th, a2, f2)))
    return STRENGTH / 2 * (t1 + t2)

  (reg_state,) = regularizer_states(state)
  assert int(reg_state.num_tasks) == 2
  assert_tree_close(reg_state.fisher_sum, tmap(np.add, f1, f2))
  assert_tree_close(reg_state.fisher_anchor_sum, tmap(lambda x1, y1, x2, y2: x1 * y1 + x2 * y2, f1, a1, f2,
                                                      a2))
  explicit_vg = jax.jit(jax.value_and_grad(explicit))
  for theta in (tree_like(5), a1, a2):
    np.testing.assert_allclose(float(penalty(state, theta)),
                               float(explicit_vg(theta)[0]),
                               rtol=1e-5,
                               atol=1e-5)
  theta, g = tree_like(5), tree_like(6)
  updates, _ = jax.jit(opt.update)(g, state, theta)
  expected = tmap(lambda gi, pg: -LR * (gi + pg), g, to_np(explicit_vg(theta)[1]))
  assert_tree_close(updates, expected)


def test_online_ewc_uses_decay():
  opt = optax.chain(online_ewc(STRENGTH, decay=DECAY), optax.sgd(LR))
  state = opt.init(tree_like(0))
  a1, f1 = tree_like(1), tree_like(2, positive=True)
  a2, f2 = tree_like(3), tree_like(4, positive=True)
  state = consolidate(state, a1, importance=f1)
  state = consolidate(state, a2, importance=f2)
  running = tmap(lambda x, y: DECAY * x + y, f1, f2)

  (reg_state,) = regularizer_states(state)
  assert isinstance(reg_state, OnlineEWCState)
  assert_tree_close(reg_state.fisher, running)
  assert_tree_close(reg_state.anchor, a2)

  def explicit(th):
    return STRENGTH / 2 * sum(jax.tree.leaves(tmap(lambda t, a, f: jnp.sum(f * (t - a)**2), th, a2, running)))

  theta, g = tree_like(5), tree_like(6)
  explicit_value, explicit_grad = value_and_grad_np(explicit, theta)
  np.testing.assert_allclose(float(penalty(state, theta)), explicit_value, rtol=1e-5)
  updates, _ = jax.jit(opt.update)(g, state, theta)
  assert_tree_close(updates, tmap(lambda gi, pg: -LR * (gi + pg), g, explicit_grad))


def test_ewc_online_mode_is_online_ewc():
  """``ewc(mode="online")`` delegates: same state type, bit-identical updates and consolidation."""
  params, g, fisher, theta = tree_like(0), tree_like(1), tree_like(2, positive=True), tree_like(3)
  runs = []
  for reg in (ewc(STRENGTH, mode="online", decay=DECAY), online_ewc(STRENGTH, DECAY)):
    state = CONSOLIDATE_JIT(reg.init(params), params, fisher)
    runs.append((state, jax.jit(reg.update)(g, state, theta)))
  assert type(runs[0][0]) is type(runs[1][0]) is OnlineEWCState
  assert_tree_close(runs[0], runs[1], rtol=0, atol=0)


def test_mas_accumulates_and_l2_uses_latest_anchor():
  params = tree_like(0)
  opt = optax.chain(mas(STRENGTH), l2_anchor(2.0), optax.sgd(LR))
  state = opt.init(params)
  a1, o1 = tree_like(1), tree_like(2, positive=True)
  a2, o2 = tree_like(3), tree_like(4, positive=True)
  state = consolidate(state, a1, importance=o1)
  state = consolidate(state, a2, importance=o2)
  mas_state, l2_state = regularizer_states(state)
  assert isinstance(mas_state, MASState)
  assert_tree_close(mas_state.importance, tmap(np.add, o1, o2))
  assert_tree_close(mas_state.anchor, a2)
  assert_tree_close(l2_state.anchor, a2)
  assert int(l2_state.num_tasks) == 2


# ---------------------------------------------------------------------------
# Synaptic Intelligence path integral
# ---------------------------------------------------------------------------


def test_si_three_step_trajectory_by_hand():
  theta = [tree_like(s) for s in (0, 1, 2, 3)]  # theta(0..3)
  grads = [tree_like(s) for s in (10, 11, 12)]  # g(0..2) at theta(0..2)
  reg = si(STRENGTH, damping=DAMPING)
  state = reg.init(theta[0])
  assert isinstance(state, SIState)
  update = jax.jit(reg.update)
  for t in range(3):
    out, state = update(grads[t], state, theta[t])
    assert_tree_close(out, grads[t])  # no penalty before the first consolidation

  # After 3 updates only g(0)->delta(0) and g(1)->delta(1) are known.
  def contrib(t):
    return tmap(lambda g, a, b: -g * (b - a), grads[t], theta[t], theta[t + 1])

  expected_path = tmap(np.add, contrib(0), contrib(1))
  assert_tree_close(state.path_integral, expected_path)
  assert bool(state.has_prev)

  state = consolidate(state, theta[3])
  omega_path = tmap(lambda a, b, c: a + b + c, contrib(0), contrib(1), contrib(2))
  expected_importance = tmap(lambda w, end, start: w / ((end - start)**2 + DAMPING), omega_path, theta[3],
                             theta[0])
  assert_tree_close(state.importance, expected_importance)
  assert_tree_close(state.anchor, theta[3])
  assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(state.path_integral))
  assert not bool(state.has_prev)

  # Penalty strength * sum Omega (theta - theta*)^2 (no 1/2) and its gradient.
  probe, g = tree_like(20), tree_like(21)
  hand = STRENGTH * sum(
      jax.tree.leaves(tmap(lambda o, t, a: np.sum(o * (t - a)**2), expected_importance, probe, theta[3])))
  np.testing.assert_allclose(float(penalty(state, probe)), float(hand), rtol=1e-5)
  out, state2 = update(g, state, probe)
  assert_tree_close(
      out, tmap(lambda gi, o, t, a: gi + 2 * STRENGTH * o * (t - a), g, expected_importance, probe, theta[3]))

  # Second task: path restarts at theta(3); Omega accumulates.
  state2 = consolidate(state2, theta[0])
  # Pending step: g at `probe` moved the params to theta(0); the task started at theta(3).
  omega2 = tmap(lambda o, gg, p, e, s: o + (-gg * (e - p)) / ((e - s)**2 + DAMPING), expected_importance, g,
                probe, theta[0], theta[3])
  assert_tree_close(state2.importance, omega2)
  assert int(state2.num_tasks) == 2


def test_si_in_chain_with_sgd_path_is_lr_times_squared_gradient():
  # With plain SGD, delta = -lr * g, so omega = lr * sum_t g(t)^2.
  params = tree_like(0)
  opt = optax.chain(si(1.0, damping=DAMPING), optax.sgd(LR))
  state = opt.init(params)
  grads = [tree_like(s) for s in (30, 31, 32)]

  @jax.jit
  def step(p, s, g):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  for g in grads:
    params, state = step(params, state, g)
  state = consolidate(state, params)
  (reg_state,) = regularizer_states(state)
  total_sq = tmap(lambda a, b, c: LR * (a**2 + b**2 + c**2), *grads)
  moved = tmap(lambda a, b, c: -LR * (a + b + c), *grads)
  expected = tmap(lambda w, d: w / (d**2 + DAMPING), total_sq, moved)
  assert_tree_close(reg_state.importance, expected, rtol=1e-4)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_validation_errors():
  with pytest.raises(ValueError, match="mode"):
    ewc(1.0, mode="offline")
  for bad in (0.0, -0.5, 1.5):
    with pytest.raises(ValueError, match="decay"):
      ewc(1.0, mode="online", decay=bad)
    with pytest.raises(ValueError, match="decay"):
      online_ewc(1.0, decay=bad)
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match="damping"):
      si(1.0, damping=bad)
  with pytest.raises(ValueError, match="strength"):
    l2_anchor(-1.0)
  with pytest.raises(ValueError, match="strength"):
    mas(float("nan"))


@pytest.mark.parametrize("kind", KINDS)
def test_update_without_params_raises(kind):
  reg = make_reg(kind)
  params = tree_like(0)
  state = reg.init(params)
  with pytest.raises(ValueError, match="params"):
    reg.update(params, state)
  opt = optax.chain(reg, optax.sgd(LR))
  with pytest.raises(ValueError, match="params"):
    opt.update(params, opt.init(params))


@pytest.mark.parametrize("kind", ["ewc", "online_ewc", "mas"])
def test_consolidate_requires_importance(kind):
  opt = optax.chain(make_reg(kind), optax.sgd(LR))
  params = tree_like(0)
  state = opt.init(params)
  with pytest.raises(ValueError, match="importance"):
    consolidate(state, params)
  bad = dict(tree_like(1), w=np.ones((2, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    consolidate(state, params, importance=bad)
  with pytest.raises(ValueError, match="structure"):
    consolidate(state, params, importance={"w": np.ones((3, 2), np.float32)})


def test_consolidate_without_regularizer():
  opt = optax.sgd(LR, momentum=0.9)
  params = tree_like(0)
  state = opt.init(params)
  state = jax.jit(opt.update)(tree_like(1), state, params)[1]  # a non-zero momentum trace
  with pytest.raises(ValueError, match=r"no regularizer state \(si/l2_anchor/ewc/online_ewc/mas\)"):
    consolidate(state, params)
  # missing_ok: the very same state comes back, leaf for leaf (nothing rebuilt, copied or reset).
  same = consolidate(state, params, missing_ok=True)
  assert jax.tree.structure(same) == jax.tree.structure(state)
  assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)))
  assert float(penalty(state, params)) == 0.0
  assert regularizer_states(state) == []


# ---------------------------------------------------------------------------
# A foreign training loop (plain linear regression, no ccmr_jax model or data)
# ---------------------------------------------------------------------------


def _regression_tasks():
  """Two noisy linear-regression tasks whose inputs live on overlapping
    coordinates {0,1,2} (A) and {1,2,3} (B) and disagree on coordinates 1, 2."""
  rng = np.random.default_rng(0)
  n = 256
  xa = rng.standard_normal((n, 4)) * np.array([1.0, 1.0, 1.0, 0.0])
  xb = rng.standard_normal((n, 4)) * np.array([0.0, 1.0, 1.0, 1.0])
  wa = np.array([1.0, -2.0, 0.5, 0.0])
  wb = np.array([0.0, 1.0, 1.5, -1.0])
  ya = xa @ wa + 0.5 * rng.standard_normal(n)
  yb = xb @ wb + 0.5 * rng.standard_normal(n)
  xa, xb, ya, yb = (jnp.asarray(v, jnp.float32) for v in (xa, xb, ya, yb))
  batches = lambda x, y: [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
  return batches(xa, ya), batches(xb, yb), (xa, ya)


def _loss(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y)**2)


_loss_jit = jax.jit(_loss)


def _embed(params, batch):
  x, _ = batch
  return (x @ params["w"] + params["b"])[:, None]


@functools.lru_cache(maxsize=None)
def _finetune_baseline():
  return _train_a_then_b(None)


def _train_a_then_b(reg):
  task_a, task_b, data_a = _regression_tasks()
  opt = optax.sgd(0.05) if reg is None else optax.chain(reg, optax.sgd(0.05))
  params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(_loss)(params, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for batches in (task_a, task_b):
    for _ in range(10):
      for batch in batches:
        params, state = step(params, state, batch)
    if batches is task_a:
      loss_a_after_a = float(_loss_jit(params, data_a))
      if reg is not None:
        kind = type(regularizer_states(state)[0])
        if kind in (EWCState, OnlineEWCState):
          imp = fisher_diagonal(_loss, params, batches)
        elif kind is MASState:
          imp = mas_importance(_embed, params, batches, per_example=True)
        else:
          imp = None
        state = consolidate(state, params, importance=imp)
  return loss_a_after_a, float(_loss_jit(params, data_a))


@pytest.mark.parametrize(
    "kind,reg",
    [("l2", lambda: l2_anchor(3.0)), ("ewc", lambda: ewc(100.0)), ("mas", lambda: mas(1.0)),
     ("si", lambda: si(1.0, damping=0.1))],
)
def test_foreign_loop_reduces_forgetting(kind, reg):
  base_a, finetune_a = _finetune_baseline()
  reg_a_after_a, reg_a = _train_a_then_b(reg())
  assert base_a < 0.5 and reg_a_after_a < 0.5  # task A was learned (noise var 0.25)
  assert finetune_a > 5.0  # plain finetuning forgets task A
  assert reg_a < 0.5 * finetune_a, (kind, reg_a, finetune_a)


# ---------------------------------------------------------------------------
# README example, section "Use the regularizers in your own optax code": its
# python block is read from README.md and run as it stands.
# ---------------------------------------------------------------------------

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
README_SECTION = "## Use the regularizers in your own optax code"
README_REGULARIZER = "ewc(strength=10.0)"


def readme_example() -> str:
  with open(README, encoding="utf-8") as f:
    text = f.read()
  assert README_SECTION in text, f"README.md lost the section {README_SECTION!r}"
  block = re.search(r"```python\n(.*?)```", text.split(README_SECTION, 1)[1], re.S)
  assert block, f"README.md: no python block in {README_SECTION!r}"
  return block.group(1)


def run_readme_example(code: str) -> dict:
  namespace = {"__name__": "readme_example"}
  exec(compile(code, README, "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_readme_example_runs_and_ewc_reduces_forgetting(capsys):
  code = readme_example()
  assert code.count(README_REGULARIZER) == 1, f"README example no longer builds {README_REGULARIZER}"
  with_ewc = run_readme_example(code)
  printed = capsys.readouterr().out
  assert re.fullmatch(r"task 0: loss \S+, penalty 0\.000\ntask 1: loss \S+, penalty \S+\n", printed), printed
  # The same code with a zero strength is plain finetuning.
  finetune = run_readme_example(code.replace(README_REGULARIZER, "ewc(strength=0.0)"))

  (reg_state,) = regularizer_states(with_ewc["opt_state"])
  assert isinstance(reg_state, EWCState) and int(reg_state.num_tasks) == 2
  assert float(penalty(with_ewc["opt_state"], with_ewc["params"])) > 0.0

  def task_loss(run, t):
    return float(np.mean([run["loss_fn"](run["params"], batch) for batch in run["tasks"][t]]))

  # Finetuning forgets task 0; EWC keeps its loss well below (about 2.5 against 5.3), at a cost on task 1.
  assert task_loss(finetune, 0) > 4.0
  assert task_loss(with_ewc, 0) < 0.6 * task_loss(finetune, 0)
  assert task_loss(with_ewc, 1) > task_loss(finetune, 1)
