"""The tiny config from pretrained towers, for tests and smoke runs: a tiny corpus, 2 tiny tasks.

  python -m ccmr_jax.main --config=configs/tiny_pretrained.py --workdir=/tmp/ccmr_tiny_pretrained
"""

import copy

import ml_collections

from configs import pretrain_scenes, tiny


def pretrain_config() -> ml_collections.ConfigDict:
  """``configs/pretrain_scenes.py`` at the tiny config's sizes."""
  small = tiny.get_config()
  config = pretrain_scenes.get_config()
  config.data.scenes.update(num_train=400, num_val=40, num_test=80)
  config.model = copy.deepcopy(small.model)
  config.train.update(batch_size=32, epochs_per_task=2, warmup_steps=2, log_every=2)
  config.eval.batch_size = 64
  return config


def get_config() -> ml_collections.ConfigDict:
  config = tiny.get_config()
  config.pretrain = pretrain_config()
  config.model.init_from = "pretrain"
  config.train.learning_rate = 1e-4
  return config
