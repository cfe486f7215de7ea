"""The same global batch gives the same step on 1 device and on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ccmr_jax import sharding, train
from ccmr_jax.data.batches import PairSampler
from ccmr_jax.data.scenes import SceneSpec, make_scenes
from ccmr_jax.data.tokenizer import build_tokenizer
from ccmr_jax.models.dual_encoder import build_model
from configs import tiny

STEPS = 3


def _run(mesh):
  config = tiny.get_config()
  examples = make_scenes(SceneSpec(num_train=128, num_val=8, num_test=8, seed=0)).splits["train"]
  tokenizer = build_tokenizer(examples.captions, 16, 8)
  model = build_model(config.model, tokenizer.vocab_size, tokenizer.max_length)
  batches = list(PairSampler.create(examples, tokenizer).epoch(32, seed=0, task=0, epoch=0))[:STEPS]
  params = jax.jit(model.init, out_shardings=sharding.replicated(mesh))(
      jax.random.key(0), batches[0]["image"][:1], batches[0]["tokens"][:1])
  loss_fn = train.make_loss_fn(model, config.loss)
  grads = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))(params, sharding.to_global(batches[0], mesh))
  out = {"grads": jax.device_get(grads)}
  # The real optimizer (AdamW) for the loss trajectory; plain SGD for the parameters, since
  # Adam's 1/sqrt(v) turns reduction-order noise in near-zero gradients into visible steps.
  for name, optimizer in (("adamw", train.make_optimizer(config.train)),
                          ("sgd", optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)))):
    state = train.init_state(jax.tree.map(jnp.copy, params), optimizer, mesh)  # steps donate the state
    step = train.make_train_step(loss_fn, optimizer, mesh)
    losses = []
    for batch in batches:
      state, metrics = step(state, sharding.to_global(batch, mesh), np.float32(1e-3 if name == "adamw" else 0.1))
      losses.append(float(metrics["loss"]))
    out[name] = (losses, jax.device_get(state.params))
  return out


def test_one_device_and_eight_devices_agree(devices):
  one, eight = _run(sharding.make_mesh(devices[:1])), _run(sharding.make_mesh(devices))
  for a, b in zip(jax.tree.leaves(one["grads"]), jax.tree.leaves(eight["grads"])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(one["adamw"][0], eight["adamw"][0], rtol=1e-5)
  np.testing.assert_allclose(one["sgd"][0], eight["sgd"][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one["sgd"][1]), jax.tree.leaves(eight["sgd"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_not_divisible_by_devices_is_refused(devices):
  mesh = sharding.make_mesh(devices)
  try:
    sharding.check_divisible(12, mesh)
  except ValueError as e:
    assert "not divisible by the 8 devices" in str(e)
  else:
    raise AssertionError("expected a ValueError")
