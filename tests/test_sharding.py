"""The same global batch gives the same step on 1 device and on 8 devices."""

import jax
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
  # Plain SGD, not AdamW: Adam's 1/sqrt(v) turns reduction-order noise in near-zero gradients
  # into visible parameter steps, which would hide real disagreements behind a loose tolerance.
  # (tests/test_multihost.py compares whole runs with the real optimizer.)
  optimizer = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  state = train.init_state(params, optimizer, mesh)
  step = train.make_train_step(loss_fn, optimizer, mesh)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.to_global(batch, mesh), np.float32(0.1), None)
    losses.append(float(metrics["loss"]))
  return jax.device_get(grads), losses, jax.device_get(state.params)


def test_one_device_and_eight_devices_agree(devices):
  grads1, losses1, params1 = _run(sharding.make_mesh(devices[:1]))
  grads8, losses8, params8 = _run(sharding.make_mesh(devices))
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_not_divisible_by_devices_is_refused(devices):
  mesh = sharding.make_mesh(devices)
  try:
    sharding.check_divisible(12, mesh)
  except ValueError as e:
    assert "not divisible by the 8 devices" in str(e)
  else:
    raise AssertionError("expected a ValueError")
