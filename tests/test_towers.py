"""The default's towers compute Flax's layers: the conv as a matmul, dense layers and attention over rows."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccmr_jax.models import towers


def _leaves_close(a, b, rtol=1e-5, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _identical(a, b) -> bool:
  """Whether two trees of arrays are equal entry for entry."""
  return jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))


def _probe(tree):
  """A scalar that depends on every entry of ``tree`` with a different weight (its gradient is not trivial)."""
  return sum((t * jnp.sin(jnp.arange(t.size, dtype=t.dtype).reshape(t.shape))).sum() for t in jax.tree.leaves(tree))


@pytest.mark.parametrize("kernel", [(3, 3), (2, 2), (1, 3)])
def test_conv_as_matmul_matches_the_library_convolution_and_its_gradients(kernel):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 5, 4)), jnp.float32)
  library, ours = nn.Conv(7, kernel), nn.Conv(7, kernel, conv_general_dilated=towers.conv_as_matmul)
  params = library.init(jax.random.key(1), x)
  assert _identical(params, ours.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(params, x), library.apply(params, x), rtol=1e-5, atol=1e-5)
  grads = [jax.jit(jax.grad(lambda p, v, m=m: _probe(m.apply(p, v)), argnums=(0, 1)))(params, x)
           for m in (library, ours)]
  _leaves_close(*grads, rtol=1e-4, atol=1e-4)


def test_conv_as_matmul_takes_same_padding_written_out():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
  library, ours = nn.Conv(5, (3, 3)), nn.Conv(5, (3, 3), padding=1, conv_general_dilated=towers.conv_as_matmul)
  params = library.init(jax.random.key(1), x)
  np.testing.assert_allclose(ours.apply(params, x), library.apply(params, x), rtol=1e-5, atol=1e-5)


def test_conv_as_matmul_refuses_a_1d_convolution():
  with pytest.raises(ValueError, match="2-D convolutions only"):
    nn.Conv(4, (3,), conv_general_dilated=towers.conv_as_matmul).init(jax.random.key(0), jnp.zeros((1, 8, 4)))


def test_attention_refuses_a_width_the_heads_do_not_divide():
  with pytest.raises(ValueError, match="width 10 is not divisible by 4 heads"):
    towers.TransformerBlock(10, 4).init(jax.random.key(0), jnp.zeros((1, 3, 10)), jnp.ones((1, 3), bool))


@pytest.mark.parametrize("options", [dict(strides=2), dict(padding="VALID"), dict(kernel_dilation=2),
                                     dict(feature_group_count=2)])
def test_conv_as_matmul_refuses_what_it_does_not_compute(options):
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError, match="stride-1 SAME"):
    nn.Conv(4, (3, 3), conv_general_dilated=towers.conv_as_matmul, **options).init(jax.random.key(0), x)


class _FlaxBlock(nn.Module):
  """The reference: the same block written with Flax's ``MultiHeadDotProductAttention`` over ``[B, L, width]``."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x, valid):
    mask = nn.make_attention_mask(valid, valid)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x), mask=mask)
    y = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(nn.gelu(y))


def test_transformer_block_is_flax_attention_with_the_same_params_and_numbers():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 7, 16)), jnp.float32)
  valid = jnp.asarray(np.arange(7)[None, :] < np.array([7, 3, 1, 5, 0])[:, None])  # a caption of no token too
  ours, flax_block = towers.TransformerBlock(16, 4), _FlaxBlock(16, 4)
  params = flax_block.init(jax.random.key(2), x, valid)
  assert _identical(params, ours.init(jax.random.key(2), x, valid))
  np.testing.assert_allclose(ours.apply(params, x, valid), flax_block.apply(params, x, valid), rtol=1e-5, atol=1e-5)
  grads = [jax.jit(jax.grad(lambda p, v, m=m: _probe(m.apply(p, v, valid)), argnums=(0, 1)))(params, x)
           for m in (flax_block, ours)]
  _leaves_close(*grads, rtol=1e-4, atol=1e-5)


def test_over_rows_is_the_layer_on_the_map():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 5)), jnp.float32)
  layer = nn.Dense(6)
  params = layer.init(jax.random.key(0), x)
  rows = towers.over_rows(lambda v: layer.apply(params, v), x)
  assert rows.shape == (2, 3, 4, 6)
  np.testing.assert_allclose(rows, layer.apply(params, x), rtol=1e-6, atol=1e-6)


class _MapConvTower(nn.Module):
  """The reference: the conv tower with its dense layers applied to the 4-D feature maps."""

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = nn.gelu(nn.Dense(8, name="patch_embed")(towers.space_to_depth(x, 2)))
    x = nn.gelu(nn.Dense(16)(towers.space_to_depth(x, 2)))
    x = nn.gelu(nn.Conv(16, (3, 3))(x))
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
    return nn.gelu(nn.Dense(12)(x))


def test_conv_tower_is_the_plain_flax_tower_with_the_same_params_and_numbers():
  images = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
  ours, reference = towers.ConvImageTower(patch=2, widths=(8, 16), features=12), _MapConvTower()
  params = reference.init(jax.random.key(3), images)
  assert _identical(params, ours.init(jax.random.key(3), images))
  np.testing.assert_allclose(ours.apply(params, images), reference.apply(params, images), rtol=1e-5, atol=1e-5)
  grads = [jax.jit(jax.grad(lambda p, m=m: _probe(m.apply(p, images))))(params) for m in (reference, ours)]
  _leaves_close(*grads, rtol=1e-4, atol=1e-5)
