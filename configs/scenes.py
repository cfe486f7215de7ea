"""The embedded default: pretrained towers fine-tuned on 5 tasks of captioned synthetic scenes, no download.

Run it (from the repository root):

  python -m ccmr_jax.main --config=configs/scenes.py --workdir=runs/scenes

The regime of the seed paper and its successors (KDR, Mod-X, DKR, DAR, query
drift compensation), offline: both towers start **pretrained** on a broad,
disjoint corpus (``configs/pretrain_scenes.py``: every shape and colour
word, scenes that mix families) and are **fine-tuned at a low learning
rate** on the task stream (one shape family per task, scenes drawn around
it). The pretrained towers and their tokenizer are built on first use and
cached under ``~/.cache/ccmr_jax`` (``$CCMR_JAX_CACHE``), keyed by the
pretraining config; ``docs/evaluation.md`` explains how the regime was
chosen. ``configs/scenes_scratch.py`` is the from-scratch contrast.

Override any field on the command line, e.g. ``--config.train.strategy=joint``.
"""

import ml_collections

from configs import pretrain_scenes, scenes_scratch


def get_config() -> ml_collections.ConfigDict:
  config = scenes_scratch.get_config()
  config.pretrain = pretrain_scenes.get_config()
  config.model.init_from = "pretrain"
  config.train.learning_rate = 3e-4  # a third of the from-scratch rate: see docs/evaluation.md for why not 1e-4
  return config
