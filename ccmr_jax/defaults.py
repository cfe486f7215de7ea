"""Default hyperparameters that configs read without importing JAX.

``configs/*.py`` import this module, so it depends on ``ml_collections`` only:
loading a config must not pull in jax, optax or the data pipeline. The values
that name things defined elsewhere are written out here as literals; the tests
check them against ``distillation.SIMILARITY_PARTS`` and ``replay.SELECTIONS``,
and check that every regularizer spec (``continual/regularizers.py``) has its
section here.
"""

import ml_collections


def continual_defaults() -> ml_collections.ConfigDict:
  """The ``config.continual`` section: every strategy hyperparameter, with its default.

  The defaults are starting points, not tuned values; sweep them with
  ``python -m ccmr_jax.sweep``. Penalty gradients join the loss gradient
  *before* clipping (global norm 1), and a weighted quadratic pulls each
  parameter with ``strength * importance``. On the tiny config after a few
  steps, Fisher entries averaged ~5e-5 and MAS entries ~2, so the defaults
  below give ``l2``, ``ewc``, ``online_ewc`` and ``mas`` a mean pull of the
  same order (~0.05 to 0.2).

  * ``l2.strength = 0.1``: ``P = s/2 ||theta - theta*||^2``.
  * ``ewc.strength = 1000``: ``P = s/2 sum_k sum_i F_k,i (theta_i - theta*_k,i)^2``
    with ``F_k`` the batch-gradient-square Fisher of task ``k``.
  * ``online_ewc.strength = 1000``, ``online_ewc.decay = 0.9``: the running
    Fisher ``F <- decay F + F_new``, ``0 < decay <= 1`` (1 is a plain sum).
  * ``mas.strength = 0.1``: ``P = s/2 sum_i Omega_i (theta_i - theta*_i)^2``,
    ``Omega`` the summed MAS importances.
  * ``si.strength = 0.1``, ``si.damping = 0.1``: ``c`` and ``xi`` of Synaptic
    Intelligence (``P = c sum_i Omega_i (theta_i - theta*_i)^2``).
  * ``lwf.weight = 1``, ``lwf.temperature = 0.1``,
    ``lwf.parts = ("cross", "image", "text")``: loss
    ``L + weight * similarity_distillation(..., temperature, parts)``.
  * ``replay.memory_per_task = 200``: images kept from each finished task
    (5% of a task of the scenes config); ``replay.selection = "reservoir"``
    (or ``"herding"``); ``replay.fraction = 0.25``: share of every batch
    drawn from the memory.
  * ``bct.weight = 1``: loss ``L + weight * backward_compatible(...)``, the
    cross-model contrastive term against the previous snapshot's embeddings.
  * ``importance.max_batches = 50``: batches of the finished task's training
    data (at most) behind the Fisher and MAS estimates; 50 batches of 128
    cover a whole task of the scenes config.

  Returns:
    A fresh ConfigDict; ``config.continual = continual_defaults()``.
  """
  return ml_collections.ConfigDict({
      "l2": {"strength": 0.1},
      "ewc": {"strength": 1000.0},
      "online_ewc": {"strength": 1000.0, "decay": 0.9},
      "mas": {"strength": 0.1},
      "si": {"strength": 0.1, "damping": 0.1},
      "lwf": {"weight": 1.0, "temperature": 0.1, "parts": ("cross", "image", "text")},
      "replay": {"memory_per_task": 200, "selection": "reservoir", "fraction": 0.25},
      "importance": {"max_batches": 50},
      "bct": {"weight": 1.0},
  })
