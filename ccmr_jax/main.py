"""Command line: ``python -m ccmr_jax.main --config=configs/scenes.py --workdir=DIR``.

With no ``--config`` the embedded default (``configs/scenes.py``) runs.
Config fields are overridden with ``--config.section.field=value``.
Rerunning the same command resumes a killed run; ``--allow_config_change``
resumes a workdir under a changed config; ``--repair`` retrains tasks whose
trained state is damaged (see ``python -m ccmr_jax.verify``).
"""

from __future__ import annotations

import os

from absl import app, flags

from ccmr_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "scenes.py")

_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where snapshots, indexes and results go.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir made with another config (the differences are logged).")
_REPAIR = flags.DEFINE_bool(
    "repair", False, "Retrain the tasks whose snapshot, regularizer state, replay memory or progress checkpoint "
    "is damaged instead of stopping (damaged indexes, embeddings and evaluations are always recomputed).")


@cli.exits_on_user_error()
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ccmr_jax import distributed, experiment  # after flag parsing: keeps --help fast

  cli.configure_logging()
  try:
    distributed.maybe_initialize(_CONFIG.value)  # before anything touches a device
  except ValueError as e:
    raise cli.UserError(str(e)) from e
  experiment.run(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value, _REPAIR.value)


def entry_point() -> None:
  cli.run(main)


if __name__ == "__main__":
  entry_point()
