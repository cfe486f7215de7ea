"""Evaluate a finished run's snapshots again, on another split or with other evaluation settings.

  python -m ccmr_jax.reevaluate --source=runs/ewc --workdir=runs/ewc_val --split=val \\
      [--index_mode=approximate]

Training is the expensive stage; the snapshots ``S_t`` it leaves fix
everything evaluation needs. This command copies a run's ``config.json``,
``tokenizer.json``, ``snapshots/`` and replay memories (the drift maps fit on
them) into a new workdir, changes only
``config.eval`` (the split, the index mode), and runs the experiment there:
every task has its snapshot, so nothing is trained, and the new workdir gets
the recall matrices, reports and analysis of that evaluation.

Use it to tune on ``val`` and report on ``test`` from the same trained
models: choose hyperparameters by the ``val`` numbers only. It runs as one
process (evaluation is cheap next to training).
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections
from absl import app, flags, logging

from ccmr_jax import checkpoint, cli, experiment, files, manifest
from ccmr_jax import workdir as layout

def prepare(source: str, workdir: str, split: str, index_mode: str | None = None) -> ml_collections.ConfigDict:
  """Copies ``source``'s config, tokenizer and snapshots into ``workdir``; returns the new config.

  Raises:
    cli.UserError: ``source`` is not a run with snapshots, or
      ``workdir`` holds a run of another config.
  """
  if split not in experiment.EVAL_SPLITS:
    raise cli.UserError(f"unknown split {split!r}; choose one of {list(experiment.EVAL_SPLITS)}")
  for path in (layout.config_path(source), layout.tokenizer_path(source)):
    if not manifest.is_sealed(path):
      raise cli.UserError(f"{source} has no {os.path.basename(path)}: --source must be the workdir of a run")
  snapshots = checkpoint.completed_snapshots(source)
  if not snapshots:
    raise cli.UserError(f"{source} has no snapshot yet: train it first")
  config = ml_collections.ConfigDict(manifest.read_json(layout.config_path(source)))
  config.eval.split = split
  if index_mode is not None:
    config.eval.index_mode = index_mode
  experiment.prepare_workdir(workdir, config)  # refuses a workdir of another config before anything is copied
  manifest.write_file(layout.tokenizer_path(workdir), manifest.read_file(layout.tokenizer_path(source)))
  for task in snapshots:
    if task not in checkpoint.completed_snapshots(workdir):
      files.copy_tree(layout.snapshot_dir(source, task), layout.snapshot_dir(workdir, task))
    memory = layout.replay_path(source, task)  # part of the drift maps' fit data (ccmr_jax.drift_maps)
    if manifest.is_sealed(memory) and not manifest.is_sealed(layout.replay_path(workdir, task)):
      manifest.write_file(layout.replay_path(workdir, task), manifest.read_file(memory))
  return config


_SOURCE = flags.DEFINE_string("source", None, "Workdir of a run whose snapshots are evaluated.")
_WORKDIR = flags.DEFINE_string("workdir", None, "New workdir for the evaluation.")
_SPLIT = flags.DEFINE_enum("split", "val", list(experiment.EVAL_SPLITS), "Split to evaluate on.")
_INDEX_MODE = flags.DEFINE_string("index_mode", None, "eval.index_mode for the new evaluation (default: the run's).")


@cli.exits_on_user_error()
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.configure_logging()
  config = prepare(_SOURCE.value, _WORKDIR.value, _SPLIT.value, _INDEX_MODE.value)
  experiment.run(config, _WORKDIR.value)
  logging.info("evaluated the snapshots of %s on %s in %s", _SOURCE.value, _SPLIT.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["source", "workdir"])
  cli.run(main)
