"""The pretraining stage: both towers trained on a pretraining corpus before the task stream.

  python -m ccmr_jax.pretrain --config=configs/pretrain_scenes.py --out=runs/pretrained_scenes

The corpus plays the part ImageNet and web captions play for the encoders of
the paper and its successors: one training set (no tasks) of a dataset the
task stream never sees. The towers train from random init with the
contrastive loss of ``config.loss`` for ``train.epochs_per_task`` epochs,
then are scored on the corpus's own test split. The output folder holds

  weights.npz   every param of the dual encoder, keyed by its path
                (:mod:`ccmr_jax.models.weights`)
  card.json     the pretraining config, the data seed, the steps, the final
                recall on the corpus test split, the tokenizer (built from
                the corpus's training captions, so every later task's words
                are known) and the sha256 of ``weights.npz`` (its identity)
  MANIFEST.json the size and sha256 of both (:mod:`ccmr_jax.manifest`)

A run with ``model.init_from = "pretrain"`` builds them from
``config.pretrain`` on first use and caches them under
``$CCMR_JAX_CACHE/pretrained/<hash of the pretraining config>``
(default ``~/.cache/ccmr_jax``): written into a temporary folder and renamed,
checked against its manifest when read, rebuilt when damaged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from ccmr_jax import cli, evaluate, files, index, manifest, metrics, sharding, train
from ccmr_jax.data import sources
from ccmr_jax.data.batches import PairSampler
from ccmr_jax.data.tokenizer import Tokenizer, build_tokenizer
from ccmr_jax.models import from_open_clip, weights
from ccmr_jax.models.dual_encoder import build_model

WEIGHTS_FILE = "weights.npz"
CARD_FILE = "card.json"


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A pretraining output folder, read and checked."""

  folder: str
  card: dict

  @property
  def source(self) -> str:
    return self.folder

  @property
  def weights_path(self) -> str:
    return os.path.join(self.folder, WEIGHTS_FILE)

  @property
  def tokenizer(self) -> Tokenizer:
    return Tokenizer.from_json(self.card["tokenizer"])


