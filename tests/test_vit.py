"""The open_clip-layout towers: registry, shapes, dtype, padding, remat and the FLOP formula."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccmr_jax.models import vit
from ccmr_jax.models.dual_encoder import build_model
from ccmr_jax.models.towers import IMAGE_TOWERS, TEXT_TOWERS

IMAGES = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
TOKENS = np.array([[1, 5, 6, 7, 0, 0], [1, 9, 0, 0, 0, 0]], np.int32)


def model_config(dtype="float32", depth=2):
  return ml_collections.ConfigDict(dict(
      image_tower="vit", text_tower="causal_transformer", embed_dim=8, temperature_init=0.07, dtype=dtype,
      vit=dict(patch=8, width=32, depth=depth, heads=2), causal_transformer=dict(width=32, depth=depth, heads=2)))


def test_registered_by_name():
  assert IMAGE_TOWERS["vit"] is vit.VisionTransformerTower
  assert TEXT_TOWERS["causal_transformer"] is vit.CausalTextTower


def test_shapes_and_open_clip_parameters():
  model = build_model(model_config(depth=1), vocab_size=16, max_length=6)

  @jax.jit
  def init_and_apply(key):
    params = model.init(key, IMAGES, TOKENS)
    return params, model.apply(params, IMAGES, TOKENS)

  params, (image_emb, text_emb, _) = init_and_apply(jax.random.key(0))
  assert image_emb.shape == (2, 8) and text_emb.shape == (2, 8)
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-5)
  image = params["params"]["image_tower"]
  assert image["patch_embed"]["kernel"].shape == (8 * 8 * 3, 32)
  assert "bias" not in image["patch_embed"]
  assert image["class_embedding"].shape == (32,)
  assert image["position_embedding"].shape == (2 * 2 + 1, 32)
  assert image["transformer"]["block_0"]["in_proj"]["kernel"].shape == (32, 96)
  assert params["params"]["text_tower"]["position_embedding"].shape == (6, 32)


def test_bfloat16_compute_float32_params():
  model = build_model(model_config(dtype="bfloat16"), vocab_size=16, max_length=6)
  params = jax.eval_shape(model.init, jax.random.key(0), IMAGES, TOKENS)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  features = jax.eval_shape(lambda p: model.apply(p, IMAGES, method=lambda m, x: m.image_tower(x)), params)
  assert features.dtype == jnp.bfloat16
  image_emb, _, _ = jax.eval_shape(lambda p: model.apply(p, IMAGES, TOKENS), params)
  assert image_emb.dtype == jnp.float32


def test_text_tower_ignores_padding():
  tower = vit.CausalTextTower(vocab_size=16, max_length=6, width=32, depth=1, heads=2)
  params = jax.eval_shape(tower.init, jax.random.key(0), TOKENS)
  params = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
  apply = jax.jit(tower.apply)
  padded = apply(params, TOKENS)
  # Each caption cut to its own length: row 0 has 4 tokens, row 1 has 2.
  np.testing.assert_allclose(apply(params, TOKENS[:, :4])[0], padded[0], atol=1e-5)
  np.testing.assert_allclose(apply(params, TOKENS[1:, :2])[0], padded[1], atol=1e-5)


def test_remat_matches_plain():
  # Remat lives in the Transformer both towers share; the text tower exercises it.
  plain = vit.CausalTextTower(vocab_size=16, max_length=6, width=32, depth=2, heads=2)
  remat = vit.CausalTextTower(vocab_size=16, max_length=6, width=32, depth=2, heads=2, remat=True)
  params = jax.eval_shape(plain.init, jax.random.key(0), TOKENS)
  params = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)

  def loss(tower):
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(tower.apply(p, TOKENS) ** 2)))

  (value, grads), (remat_value, remat_grads) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_flop_formula_matches_xla(tower):
  width, depth = 128, 2
  if tower == "image":
    module = vit.VisionTransformerTower(patch=4, width=width, depth=depth, heads=2)
    inputs = IMAGES
    formula = vit.vit_forward_flops(16, 4, width, depth)
  else:
    module = vit.CausalTextTower(vocab_size=16, max_length=6, width=width, depth=depth, heads=2)
    inputs = TOKENS
    formula = vit.text_forward_flops(6, width, depth)
  params = jax.eval_shape(module.init, jax.random.key(0), inputs)
  analysis = jax.jit(module.apply).lower(params, inputs).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  # XLA also counts element-wise work (LayerNorm, GELU, softmax): ~10% more at width 128, ~5% at 256.
  assert 1.0 <= analysis["flops"] / (len(inputs) * formula) < 1.12


def _matmul_flops(jaxpr) -> float:
  """2 × multiply-adds of every ``dot_general`` and convolution in ``jaxpr`` and the jaxprs inside it."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracting])
    elif eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape  # flax: [kh, kw, in / groups, out]
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(kernel[:-1])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _matmul_flops(inner)
  return total


