"""Flickr30K as 5 tasks by concept groups; ResNet-50 image tower, Transformer text tower.

Prepare the data once (README, "Real datasets: Flickr30K and MS-COCO"), then:

  python -m ccmr_jax.main --config=configs/flickr.py --workdir=gs://BUCKET/ccmr/flickr \\
      --config.data.tfds_data_dir=~/tensorflow_datasets

Tasks (ccmr_jax/data/flickr30k.py): animals, vehicles, sports, water,
people_street (also every image whose captions name no group).

Hyperparameters, after VSE++ (Faghri et al. 2018), the usual recipe of the
continual retrieval papers (KDR: VSE++ hinge, margin 0.2, 10 epochs per task):
  loss          VSE++ hinge with the hardest negatives, margin 0.2
  optimizer     AdamW, learning rate 2e-4, weight decay 1e-4, warmup 100 steps, cosine to 10%,
                gradient clipping at global norm 2.0
  schedule      10 epochs per task, batch 128 (global, over all devices)
  images        224 px crops (random crop + flip for training) of 256 px cached images
  model         ResNet-50 with GroupNorm (from scratch), 4-layer Transformer of width 512,
                1024-d shared space, bfloat16 compute
"""

import ml_collections

from configs import scenes_scratch


def get_config() -> ml_collections.ConfigDict:
  config = scenes_scratch.get_config()
  config.data = ml_collections.ConfigDict()
  config.data.source = "flickr30k"
  config.data.num_tasks = 5
  config.data.unlabeled = "drop"  # never used: an image naming no concept group joins people_street
  # Where the TFDS dataset was built (local or gs://), and the manual files (only for error messages).
  config.data.tfds_data_dir = "~/tensorflow_datasets"
  config.data.manual_dir = ""
  # Local folder of the decoded image cache (Flickr30K at 256 px: 6.2 GB), built once per host.
  config.data.cache_dir = "~/.cache/ccmr_jax"
  config.data.image_size = 224
  config.data.stored_size = 256
  config.data.augment = True

  config.tokenizer = ml_collections.ConfigDict(dict(max_length=32, num_oov_buckets=1024, min_count=1))

  config.model = ml_collections.ConfigDict()
  config.model.image_tower = "resnet"
  config.model.text_tower = "transformer"
  config.model.embed_dim = 1024
  config.model.temperature_init = 0.07
  config.model.dtype = "bfloat16"
  config.model.resnet = ml_collections.ConfigDict(dict(stage_sizes=(3, 4, 6, 3), width=64, normalization="group",
                                                       groups=32))
  config.model.transformer = ml_collections.ConfigDict(dict(width=512, depth=4, heads=8))
  config.model.gru = ml_collections.ConfigDict(dict(width=1024))

  config.loss = ml_collections.ConfigDict(dict(name="vse_hinge", margin=0.2))

  config.train.batch_size = 128
  config.train.epochs_per_task = 10
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 100
  config.train.final_lr_fraction = 0.1
  config.train.weight_decay = 1e-4
  config.train.grad_clip = 2.0
  config.train.log_every = 50

  config.eval.batch_size = 256
  return config
