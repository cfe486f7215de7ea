import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccmr_jax import losses, train
from ccmr_jax.continual.strategies import continual_defaults
from ccmr_jax.models.dual_encoder import build_model
from configs import tiny


def _model(text_tower="transformer"):
  config = tiny.get_config().model
  config.unlock()
  config.text_tower = text_tower
  return build_model(config, vocab_size=50, max_length=8)


@pytest.mark.parametrize("text_tower", ["transformer", "gru"])
def test_dual_encoder_gives_unit_vectors_in_one_space(text_tower):
  model = _model(text_tower)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3)), jnp.uint8)
  tokens = jnp.asarray([[1, 5, 6, 0, 0, 0, 0, 0], [1, 7, 0, 0, 0, 0, 0, 0], [1, 5, 6, 7, 8, 9, 10, 11]], jnp.int32)
  params = model.init(jax.random.key(0), images, tokens)
  image_emb, text_emb, scale = model.apply(params, images, tokens)
  assert image_emb.shape == text_emb.shape == (3, 32)
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
  # Padding positions do not leak into a caption's embedding.
  alone = model.apply(params, tokens[:1, :3], method=model.encode_text)
  np.testing.assert_allclose(alone[0], text_emb[0], atol=1e-5)


def _batch(seed: int) -> dict:
  """Four random (image, caption) pairs of the tiny model's shapes, no duplicates."""
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.integers(0, 255, (4, 64, 64, 3)), jnp.uint8),
          "tokens": jnp.asarray(rng.integers(1, 50, (4, 8)), jnp.int32),
          "image_key": jnp.arange(4, dtype=jnp.int32), "text_key": jnp.arange(4, dtype=jnp.int32)}


def test_distillation_from_identical_params_adds_nothing_to_the_loss():
  model, batch = _model(), _batch(seed=0)
  params = model.init(jax.random.key(0), batch["image"], batch["tokens"])
  loss_fn = train.make_loss_fn(model, tiny.get_config().loss, continual_defaults().lwf)
  plain, plain_aux = loss_fn(params, batch)
  distilled, aux = loss_fn(params, batch, params)
  np.testing.assert_allclose(aux["distillation"], 0.0, atol=1e-6)
  np.testing.assert_allclose(distilled, plain, rtol=1e-6)
  np.testing.assert_allclose(aux["contrastive"], plain_aux["contrastive"], rtol=1e-6)
  image, text = model.apply(params, batch["image"], batch["tokens"], method=model.embed_unnormalized)
  assert not np.allclose(np.linalg.norm(image, axis=1), 1.0) and text.dtype == jnp.float32


def _cross_entropy_rows_reference(queries, gallery, scale, keep):
  s = scale * queries @ gallery.T
  total = 0.0
  for i in range(len(queries)):
    row = [s[i, j] for j in range(len(queries)) if keep[i, j] or i == j]
    total += np.log(np.sum(np.exp(row))) - s[i, i]
  return total / len(queries)


def test_backward_compatible_term_matches_its_formula_and_trains_only_the_new_side():
  new_image, new_text = _embeddings(seed=1)
  old_image, old_text = _embeddings(seed=2)
  keep = np.ones((5, 5), bool)
  keep[0, 3] = keep[3, 0] = False  # a duplicate pair is no negative
  np.fill_diagonal(keep, False)
  expected = 0.5 * (_cross_entropy_rows_reference(new_image, old_text, 10.0, keep)
                    + _cross_entropy_rows_reference(new_text, old_image, 10.0, keep))
  got = losses.backward_compatible(new_image, new_text, old_image, old_text, jnp.float32(10.0), jnp.asarray(keep))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  old_grads = jax.grad(lambda oi, ot: losses.backward_compatible(new_image, new_text, oi, ot, 10.0, keep),
                       argnums=(0, 1))(old_image, old_text)
  assert all(np.all(g == 0) for g in old_grads)