@pytest.mark.parametrize("tower", ["image", "text"])
def test_flop_formula_counts_every_matmul_exactly(tower):
  # Each term of the formula is checked: the patch embedding (image), the attention T² terms and the
  # projections and MLP of every block, against the matmuls the traced program actually contains.
  width, depth = 64, 3
  if tower == "image":
    module = vit.VisionTransformerTower(patch=4, width=width, depth=depth, heads=2)
    inputs, formula = IMAGES, vit.vit_forward_flops(16, 4, width, depth)
  else:
    module = vit.CausalTextTower(vocab_size=16, max_length=6, width=width, depth=depth, heads=2)
    inputs, formula = TOKENS, vit.text_forward_flops(6, width, depth)
  params = jax.eval_shape(module.init, jax.random.key(0), inputs)
  counted = _matmul_flops(jax.make_jaxpr(module.apply)(params, inputs).jaxpr)
  assert counted == pytest.approx(len(inputs) * formula, rel=1e-9)


def test_exact_gelu_is_jax_exact_gelu_with_its_gradient():
  x = jnp.asarray(np.random.default_rng(1).standard_normal(4096, np.float32) * 4)
  np.testing.assert_allclose(vit.exact_gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6, rtol=0)
  grad = jax.grad(lambda v: vit.exact_gelu(v).sum())(x)
  np.testing.assert_allclose(grad, jax.grad(lambda v: jax.nn.gelu(v, approximate=False).sum())(x), atol=2e-6, rtol=0)
  # Far from the tanh approximation, which differs by up to ~5e-4.
  assert float(jnp.abs(vit.exact_gelu(x) - jax.nn.gelu(x, approximate=True)).max()) > 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention_equals_jax_attention(causal):
  batch, length, heads, d = 3, 7, 2, 4
  qkv = jnp.asarray(np.random.default_rng(2).standard_normal((batch * length, 3 * heads * d), np.float32))
  cotangent = jnp.asarray(np.random.default_rng(3).standard_normal((batch * length, heads * d), np.float32))

  def reference(qkv):
    query, key, value = jnp.split(qkv.reshape(batch, length, 3 * heads, d), 3, axis=2)
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal).reshape(batch * length, heads * d)

  ours = lambda qkv: vit.multi_head_attention(qkv, batch, length, heads, causal)  # noqa: E731
  np.testing.assert_allclose(ours(qkv), reference(qkv), atol=1e-6, rtol=0)
  np.testing.assert_allclose(jax.vjp(ours, qkv)[1](cotangent)[0], jax.vjp(reference, qkv)[1](cotangent)[0],
                             atol=1e-5, rtol=0)
  if causal:  # the first position sees only itself: its output is its own value
    first_values = qkv.reshape(batch, length, 3, heads * d)[:, 0, 2]
    np.testing.assert_allclose(ours(qkv).reshape(batch, length, -1)[:, 0], first_values, atol=1e-6)
