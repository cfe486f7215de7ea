"""A tiny config for tests and smoke runs: 2 tasks, small data, small towers.

  python -m ccmr_jax.main --config=configs/tiny.py --workdir=/tmp/ccmr_tiny
"""

from configs import scenes_scratch


def get_config():
  config = scenes_scratch.get_config()
  config.data.num_tasks = 2
  config.data.scenes.update(num_train=400, num_val=40, num_test=80)
  config.model.embed_dim = 32
  config.model.conv.update(widths=(16, 32), features=64)
  config.model.transformer.update(width=32, depth=1, heads=2)
  config.model.gru.update(width=32)
  config.train.batch_size = 32
  config.train.epochs_per_task = 1
  config.train.warmup_steps = 2
  config.train.log_every = 2
  config.eval.batch_size = 64
  return config
