"""The pretraining corpus of the embedded default: the towers' "ImageNet and web captions".

  python -m ccmr_jax.pretrain --config=configs/pretrain_scenes.py --out=runs/pretrained_scenes

20,000 captioned scenes from their own generator seed (777; the task stream
uses 0, 1, 2, ...: no image is shared), covering all 20 shapes and all 30
colour names, on which both towers train from scratch with InfoNCE. It
differs from the task stream in how scenes are composed: here an object's
shape family is nearly random (``in_family_prob = 0.2``, so a scene mixes
families), while a task's scenes are drawn around one family (0.95). A
pretrained encoder has therefore seen every concept, and has learned the
coarse, across-family distinctions that mixed scenes reward, but not the
fine, within-family binding (which of six reds is the ring, which the
disc) that each task asks for: the relation of broad pretraining to a
fine-grained downstream task. The architecture is the default's (the
``model`` section must equal the run's).
"""

import ml_collections

from configs import scenes_scratch


def get_config() -> ml_collections.ConfigDict:
  config = scenes_scratch.get_config()
  config.data.num_tasks = 1
  config.data.scenes.update(num_train=20000, num_val=500, num_test=1000, in_family_prob=0.2, seed=777)
  config.train.epochs_per_task = 6
  config.train.checkpoint_every = 0
  del config.continual  # one corpus: no strategy against forgetting
  config.eval = ml_collections.ConfigDict(dict(ks=(1, 5, 10), batch_size=256))  # recall on the corpus's test split
  return config