def test_the_loss_adds_the_weighted_compatibility_term_with_a_teacher():
  model, batch = _model(), _batch(seed=1)
  params = model.init(jax.random.key(0), batch["image"], batch["tokens"])
  teacher = model.init(jax.random.key(1), batch["image"], batch["tokens"])
  bct = ml_collections.ConfigDict({"weight": 0.5})
  loss, aux = train.make_loss_fn(model, tiny.get_config().loss, bct_config=bct)(params, batch, teacher)
  new_image, new_text, scale = model.apply(params, batch["image"], batch["tokens"])
  old_image, old_text, _ = model.apply(teacher, batch["image"], batch["tokens"])
  term = losses.backward_compatible(new_image, new_text, old_image, old_text, scale, ~np.eye(4, dtype=bool))
  np.testing.assert_allclose(aux["compatibility"], term, rtol=1e-5)
  np.testing.assert_allclose(loss, aux["contrastive"] + 0.5 * term, rtol=1e-5)
  assert aux["distillation"] == 0.0 and aux["compatibility"] > 0.0


def test_unknown_tower_is_a_clear_error():
  config = tiny.get_config().model
  config.unlock()
  config.image_tower = "resnet9000"
  with pytest.raises(ValueError, match="unknown model.image_tower 'resnet9000'"):
    build_model(config, 10, 8)


def _embeddings(seed=0, n=5, d=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x + 0.5 * rng.normal(size=(n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  return x.astype(np.float32), y.astype(np.float32)


def _info_nce_reference(x, y, scale, keep):
  s = scale * x @ y.T
  total = 0.0
  for i in range(len(x)):
    row = [s[i, j] for j in range(len(x)) if keep[i, j] or i == j]
    col = [s[j, i] for j in range(len(x)) if keep[j, i] or i == j]
    total += 0.5 * (np.log(np.sum(np.exp(row))) - s[i, i]) + 0.5 * (np.log(np.sum(np.exp(col))) - s[i, i])
  return total / len(x)


def test_info_nce_matches_the_formula_and_leaves_duplicates_out():
  x, y = _embeddings()
  keys = np.arange(5)
  keep = np.asarray(losses.valid_negatives(jnp.asarray(keys), jnp.asarray(keys)))
  np.testing.assert_allclose(losses.info_nce(x, y, 10.0, keep), _info_nce_reference(x, y, 10.0, keep), rtol=1e-5)
  text_keys = np.array([0, 1, 1, 2, 3])  # captions 1 and 2 have the same text
  keep = np.asarray(losses.valid_negatives(jnp.asarray(keys), jnp.asarray(text_keys)))
  assert not keep[1, 2] and not keep[2, 1] and not keep[0, 0] and keep[0, 1]
  np.testing.assert_allclose(losses.info_nce(x, y, 10.0, keep), _info_nce_reference(x, y, 10.0, keep), rtol=1e-5)


def test_vse_hinge_matches_the_formula():
  x, y = _embeddings(1)
  keep = ~np.eye(5, dtype=bool)
  s = x @ y.T
  d = np.diag(s)
  expected = np.mean([max(max(0, 0.2 + s[i, j] - d[i]) for j in range(5) if j != i)
                      + max(max(0, 0.2 + s[j, i] - d[i]) for j in range(5) if j != i) for i in range(5)])
  np.testing.assert_allclose(losses.vse_hinge(x, y, 0.2, keep), expected, rtol=1e-5)
  summed = np.mean([sum(max(0, 0.2 + s[i, j] - d[i]) for j in range(5) if j != i)
                    + sum(max(0, 0.2 + s[j, i] - d[i]) for j in range(5) if j != i) for i in range(5)])
  np.testing.assert_allclose(losses.vse_hinge(x, y, 0.2, keep, hardest=False), summed, rtol=1e-5)
  # Perfectly separated pairs cost nothing.
  eye = np.eye(5, 8, dtype=np.float32)
  assert float(losses.vse_hinge(eye, eye, 0.2, keep)) == 0.0


def test_unknown_loss_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown loss.name 'triplet'"):
    losses.contrastive_loss("triplet", None, None, None, None, 0.2)
