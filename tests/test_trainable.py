"""``train.trainable``: frozen params get no update and no optimizer state; the rest train as before."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ccmr_jax import sharding, train
from ccmr_jax.continual import regularizers
from ccmr_jax.models.dual_encoder import build_model
from configs import tiny


def _setup(trainable, regs=()):
  config = tiny.get_config()
  config.train.trainable = trainable
  model = build_model(config.model, vocab_size=50, max_length=8)
  mesh = sharding.make_mesh()
  params = train.init_params(model, 0, 64, 8, mesh)
  optimizer = train.make_optimizer(config.train, list(regs))
  step = train.make_train_step(train.make_loss_fn(model, config.loss), optimizer, mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (32, 64, 64, 3), np.uint8), "tokens": rng.integers(2, 50, (32, 8), np.int32),
           "image_key": np.arange(32, dtype=np.int32), "text_key": np.arange(32, dtype=np.int32)}
  return params, optimizer, step, sharding.to_global(batch, mesh), mesh


def _paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _train_steps(trainable, regs=(), steps=3):
  params, optimizer, step, batch, mesh = _setup(trainable, regs)
  before = {k: np.asarray(v) for k, v in _paths(params).items()}
  state = train.init_state(params, optimizer, mesh)
  for _ in range(steps):
    state, _ = step(state, batch, np.float32(1e-2), None)
  after = {k: np.asarray(v) for k, v in _paths(state.params).items()}
  return before, after, state


@pytest.mark.parametrize("trainable, trains", [
    ("text_side", lambda path: path.startswith(("params/text_", "params/log_scale"))),
    ("projections", lambda path: path.endswith("log_scale") or "_projection/" in path),
    ("image_tower/Conv_*,log_scale", lambda path: path.startswith(("params/image_tower/Conv_", "params/log_"))),
])
def test_trainable_freezes_exactly_what_it_names(trainable, trains):
  before, after, state = _train_steps(trainable)
  assert any(trains(p) for p in before) and not all(trains(p) for p in before)
  for path in before:
    changed = not np.array_equal(before[path], after[path])
    assert changed == trains(path), path
  # Adam's moments exist for the trained params only: one mu and one nu leaf each, no state for the frozen ones.
  adam_leaves = [leaf for leaf in jax.tree.leaves(state.opt_state) if getattr(leaf, "ndim", 0) > 0]
  assert len(adam_leaves) == 2 * sum(trains(p) and before[p].ndim > 0 for p in before)


def test_everything_trainable_is_the_plain_chain_and_frozen_regularizers_hold_no_state():
  config = ml_collections.ConfigDict(dict(grad_clip=1.0, learning_rate=1e-3, weight_decay=0.0, trainable="all"))
  plain = train.make_optimizer(config)
  assert len(plain.init({"w": jnp.ones(3)})) == 2  # clip, adamw: no masking around them
  _, _, state = _train_steps("text_side", regs=[regularizers.l2_anchor(1.0)])
  (anchor_state,) = regularizers.regularizer_states(state.opt_state)
  anchored = list(_paths(anchor_state.anchor))  # a frozen param's anchor is an optax.MaskedNode: no leaf
  assert anchored and all(p.startswith(("params/text_", "params/log_scale")) for p in anchored)


def test_patterns_that_match_nothing_and_empty_patterns_are_refused():
  params, *_ = _setup("all")
  with pytest.raises(ValueError, match=r"\['towers'\] match no parameter; paths start with \['image_projection'"):
    train.trainable_mask(params, train.trainable_patterns("text_tower/*,towers"))
  with pytest.raises(ValueError, match="empty pattern"):
    train.trainable_patterns("text_tower/*,")
  with pytest.raises(ValueError, match="must be a string"):
    train.trainable_patterns(("text_tower/*",))


@pytest.mark.parametrize("trainable", ["all", "text_side"])
def test_the_step_trains_at_the_learning_rate_it_is_given(trainable):
  params, optimizer, step, batch, mesh = _setup(trainable)
  before = {k: np.asarray(v) for k, v in _paths(params).items()}
  state = train.init_state(params, optimizer, mesh)
  state, _ = step(state, batch, np.float32(0.0), None)  # lr 0 (a warmup's first step): nothing moves
  assert all(np.array_equal(before[k], np.asarray(v)) for k, v in _paths(state.params).items())
  state, _ = step(state, batch, np.float32(1e-2), None)
  assert any(not np.array_equal(before[k], np.asarray(v)) for k, v in _paths(state.params).items())
  with pytest.raises(ValueError, match="one optax.inject_hyperparams state"):
    train.set_learning_rate(optax.adam(1e-3).init(params), 0.1)
