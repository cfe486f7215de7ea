"""MS-COCO as 5 tasks (the splits of ``coco.py``), fine-tuning a pretrained CLIP: the successors' setting.

As ``flickr_clip.py`` (convert a checkpoint, then ``--config.model.init_from=PATH.npz``; the text
after ``coco_clip.py:`` names the CLIP family), with 5 epochs per task and 400 warmup steps instead
of 20 and 100: a COCO task has about four times the images of a Flickr30K task, so each task takes
as many steps as in ``flickr_clip.py``. Hyperparameters and their papers: ``flickr_clip.py``.
"""

import ml_collections

from configs import coco
from configs.flickr_clip import DEFAULT_MODEL, clip_finetuning


def get_config(model_name: str = DEFAULT_MODEL) -> ml_collections.ConfigDict:
  config = clip_finetuning(coco.get_config(), model_name or DEFAULT_MODEL)
  config.train.epochs_per_task = 5
  config.train.warmup_steps = 400
  return config
