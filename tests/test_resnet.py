"""ResNet image tower: the ResNet-50 layout, both normalisations, pretrained weights in and out."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccmr_jax.models import resnet, weights
from ccmr_jax.models.dual_encoder import build_model

TINY = dict(stage_sizes=(1, 1), width=4, groups=2)
IMAGES = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)


def _init(tower, seed=0):
  return tower.init(jax.random.key(seed), IMAGES)["params"]


def test_resnet50_has_torchvisions_parameter_count_and_feature_size():
  tower = resnet.ResNetTower()
  shapes = jax.eval_shape(tower.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8))
  # torchvision resnet50: 25,557,032 parameters, of which the classifier fc has 2048 * 1000 + 1000.
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == 25_557_032 - 2_049_000
  features = jax.eval_shape(tower.apply, shapes, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8))
  assert features.shape == (1, 2048)


@pytest.mark.parametrize("normalization", resnet.NORMALIZATIONS)
def test_tiny_tower_runs_and_starts_each_block_as_the_identity(normalization):
  tower = resnet.ResNetTower(normalization=normalization, **TINY)
  params = _init(tower)
  assert not params["stage1_block1"]["norm3"]["scale"].any()  # zero-initialised residual branch
  assert set(params["stage2_block1"]) >= {"proj_conv", "proj_norm"}
  features = tower.apply({"params": params}, IMAGES)
  assert features.shape == (2, 32) and np.isfinite(features).all()


def test_unknown_normalization_is_refused():
  with pytest.raises(ValueError, match="unknown resnet normalization"):
    _init(resnet.ResNetTower(normalization="batch", **TINY))


def test_weights_round_trip_through_the_npz_format(tmp_path):
  tower = resnet.ResNetTower(**TINY)
  source, target = _init(tower, seed=1), _init(tower, seed=2)
  path = str(tmp_path / "tower.npz")
  weights.save_weights(path, source)
  assert "stem_conv/kernel" in np.load(path).files
  loaded = weights.load_weights(target, path)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, source))
  np.testing.assert_array_equal(tower.apply({"params": loaded}, IMAGES), tower.apply({"params": source}, IMAGES))


def test_mismatched_weights_name_every_problem(tmp_path):
  params = _init(resnet.ResNetTower(**TINY))
  flat = weights.flatten_weights(params)
  flat.pop("stem_norm/bias")
  flat["stem_conv/kernel"] = np.zeros((3, 3, 3, 4), np.float32)
  flat["fc/kernel"] = np.zeros((32, 10), np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(ValueError) as raised:
    weights.load_weights(params, str(tmp_path / "bad.npz"))
  message = str(raised.value)
  assert "3 problems" in message and "missing stem_norm/bias" in message and "unexpected fc/kernel" in message
  assert "stem_conv/kernel: file (3, 3, 3, 4), params (7, 7, 3, 4)" in message
  with pytest.raises(FileNotFoundError):
    weights.load_weights(params, str(tmp_path / "absent.npz"))
  (tmp_path / "text.npz").write_text("not an archive")
  with pytest.raises(ValueError, match="not an .npz"):
    weights.load_weights(params, str(tmp_path / "text.npz"))


def test_image_tower_weights_load_into_the_dual_encoder(tmp_path):
  config = ml_collections.ConfigDict(dict(image_tower="resnet", text_tower="transformer", embed_dim=8,
                                          temperature_init=0.07, dtype="float32", resnet=TINY,
                                          transformer=dict(width=8, depth=1, heads=2)))
  model = build_model(config, vocab_size=10, max_length=4)
  shapes = jax.eval_shape(model.init, jax.random.key(0), IMAGES, np.zeros((2, 4), np.int32))
  variables = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
  pretrained = _init(resnet.ResNetTower(**TINY), seed=5)
  weights.save_weights(str(tmp_path / "tower.npz"), pretrained)
  loaded = resnet.load_image_tower_weights(variables, str(tmp_path / "tower.npz"))
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["image_tower"], jax.tree.map(np.asarray, pretrained))
  assert loaded["params"]["text_tower"] is variables["params"]["text_tower"]


def _torchvision_state_dict(params):
  """A torchvision-named state dict with random batch-norm statistics, shaped like ``params``."""
  rng = np.random.default_rng(0)
  names = {"stem_conv": "conv1", "stem_norm": "bn1"}
  state = {}
  for key, value in weights.flatten_weights(params).items():
    module, leaf = key.rsplit("/", 1)
    parts = module.split("/")
    if parts[0].startswith("stage"):
      stage, block = parts[0][len("stage"):].split("_block")
      inner = {"proj_conv": "downsample.0", "proj_norm": "downsample.1"}.get(
          parts[1], parts[1].replace("norm", "bn"))
      name = f"layer{stage}.{int(block) - 1}.{inner}"
    else:
      name = names[parts[0]]
    if leaf == "kernel":
      state[f"{name}.weight"] = rng.normal(size=value.shape[::-1][:2] + value.shape[:2]).astype(np.float32)
    elif leaf == "scale":
      state[f"{name}.weight"] = rng.uniform(0.5, 2, value.shape).astype(np.float32)
      state[f"{name}.running_mean"] = rng.normal(size=value.shape).astype(np.float32)
      state[f"{name}.running_var"] = rng.uniform(0.5, 2, value.shape).astype(np.float32)
      state[f"{name}.num_batches_tracked"] = np.array(100)
    else:
      state[f"{name}.bias"] = rng.normal(size=value.shape).astype(np.float32)
  state["fc.weight"] = np.zeros((10, 32), np.float32)
  return state


def test_torchvision_batch_norm_folds_into_the_affine_tower(tmp_path):
  tower = resnet.ResNetTower(normalization="affine", **TINY)
  params = _init(tower)
  state = _torchvision_state_dict(params)
  flat = resnet.from_torchvision(state, TINY["stage_sizes"])
  np.savez(tmp_path / "converted.npz", **flat)
  loaded = weights.load_weights(params, str(tmp_path / "converted.npz"))  # every key and shape fits
  gamma, beta = state["layer2.0.bn2.weight"], state["layer2.0.bn2.bias"]
  mean, var = state["layer2.0.bn2.running_mean"], state["layer2.0.bn2.running_var"]
  x = np.random.default_rng(1).normal(size=(5, len(gamma))).astype(np.float32)
  norm = loaded["stage2_block1"]["norm2"]
  np.testing.assert_allclose(x * norm["scale"] + norm["bias"], gamma * (x - mean) / np.sqrt(var + 1e-5) + beta,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loaded["stage1_block1"]["conv2"]["kernel"],
                                state["layer1.0.conv2.weight"].transpose(2, 3, 1, 0))