def config_key(config: ml_collections.ConfigDict) -> str:
  """16 hex digits of the sha256 of the pretraining config's canonical JSON: its cache key."""
  canonical = json.dumps(json.loads(config.to_json()), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_pretrained(folder: str) -> Pretrained:
  """Reads ``folder``'s card after checking the folder against its manifest.

  Raises:
    FileNotFoundError: the folder has no card or no weights.
    files.CorruptFileError: the folder does not match its manifest (damaged, or written before manifests:
      pretrain it again), or the card is not valid.
  """
  card_path, weights_path = os.path.join(folder, CARD_FILE), os.path.join(folder, WEIGHTS_FILE)
  for path in (card_path, weights_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: {folder} is not a pretraining output")
  manifest.check_folder(folder)
  card = files.read_json(card_path)
  if not isinstance(card, dict) or not {"sha256", "tokenizer", "config"} <= set(card):
    raise files.CorruptFileError(f"{card_path} is not a pretraining card (no sha256, tokenizer or config)")
  try:
    Tokenizer.from_json(card["tokenizer"])
  except (ValueError, TypeError, KeyError) as e:
    raise files.CorruptFileError(f"{card_path}: its tokenizer is unreadable ({e})") from e
  return Pretrained(folder, card)


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.model.get("init_from", ""):
    raise cli.UserError("a pretraining config starts from random init: set model.init_from to \"\"")
  if config.train.get("trainable", "all") != "all":
    raise cli.UserError("pretraining trains every param: set train.trainable to \"all\"")
  if config.tokenizer.get("kind", "words") != "words":
    raise cli.UserError("pretraining builds a word vocabulary from its corpus: set tokenizer.kind to \"words\"")
  for path in ("train.batch_size", "train.epochs_per_task", "train.learning_rate", "eval.batch_size"):
    section, field = path.split(".")
    if not config[section][field] > 0:
      raise cli.UserError(f"{path} must be positive, got {config[section][field]!r}")


def _corpus_recall(model, params, split, tokenizer: Tokenizer, mesh, config: ml_collections.ConfigDict) -> dict:
  """Recall of the pretrained towers on the corpus's test split (exact search)."""
  embedded = evaluate.make_embedders(model, mesh, config.eval.batch_size).embed(params, split, tokenizer)
  searchers = evaluate.Searchers(*(index.build_searcher(part, max(config.eval.ks)) for part in embedded))
  return evaluate.query_gallery(embedded, searchers, embedded, metrics.GroundTruth.from_examples(split),
                                config.eval.ks)


def _host_arrays(params) -> dict:
  """Replicated params as host arrays (each process holds a whole copy)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)


def _train(config: ml_collections.ConfigDict, train_split, tokenizer: Tokenizer, mesh):
  """The model and its params after ``train.epochs_per_task`` epochs on ``train_split``; and the step count."""
  model = build_model(config.model, tokenizer.vocab_size, tokenizer.max_length)
  params = train.init_params(model, config.seed, sources.input_image_size(config), tokenizer.max_length, mesh)
  optimizer = train.make_optimizer(config.train)
  step_fn = train.make_train_step(train.make_loss_fn(model, config.loss), optimizer, mesh)
  sampler = PairSampler.create(train_split, tokenizer)
  steps = sampler.steps_per_epoch(config.train.batch_size) * config.train.epochs_per_task
  if steps == 0:
    raise cli.UserError(f"train.batch_size={config.train.batch_size} exceeds the {len(train_split)} training "
                        "images of the pretraining corpus; lower it")
  logging.info("pretraining: %d steps of %d pairs", steps, config.train.batch_size)
  batches = itertools.chain.from_iterable(
      sampler.epoch(config.train.batch_size, config.seed, 0, epoch, jax.process_index(), jax.process_count())
      for epoch in range(config.train.epochs_per_task))
  state, _ = train.fit(train.init_state(params, optimizer, mesh), step_fn, batches, mesh,
                       train.learning_rate_schedule(config.train, steps), steps, 0, config.train.log_every)
  return model, state.params, steps


def pretrain(config: ml_collections.ConfigDict, out_dir: str) -> Pretrained:
  """Trains the towers on the corpus of ``config.data`` and writes ``out_dir`` (see the module docstring).

  Args:
    config: a pretraining config (``configs/pretrain_scenes.py``): ``seed``,
      ``data``, ``tokenizer``, ``model``, ``loss``, ``train``, ``eval.ks``,
      ``eval.batch_size``.
    out_dir: a local folder; it is written aside and renamed, so it exists
      only once complete (a finished one is replaced).

  Raises:
    cli.UserError: bad config or data.
  """
  start = time.perf_counter()
  _check_config(config)
  try:
    corpus = sources.load_dataset(config)
  except (sources.DataError, ValueError) as e:
    raise cli.UserError(str(e)) from e
  train_split = corpus.splits["train"]
  tokenizer = build_tokenizer(train_split.captions, config.tokenizer.max_length, config.tokenizer.num_oov_buckets,
                              config.tokenizer.min_count)
  mesh = sharding.make_mesh()
  logging.info("pretraining on %d images of %s (seed %s)", len(train_split), corpus.name,
               config.data.get(config.data.source, {}).get("seed"))
  model, params, steps = _train(config, train_split, tokenizer, mesh)
  recall = _corpus_recall(model, params, corpus.splits["test"], tokenizer, mesh, config)
  logging.info("pretrained: mean R@1 %.2f on the corpus test split", recall[metrics.HEADLINE])
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".pretrain_", dir=parent)
  try:
    weights.save_weights(os.path.join(staging, WEIGHTS_FILE), _host_arrays(params)["params"])
    card = {"config": json.loads(config.to_json()), "config_key": config_key(config),
            "data_seed": config.data.get(config.data.source, {}).get("seed"), "steps": steps,
            "train_images": len(train_split), "test_recall": recall, "tokenizer": tokenizer.to_json(),
            "sha256": files.file_sha256(os.path.join(staging, WEIGHTS_FILE)),
            "wall_s": round(time.perf_counter() - start, 1), "jax": jax.__version__}
    files.atomic_write_json(os.path.join(staging, CARD_FILE), card)
    manifest.seal_folder(staging)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir, ignore_errors=True)
    try:
      os.replace(staging, out_dir)
    except OSError:  # another process of the same job wrote it first
      if not os.path.isdir(out_dir):
        raise
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)
  return Pretrained(out_dir, card)


def cache_root() -> str:
  """``$CCMR_JAX_CACHE``, or ``~/.cache/ccmr_jax``."""
  return os.environ.get("CCMR_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ccmr_jax")


def cached_pretrained(config: ml_collections.ConfigDict) -> Pretrained:
  """The pretraining output of ``config`` from the cache; built (and cached) when absent or damaged."""
  folder = os.path.join(cache_root(), "pretrained", config_key(config))
  if os.path.isdir(folder):
    try:
      return load_pretrained(folder)
    except (FileNotFoundError, files.CorruptFileError) as e:
      logging.warning("the cached pretrained towers are unusable (%s); rebuilding %s", e, folder)
  logging.info("no cached pretrained towers for this pretraining config: pretraining them once into %s", folder)
  return pretrain(config, folder)


def _model_differences(run_model: ml_collections.ConfigDict, pretrain_model: ml_collections.ConfigDict) -> list[str]:
  ignored = ("init_from", "image_tower_weights")
  run, pre = (json.loads(m.to_json()) for m in (run_model, pretrain_model))
  return [f"model.{key}: run {run.get(key)!r}, pretrain {pre.get(key)!r}"
          for key in sorted(set(run) | set(pre)) if key not in ignored and run.get(key) != pre.get(key)]


def initial_weights(config: ml_collections.ConfigDict) -> Pretrained | from_open_clip.ConvertedWeights | None:
  """The pretrained towers ``config.model.init_from`` names, or None for random init.

  ``"pretrain"``: from ``config.pretrain`` (cached, built on first use);
  a path ending in ``.npz``: open_clip weights converted by
  ``python -m ccmr_jax.models.from_open_clip``; any other value: the folder a
  ``python -m ccmr_jax.pretrain --out=DIR`` wrote. Each has ``source``,
  ``weights_path`` and ``tokenizer``.

  Raises:
    cli.UserError: no ``config.pretrain``, a pretraining model unlike the
      run's, a converted file unlike the run's model, or a folder or file
      that is missing or damaged.
  """
  init_from = config.model.get("init_from", "")
  if not init_from:
    return None
  if init_from.endswith(".npz"):
    try:
      return from_open_clip.load_converted(os.path.expanduser(init_from), config, sources.input_image_size(config))
    except (OSError, ValueError) as e:
      raise cli.UserError(f"model.init_from: {e}") from e
  if init_from == "pretrain":
    if "pretrain" not in config:
      raise cli.UserError('model.init_from="pretrain" needs a config.pretrain section (see configs/scenes.py)')
    differences = _model_differences(config.model, config.pretrain.model)
    if differences:
      raise cli.UserError("config.pretrain.model must be the run's model:\n  " + "\n  ".join(differences))
    _check_config(config.pretrain)
    return cached_pretrained(config.pretrain)
  try:
    return load_pretrained(init_from)
  except (FileNotFoundError, files.CorruptFileError) as e:
    raise cli.UserError(f"model.init_from: {e}; rerun `python -m ccmr_jax.pretrain --out={init_from}` "
                        "or point model.init_from elsewhere") from e


@cli.exits_on_user_error()
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.configure_logging()
  result = pretrain(flags.FLAGS["config"].value, flags.FLAGS.out)
  recall = result.card["test_recall"][metrics.HEADLINE]
  print(f"wrote {result.weights_path} and {os.path.join(result.folder, CARD_FILE)} "
        f"({result.card['steps']} steps, mean R@1 {recall:.2f} on the corpus test split)")


if __name__ == "__main__":  # the flags exist only in the command: the module is imported by every run
  cli.define_config_file("config", None, "Pretraining config file.")
  flags.DEFINE_string("out", None, "Folder for weights.npz and card.json.")
  flags.mark_flags_as_required(["config", "out"])
  cli.run(main)
