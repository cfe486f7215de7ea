"""Flickr30K as 5 tasks (the splits of ``flickr.py``), fine-tuning a pretrained CLIP: the successors' setting.

Convert a local open_clip checkpoint once, then run (README, "Start from CLIP"):

  python -m ccmr_jax.models.from_open_clip --model=ViT-B-16-quickgelu --checkpoint=PATH.pt --out=clip_b16.npz
  python -m ccmr_jax.main --config=configs/flickr_clip.py --config.model.init_from=clip_b16.npz \\
      --workdir=gs://BUCKET/ccmr/flickr_clip --config.data.tfds_data_dir=~/tensorflow_datasets

The text after ``flickr_clip.py:`` names the CLIP family (default ``ViT-B-16-quickgelu``, the
activation of OpenAI's weights; ``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14`` and their ``-quickgelu``
twins). The setting (:func:`clip_finetuning`, which ``coco_clip.py`` applies to ``coco.py``):

  model       open_clip's CLIP ViT towers (:mod:`ccmr_jax.models.clip_architectures`), the named family:
              ViT-B-16 (DAR's backbone) by default, ViT-B-32 or ViT-L-14, each also as a ``-quickgelu``
              twin — OpenAI's weights need it; start from converted weights with
              ``--config.model.init_from=PATH.npz``
  tokenizer   open_clip's BPE (``tokenizer.bpe_vocab``: "" reads the file open-clip-torch ships), 77 tokens
  images      224 px, CLIP's pixel mean and std; stored at 224 px (the shorter side resized, then the
              center square: CLIP's evaluation transform), so training augments with flips only
  loss        symmetric InfoNCE at the checkpoint's temperature, kept fixed (DAR: "Train logit scale: False")
  optimizer   AdamW, weight decay 0.2, cosine to 10 % after 100 warmup steps (DAR: AdamW, weight decay
              0.2, cosine decay, 5 warmup epochs ≈ 110 steps of a Flickr30K task at batch 256)
  lr          1e-5: every weight is fine-tuned here, as in KDR (ACM MM 2023: pretrained ViT + BERT,
              lr 1e-5); DAR's 1e-4 trains LoRA adapters on a frozen CLIP, and this project has no adapters
  schedule    batch 256, 20 epochs per task (DAR, arXiv 2605.31229: "AdamW for 20 epochs with a batch
              size of 256"; its setup is 7 domain tasks starting with Flickr30K)

The zero-shot row of the results (``R[-1][k]``) is the converted CLIP's recall on every task before
any fine-tuning. DKR (AAAI 2024) and Mod-X (ICML 2023) fine-tune CLIP on Flickr30K and COCO too, but
their training settings could not be read here; the values above are the ones that could be checked.
"""

import ml_collections

from ccmr_jax.models import clip_architectures
from configs import flickr

DEFAULT_MODEL = "ViT-B-16-quickgelu"


def clip_finetuning(config: ml_collections.ConfigDict, model_name: str) -> ml_collections.ConfigDict:
  """``config`` (flickr.py or coco.py) set to fine-tune the CLIP of ``model_name`` (module docstring)."""
  if clip_architectures.base_name(model_name) not in clip_architectures.MODEL_CONFIGS:
    raise ValueError(f"configs/*_clip.py:{model_name}: choose one of {sorted(clip_architectures.MODEL_CONFIGS)} "
                     "or its -quickgelu twin")
  arch = clip_architectures.architecture_of_name(model_name)
  config.model = arch.model_config()
  config.model.temperature_init = 0.01  # open_clip's init; the converted checkpoint brings its own
  config.model.dtype = "bfloat16"
  config.model.init_from = ""  # set to the converted .npz (python -m ccmr_jax.models.from_open_clip)
  config.tokenizer = ml_collections.ConfigDict(dict(kind="clip_bpe", bpe_vocab="", max_length=arch.context_length))
  config.data.image_size = arch.image_size
  config.data.stored_size = arch.image_size
  config.loss = ml_collections.ConfigDict(dict(name="info_nce", margin=0.2))
  config.train.trainable = "image_tower/*,text_tower/*,image_projection/*,text_projection/*"  # not log_scale
  config.train.batch_size = 256
  config.train.epochs_per_task = 20
  config.train.learning_rate = 1e-5
  config.train.weight_decay = 0.2
  config.train.warmup_steps = 100
  config.train.final_lr_fraction = 0.1
  return config


def get_config(model_name: str = DEFAULT_MODEL) -> ml_collections.ConfigDict:
  return clip_finetuning(flickr.get_config(), model_name or DEFAULT_MODEL)
