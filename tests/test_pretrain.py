"""The pretraining stage: a tiny corpus pretrains tiny towers, the run starts from them, the cache heals."""

import copy
import json
import os

import jax
import numpy as np
import pytest

from ccmr_jax import checkpoint, experiment, files, pretrain, sharding, train
from ccmr_jax.cli import UserError
from ccmr_jax.models import weights
from ccmr_jax.models.dual_encoder import build_model
from configs import tiny_pretrained


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return pretrain.pretrain(tiny_pretrained.pretrain_config(), str(tmp_path_factory.mktemp("pre") / "out"))


def _fresh_variables(config, tokenizer):
  model = build_model(config.model, tokenizer.vocab_size, tokenizer.max_length)
  return train.init_params(model, 123, config.data.scenes.image_size, tokenizer.max_length, sharding.make_mesh())


def test_the_command_writes_weights_the_loader_accepts_and_a_card_that_matches_them(pretrained):
  card = json.load(open(os.path.join(pretrained.folder, pretrain.CARD_FILE)))
  assert card["sha256"] == files.file_sha256(pretrained.weights_path)
  assert card["config_key"] == pretrain.config_key(tiny_pretrained.pretrain_config())
  assert card["data_seed"] == 777 and card["steps"] == 2 * (400 // 32) and card["train_images"] == 400
  assert 0 <= card["test_recall"]["mean_r1"] <= 100
  tokenizer = pretrained.tokenizer
  assert "hexagon" in tokenizer.words and "khaki" in tokenizer.words  # the corpus covers every family
  config = tiny_pretrained.get_config()
  fresh = _fresh_variables(config, tokenizer)
  loaded = weights.load_encoder_weights(fresh, pretrained.weights_path)
  with np.load(pretrained.weights_path) as archive:
    for key, value in weights.flatten_weights(loaded["params"]).items():
      np.testing.assert_array_equal(value, archive[key])
  assert not np.array_equal(np.asarray(fresh["params"]["log_scale"]), np.asarray(loaded["params"]["log_scale"]))


def test_weights_of_another_shape_are_named(pretrained):
  config = tiny_pretrained.get_config()
  config.model.embed_dim = 16
  with pytest.raises(ValueError, match=r"image_projection/kernel: file \(64, 32\), params \(64, 16\)"):
    weights.load_encoder_weights(_fresh_variables(config, pretrained.tokenizer), pretrained.weights_path)


def test_a_damaged_folder_is_named_and_a_damaged_cache_is_rebuilt(pretrained, tmp_path, monkeypatch):
  damaged = str(tmp_path / "damaged")
  files.copy_tree(pretrained.folder, damaged)
  with open(os.path.join(damaged, pretrain.WEIGHTS_FILE), "r+b") as f:
    f.seek(200)
    f.write(b"\0" * 64)
  with pytest.raises(files.CorruptFileError, match="does not match the SHA-256 in its manifest"):
    pretrain.load_pretrained(damaged)
  config = tiny_pretrained.get_config()
  config.model.init_from = damaged
  with pytest.raises(UserError, match="model.init_from: .*rerun `python -m ccmr_jax.pretrain"):
    pretrain.initial_weights(config)

  monkeypatch.setenv("CCMR_JAX_CACHE", str(tmp_path / "cache"))
  cached = os.path.join(str(tmp_path / "cache"), "pretrained", pretrain.config_key(config.pretrain))
  files.copy_tree(damaged, cached)
  rebuilt = pretrain.initial_weights(tiny_pretrained.get_config())
  assert rebuilt.folder == cached
  assert files.file_sha256(rebuilt.weights_path) == rebuilt.card["sha256"]
  assert rebuilt.card["sha256"] == pretrained.card["sha256"]  # the same config pretrains the same towers


def test_a_pretraining_model_unlike_the_run_is_refused(monkeypatch, tmp_path):
  monkeypatch.setenv("CCMR_JAX_CACHE", str(tmp_path / "cache"))
  config = tiny_pretrained.get_config()
  config.pretrain.model.transformer.width = 64
  with pytest.raises(UserError, match="config.pretrain.model must be the run's model:\n  model.transformer"):
    pretrain.initial_weights(config)
  assert not os.path.exists(tmp_path / "cache")


def test_a_run_starts_from_the_pretrained_towers_and_reports_their_zero_shot_row(pretrained, tmp_path, monkeypatch):
  config = tiny_pretrained.get_config()
  config.model.init_from = pretrained.folder
  config.train.trainable = "log_scale"  # only the temperature trains: every S_t embeds as the starting encoders
  results = experiment.run(config, str(tmp_path / "run"))
  tokenizer = json.load(open(tmp_path / "run" / "tokenizer.json"))
  assert tokenizer == json.loads(pretrained.card["tokenizer"])
  zero_shot = results["zero_shot"]["mean_r1"]
  assert len(zero_shot) == 2 and all(0 <= v <= 100 for v in zero_shot)
  for policy in ("reindex", "no_reindex"):
    matrix = results["policies"][policy]["mean_r1"]["matrix"]
    assert matrix[0][0] == zero_shot[0] and matrix[1] == zero_shot
  assert "## Zero-shot" in open(tmp_path / "run" / "report.md").read()
  abstract = checkpoint.abstract_like(_fresh_variables(config, pretrained.tokenizer))
  params = jax.tree.map(np.asarray, checkpoint.restore_snapshot(str(tmp_path / "run"), 1, abstract))["params"]
  with np.load(pretrained.weights_path) as archive:
    for key, value in weights.flatten_weights(params).items():
      if key != "log_scale":
        np.testing.assert_array_equal(value, archive[key])


def test_the_cache_key_follows_the_pretraining_config():
  config = tiny_pretrained.pretrain_config()
  other = copy.deepcopy(config)
  other.data.scenes.seed = 778
  assert pretrain.config_key(config) == pretrain.config_key(tiny_pretrained.pretrain_config())
  assert pretrain.config_key(config) != pretrain.config_key(other)
