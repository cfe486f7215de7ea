"""Captioned synthetic scenes, 5 tasks, both towers trained from scratch.

The regime of the project's first default: random initial encoders, fine-tuned
at lr 1e-3 on each task in turn. No paper in this setting starts there (the
seed paper and all its successors fine-tune pretrained encoders, see
``configs/scenes.py``); it is kept as the contrast in which encoders move
far between tasks. Run it (from the repository root):

  python -m ccmr_jax.main --config=configs/scenes_scratch.py --workdir=runs/scenes_scratch

Override any field on the command line, e.g. ``--config.train.strategy=joint``.
"""

import ml_collections

from ccmr_jax.defaults import continual_defaults


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.multihost = False

  config.data = ml_collections.ConfigDict()
  config.data.source = "scenes"
  config.data.num_tasks = 5
  config.data.unlabeled = "drop"
  config.data.scenes = ml_collections.ConfigDict(dict(
      num_train=20000, num_val=500, num_test=1000, image_size=64, in_family_prob=0.95, seed=0))
  # The order of the category groups (shape families) the tasks take; () keeps the dataset's own order.
  config.data.task_order = ()

  config.tokenizer = ml_collections.ConfigDict(dict(max_length=24, num_oov_buckets=256, min_count=1))

  config.model = ml_collections.ConfigDict()
  config.model.image_tower = "conv"
  config.model.text_tower = "transformer"
  config.model.embed_dim = 128
  config.model.temperature_init = 0.07
  config.model.dtype = "float32"
  config.model.conv = ml_collections.ConfigDict(dict(patch=4, widths=(64, 128), features=256))
  config.model.transformer = ml_collections.ConfigDict(dict(width=128, depth=2, heads=4))
  config.model.gru = ml_collections.ConfigDict(dict(width=128))
  # An .npz of image-tower weights to start from ("": from scratch); format: ccmr_jax/models/resnet.py.
  config.model.image_tower_weights = ""
  # Where every param starts: "" (random init), "pretrain" (the towers pretrained by config.pretrain,
  # built on first use and cached), or the folder a `python -m ccmr_jax.pretrain --out=DIR` wrote.
  config.model.init_from = ""

  config.loss = ml_collections.ConfigDict(dict(name="info_nce", margin=0.2))

  config.train = ml_collections.ConfigDict()
  config.train.strategy = "finetune"
  config.train.batch_size = 128
  config.train.epochs_per_task = 6
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 20
  config.train.final_lr_fraction = 0.1
  config.train.weight_decay = 1e-4
  config.train.grad_clip = 1.0
  config.train.log_every = 20
  # Which params train: "all", "projections", "text_side" (image tower and projection frozen),
  # "image_side" (text side frozen), or comma-separated path patterns such as "text_tower/*,log_scale".
  config.train.trainable = "all"
  # Steps between progress checkpoints (0: none): a killed run resumes from the last one.
  config.train.checkpoint_every = 50

  # Hyperparameters of the strategy components (ewc, lwf, replay, ...): see ccmr_jax/defaults.py.
  config.continual = continual_defaults()

  # split: the split evaluated after every task ("test", or "val" for sweeps).
  # index_mode: "exact" (ScaNN brute force), "approximate" (tree + AH + reorder, reported with its
  # agreement with exact search), or "auto" (approximate for galleries of ann_threshold items or more).
  # ann_recall_target: each approximate index searches the fewest leaves and reorders the fewest candidates
  # that keep its recall@max(ks) against exact search at this target, on a sample of its queries.
  # drift_maps: the maps of the compensation policies (no_reindex+shift/linear/procrustes, remap_linear),
  # fitted after each task on fit_images of its training images (with their captions) and the replay memory;
  # ridge: lambda of the linear maps (ccmr_jax/drift_maps.py).
  config.eval = ml_collections.ConfigDict(dict(split="test", ks=(1, 5, 10), batch_size=256, index_mode="exact",
                                               ann_threshold=100_000, ann_recall_target=0.95,
                                               drift_maps=dict(fit_images=1000, ridge=1e-3)))
  return config
