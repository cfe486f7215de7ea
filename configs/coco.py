"""MS-COCO (Karpathy splits) as 5 tasks by supercategory groups; ResNet-50 and Transformer towers.

Prepare the data once (README, "Real datasets: Flickr30K and MS-COCO"), then:

  python -m ccmr_jax.main --config=configs/coco.py --workdir=gs://BUCKET/ccmr/coco \\
      --config.data.tfds_data_dir=~/tensorflow_datasets

Tasks (ccmr_jax/data/coco.py): vehicles_outdoor, animals, people_sports,
food_kitchen, home; an image joins the task holding most of its objects
(``person`` counts only when nothing else is in the picture). Images
without objects are dropped (``--config.data.unlabeled=own_task`` keeps
them as a sixth task). Train is Karpathy's train + restval (113,287 images;
``--config.data.coco_fold_restval=False`` keeps train alone, 82,783).

Hyperparameters as configs/flickr.py (VSE++ hinge, margin 0.2; AdamW 2e-4;
batch 128; 224 px crops of 256 px images; ResNet-50 + Transformer), with
5 epochs per task and 200 warmup steps: COCO's tasks are about four times
Flickr30K's.
"""

import ml_collections

from configs import flickr


def get_config() -> ml_collections.ConfigDict:
  config = flickr.get_config()
  config.data.source = "coco"
  config.data.unlabeled = "drop"
  config.data.coco_fold_restval = True
  del config.data.manual_dir
  # COCO at 256 px: 24.2 GB of image cache per host.
  config.train.epochs_per_task = 5
  config.train.warmup_steps = 200
  return config
