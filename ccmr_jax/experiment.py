"""The continual loop: for each task, train → snapshot → index → query → report.

This is the one module that calls every stage. A workdir holds:

  config.json                    the config of the run (a rerun must match)
  tokenizer.json                 the tokenizer, fixed before task 0
  snapshots/task_TT/             Orbax snapshot S_t of the encoders
  embeddings/snapshot_SS/task_KK.npz
                                 task k's test images and captions embedded by S_s,
                                 with the ground-truth links (see README: exported embeddings)
  index/snapshot_SS/task_KK/{images,captions}/
                                 ScaNN searchers over those embeddings (task-aware search)
  index/union/POLICY/after_task_TT/{images,captions}/
                                 ScaNN searchers over the union of seen galleries
                                 as POLICY embeds them (task-agnostic search)
  eval/after_task_TT.json        R[t, k] for both scopes and policies, every k <= t
  continual/task_TT/regularizers/ Orbax regularizer states consolidated after task t
  continual/task_TT/replay.npz   the replay memory after task t (tasks 0..t)
  results.json, report.md, plots/*.png, tensorboard/

A rerun of the same command resumes: tasks whose evaluation is written are
skipped; a task with a snapshot but no evaluation is only evaluated; the
first task with neither is retrained from the previous snapshot (training is
a deterministic function of the config, so the numbers do not change).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ccmr_jax import analysis, checkpoint, evaluate, files, index, report, sharding, train
from ccmr_jax.continual import replay
from ccmr_jax.continual.importance import fisher_diagonal, mas_importance
from ccmr_jax.continual.regularizers import regularizer_states, transfer_regularizer_states
from ccmr_jax.continual.strategies import check_continual_config, parse_strategy
from ccmr_jax.data import sources
from ccmr_jax.data.batches import PairSampler, caption_text_ids
from ccmr_jax.data.task_split import TaskStream, split_into_tasks
from ccmr_jax.data.tokenizer import Tokenizer, build_tokenizer
from ccmr_jax.losses import LOSSES
from ccmr_jax.models.dual_encoder import build_model
from ccmr_jax.models.resnet import load_image_tower_weights

DATA_SOURCES = sources.DATA_SOURCES
EVAL_SPLITS = ("val", "test")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
  """A problem the user can fix (config, paths, data); main prints it without a traceback."""


def configure_logging() -> None:
  """Progress at INFO; Orbax narrates every save at INFO, so only its warnings and errors pass."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname or record.levelno >= 30)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects config values that cannot work, naming the field and the fix."""
  def positive(path: str, value) -> None:
    if not value > 0:
      raise UserError(f"{path} must be positive, got {value!r}")

  try:
    sources.check_data_config(config)
  except ValueError as e:
    raise UserError(str(e)) from e
  if config.loss.name not in LOSSES:
    raise UserError(f"unknown loss.name {config.loss.name!r}; choose one of {list(LOSSES)}")
  if config.eval.index_mode not in index.INDEX_MODES:
    raise UserError(f"unknown eval.index_mode {config.eval.index_mode!r}; choose one of {list(index.INDEX_MODES)}")
  if config.eval.split not in EVAL_SPLITS:
    raise UserError(f"unknown eval.split {config.eval.split!r}; choose one of {list(EVAL_SPLITS)}")
  try:
    parse_strategy(config.train.strategy)
    check_continual_config(config.continual)
  except ValueError as e:
    raise UserError(str(e)) from e
  for path in ("train.batch_size", "train.epochs_per_task", "train.learning_rate", "train.log_every",
               "eval.batch_size", "eval.ann_threshold", "data.num_tasks", "model.embed_dim", "tokenizer.max_length"):
    section, field = path.split(".")
    positive(path, config[section][field])
  if not all(isinstance(k, int) and k > 0 for k in config.eval.ks) or 1 not in config.eval.ks:
    raise UserError(f"eval.ks must be positive integers including 1, got {tuple(config.eval.ks)}")
  checkpoint_every = config.train.get("checkpoint_every", 0)  # absent (a run made before it existed): none
  if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0):
    raise UserError(f"train.checkpoint_every must be a whole number of steps, 0 for never, got {checkpoint_every!r}")


def load_task_stream(config: ml_collections.ConfigDict) -> TaskStream:
  """The task stream of ``config.data``; missing or malformed data is a :class:`UserError`."""
  try:
    dataset = sources.load_dataset(config)
  except sources.DataError as e:
    raise UserError(str(e)) from e
  try:
    return split_into_tasks(dataset, config.data.num_tasks, config.data.unlabeled)
  except ValueError as e:
    raise UserError(str(e)) from e


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: workdir has {a!r}, this run has {b!r}")
  return out


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool = False) -> None:
  """Creates the workdir or checks that it belongs to the same config.

  With ``allow_config_change`` a workdir of another config is taken over: the
  differences are logged and its ``config.json`` becomes this config.
  """
  try:
    files.makedirs(workdir)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")  # one per process: no race
    files.atomic_write_text(probe, "ok")
    files.remove(probe)
  except OSError as e:
    if e.errno in _DISK_FULL:
      raise
    raise UserError(f"cannot write to workdir {workdir}: {e.strerror or e}; choose another --workdir") from e
  path = os.path.join(workdir, "config.json")
  new = _config_json(config)
  if files.exists(path):
    differences = _config_differences(files.read_json(path), new)
    if differences and not allow_config_change:
      raise UserError(f"workdir {workdir} holds a run with another config:\n  " + "\n  ".join(differences)
                      + "\nUse a new --workdir, delete this one to start over, or pass --allow_config_change "
                      "to resume it under the new config.")
    if differences:
      logging.warning("resuming %s under a changed config:\n  %s", workdir, "\n  ".join(differences))
  if jax.process_index() == 0 and (not files.exists(path) or allow_config_change):
    files.atomic_write_json(path, new)


def load_or_build_tokenizer(workdir: str, stream: TaskStream, config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer of ``workdir``, or a new one from task 0's training captions only."""
  path = os.path.join(workdir, "tokenizer.json")
  if files.exists(path):
    try:
      return Tokenizer.from_json(files.read_text(path))
    except ValueError as e:
      raise UserError(f"{path}: {e}; delete the workdir to start over") from e
  tokenizer = build_tokenizer(stream.tasks[0].splits["train"].captions, config.tokenizer.max_length,
                              config.tokenizer.num_oov_buckets, config.tokenizer.min_count)
  if jax.process_index() == 0:
    files.atomic_write_text(path, tokenizer.to_json())
  return tokenizer


def _eval_path(workdir: str, task: int) -> str:
  return os.path.join(workdir, "eval", f"after_task_{task:02d}.json")


def _embedding_path(workdir: str, snapshot: int, task: int) -> str:
  return os.path.join(workdir, "embeddings", f"snapshot_{snapshot:02d}", f"task_{task:02d}.npz")


def _index_path(workdir: str, snapshot: int, task: int, gallery: str) -> str:
  return os.path.join(workdir, "index", f"snapshot_{snapshot:02d}", f"task_{task:02d}", gallery)


class _TensorBoard:
  """Scalars to ``workdir/tensorboard`` (process 0 only).

  For a cloud workdir the event files are written locally and uploaded by
  :meth:`sync` (after every task, and at the end).
  """

  def __init__(self, workdir: str):
    self.writer = None
    self.target = os.path.join(workdir, "tensorboard")
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self.local = tempfile.mkdtemp(prefix="ccmr_tensorboard_") if files.is_remote(workdir) else self.target
      self.writer = SummaryWriter(self.local)

  def scalars(self, step: int, values: dict, prefix: str) -> None:
    if self.writer is not None:
      for name, value in values.items():
        self.writer.add_scalar(f"{prefix}/{name}", value, step)
      self.writer.flush()

  def sync(self) -> None:
    if self.writer is not None and self.local != self.target:
      for name in os.listdir(self.local):
        with open(os.path.join(self.local, name), "rb") as f:
          files.atomic_write_bytes(os.path.join(self.target, name), f.read())

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.sync()


def _union_index_path(workdir: str, policy: str, task: int, gallery: str) -> str:
  return os.path.join(workdir, "index", "union", policy, f"after_task_{task:02d}", gallery)


def _build_and_save_index(embeddings: np.ndarray, path: str, config: ml_collections.ConfigDict) -> None:
  searcher = index.build_searcher(embeddings, max(config.eval.ks), config.eval.index_mode, config.eval.ann_threshold)
  index.save_searcher(searcher, path)


def _evaluate_after_task(t: int, params, stream: TaskStream, tokenizer: Tokenizer, embedders, workdir: str,
                         config: ml_collections.ConfigDict) -> dict:
  """Embeds the seen tasks' ``eval.split`` splits with S_t, builds this snapshot's indexes, queries both policies.

  Returns ``{scope: {policy: {str(k): metrics}}}`` (empty dicts on processes other than 0).
  """
  embed_images, embed_texts = embedders
  tests = [stream.tasks[k].splits[config.eval.split] for k in range(t + 1)]
  current = {}  # task -> (image, caption) embeddings by S_t: the queries, and the reindex galleries
  for k, test in enumerate(tests):
    current[k] = (embed_images(params, test.images), embed_texts(params, tokenizer.encode(test.captions)))
  results = {scope: {policy: {} for policy in evaluate.POLICIES} for scope in evaluate.SCOPES}
  if jax.process_index() != 0:
    return results
  for k, (image_emb, caption_emb) in current.items():
    files.atomic_save_npz(_embedding_path(workdir, t, k), images=image_emb, captions=caption_emb,
                          image_ids=tests[k].image_ids, caption_image=tests[k].caption_image,
                          caption_text_ids=caption_text_ids(tests[k].captions))
    _build_and_save_index(image_emb, _index_path(workdir, t, k, "images"), config)
    _build_and_save_index(caption_emb, _index_path(workdir, t, k, "captions"), config)

  union = evaluate.UnionGallery.from_tasks(tests)
  truths = [evaluate.GroundTruth.from_examples(test) for test in tests]
  for policy in evaluate.POLICIES:
    gallery_parts = []
    for k in range(t + 1):
      snapshot = evaluate.snapshot_for_gallery(policy, k, t)
      image_searcher = index.load_searcher(_index_path(workdir, snapshot, k, "images"))
      caption_searcher = index.load_searcher(_index_path(workdir, snapshot, k, "captions"))
      if snapshot == t:
        gallery_parts.append(current[k])
      else:
        stored = files.load_npz(_embedding_path(workdir, snapshot, k))
        gallery_parts.append((stored["images"], stored["captions"]))
      results["task_aware"][policy][str(k)] = evaluate.query_gallery(
          *current[k], image_searcher, caption_searcher, truths[k], config.eval.ks, *gallery_parts[-1])
    union_galleries = [np.concatenate([p[part] for p in gallery_parts]) for part in (0, 1)]
    for gallery, embeddings in zip(("images", "captions"), union_galleries):
      _build_and_save_index(embeddings, _union_index_path(workdir, policy, t, gallery), config)
    image_searcher = index.load_searcher(_union_index_path(workdir, policy, t, "images"))
    caption_searcher = index.load_searcher(_union_index_path(workdir, policy, t, "captions"))
    for k in range(t + 1):
      metrics, _ = union.query(k, *current[k], image_searcher, caption_searcher, config.eval.ks, *union_galleries)
      results["task_agnostic"][policy][str(k)] = metrics
  return results


def _log_stream(stream: TaskStream) -> list[dict]:
  info = []
  for task in stream.tasks:
    counts = task.counts()
    logging.info("task %d %-10s train %5d images / %6d captions, val %4d, test %4d images / %5d captions",
                 task.index, task.name, counts["train"]["images"], counts["train"]["captions"],
                 counts["val"]["images"], counts["test"]["images"], counts["test"]["captions"])
    info.append({"index": task.index, "name": task.name,
                 "categories": [stream.category_names[c] for c in task.categories], "counts": counts})
  if any(stream.dropped.values()):
    logging.info("images without labels dropped: %s", stream.dropped)
  return info


def _replay_path(workdir: str, task: int) -> str:
  return os.path.join(workdir, "continual", f"task_{task:02d}", "replay.npz")


def _consolidated_regularizers(t: int, strategy, state: train.TrainState, params, loss_fn, model,
                               stream: TaskStream, tokenizer: Tokenizer, mesh,
                               config: ml_collections.ConfigDict) -> list:
  """The regularizer states after task ``t``: importances on its own training data, then consolidation."""
  sampler = PairSampler.create(stream.tasks[t].splits["train"], tokenizer)
  max_batches = config.continual.importance.max_batches

  def batches():
    for batch in sampler.epoch(config.train.batch_size, config.seed, t, 0, jax.process_index(),
                               jax.process_count()):
      yield sharding.to_global(batch, mesh)

  importances = {}
  if "fisher" in strategy.needs_importance:
    importances["fisher"] = fisher_diagonal(loss_fn, params, batches(), has_aux=True, max_batches=max_batches)
  if "mas" in strategy.needs_importance:
    importances["mas"] = mas_importance(
        lambda p, b: model.apply(p, b["image"], b["tokens"], method=model.embed_unnormalized), params,
        batches(), max_batches=max_batches)
  return regularizer_states(strategy.consolidate(state.opt_state, params, importances))


def _batches_from(sampler, config: ml_collections.ConfigDict, task: int, steps_per_epoch: int, start_step: int):
  """This process's batches of task ``task`` after the first ``start_step`` steps.

  Epochs before the start are not drawn; the start epoch is drawn whole (its
  order depends on all of it) and its first batches are skipped.
  """
  for epoch in range(start_step // steps_per_epoch, config.train.epochs_per_task):
    batches = sampler.epoch(config.train.batch_size, config.seed, task, epoch,
                            jax.process_index(), jax.process_count())
    yield from itertools.islice(batches, max(start_step - epoch * steps_per_epoch, 0), None)


def _first_unfinished_task(workdir: str, num_tasks: int) -> int:
  t = 0
  while t < num_tasks and files.exists(_eval_path(workdir, t)):
    t += 1
  return t


def run(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) the whole continual experiment; returns the results document.

  Args:
    config: the experiment config.
    workdir: local folder or ``gs://`` prefix; a rerun with the same config
      resumes from what it holds (finished evaluations, snapshots, the last
      progress checkpoint of the task in training).
    allow_config_change: resume a workdir made with another config (the
      differences are logged and the workdir's config.json replaced).

  Raises:
    UserError: bad config or data, a workdir that cannot be used, a diverged
      loss, a full disk: a one-line cause and its fix.
  """
  try:
    return _run(config, workdir, allow_config_change)
  except FloatingPointError as e:
    raise UserError(f"{e}; the checkpoints before it are kept in {workdir}/progress and {workdir}/snapshots. "
                    "Lower train.learning_rate (or check the data) and rerun with --allow_config_change "
                    "to resume from them") from e
  except files.CorruptFileError as e:
    raise UserError(str(e)) from e
  except OSError as e:
    if e.errno in _DISK_FULL:
      raise UserError(f"no space left on the device while writing {e.filename or 'to the workdir'}; free space "
                      "(or use a --workdir on a larger disk) and rerun the same command: finished tasks and the "
                      "last checkpoint are kept, half-written files are not") from e
    raise


def _run(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> dict:
  start_time = time.perf_counter()
  check_config(config)
  prepare_workdir(workdir, config, allow_config_change)
  stream = load_task_stream(config)
  task_info = _log_stream(stream)
  num_tasks = len(stream)
  tokenizer = load_or_build_tokenizer(workdir, stream, config)
  strategy = parse_strategy(config.train.strategy)

  mesh = sharding.make_mesh()
  try:
    sharding.check_divisible(config.train.batch_size, mesh)
    sharding.check_divisible(config.eval.batch_size, mesh, "eval.batch_size")
  except ValueError as e:
    raise UserError(str(e)) from e
  try:
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.max_length)
  except ValueError as e:
    raise UserError(str(e)) from e
  image_size = sources.input_image_size(config)
  dummy_images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  dummy_tokens = jnp.zeros((1, tokenizer.max_length), jnp.int32)
  params = jax.jit(model.init, out_shardings=sharding.replicated(mesh))(
      jax.random.key(config.seed), dummy_images, dummy_tokens)
  if config.model.get("image_tower_weights"):
    try:
      params = sharding.replicate(load_image_tower_weights(params, config.model.image_tower_weights), mesh)
    except (OSError, ValueError) as e:
      raise UserError(f"model.image_tower_weights: {e}") from e
    logging.info("image tower initialised from %s", config.model.image_tower_weights)
  optimizer = train.make_optimizer(config.train, strategy.regularizers(config))
  loss_fn = train.make_loss_fn(model, config.loss, config.continual.lwf if strategy.uses_distillation else None)
  step_fn = train.make_train_step(loss_fn, optimizer, mesh)
  template = regularizer_states(sharding.replicate(optimizer.init(params), mesh))
  embedders = evaluate.make_embedder(model, mesh, config.eval.batch_size)
  tensorboard = _TensorBoard(workdir)
  metrics = evaluate.metric_names(config.eval.ks)

  first = _first_unfinished_task(workdir, num_tasks)
  evaluations = [files.read_json(_eval_path(workdir, t)) for t in range(first)]
  if first > 0:
    logging.info("resuming: tasks 0..%d already evaluated", first - 1)
    params = checkpoint.restore_snapshot(workdir, first - 1, checkpoint.abstract_like(params))
  timings = []
  continual_state = None  # the regularizer states consolidated after the previous task
  memory = replay.ReplayMemory()
  for t in range(first, num_tasks):
    task_start = time.perf_counter()
    if t in checkpoint.completed_snapshots(workdir):
      logging.info("task %d: snapshot found, evaluating it", t)
      params = checkpoint.restore_snapshot(workdir, t, checkpoint.abstract_like(params))
      # Task t's continual state was saved before its snapshot: the next task reads it from disk.
      continual_state, memory = None, replay.ReplayMemory()
    else:
      train_data = stream.training_data(strategy.training_tasks(t))
      if strategy.uses_replay:
        if t > 0 and not memory.tasks:  # resumed run
          memory = replay.ReplayMemory.load(_replay_path(workdir, t - 1))
        sampler = replay.MixedSampler.create(train_data, memory.examples(stream) if memory.tasks else None,
                                             tokenizer, config.continual.replay.fraction)
      else:
        sampler = PairSampler.create(train_data, tokenizer)
      steps_per_epoch = sampler.steps_per_epoch(config.train.batch_size)
      if steps_per_epoch == 0:
        raise UserError(f"train.batch_size={config.train.batch_size} exceeds the {len(train_data)} "
                        f"training images of task {t}; lower it")
      total_steps = steps_per_epoch * config.train.epochs_per_task
      # Copied before init_state: the first step donates params.
      teacher = jax.tree.map(jnp.copy, params) if strategy.uses_distillation and t > 0 else None
      state = train.init_state(params, optimizer, mesh)
      if t > 0 and strategy.regularizer_components:
        if continual_state is None:  # resumed run
          continual_state = checkpoint.restore_regularizers(workdir, t - 1, checkpoint.abstract_like(template))
        state = state._replace(opt_state=sharding.replicate(
            transfer_regularizer_states(continual_state, state.opt_state), mesh))
      start_step = checkpoint.latest_progress(workdir, t) or 0
      if start_step:
        logging.info("task %d: resuming from its checkpoint at step %d of %d", t, start_step, total_steps)
        state = checkpoint.restore_progress(workdir, t, start_step, checkpoint.abstract_like(state))
      batches = _batches_from(sampler, config, t, steps_per_epoch, start_step)
      logging.info("task %d (%s): %d steps on %d images (strategy %s)", t, stream.tasks[t].name,
                   total_steps, len(train_data), strategy.name)
      schedule = train.learning_rate_schedule(config.train, total_steps)
      state, _ = train.fit(state, step_fn, batches, mesh, schedule, total_steps, t, config.train.log_every,
                           on_log=lambda step, m: tensorboard.scalars(step, m, f"train/task_{t:02d}"),
                           teacher_params=teacher, start_step=start_step,
                           checkpoint_every=config.train.get("checkpoint_every", 0),
                           on_checkpoint=lambda step, s: checkpoint.save_progress(workdir, t, step, s))
      params = state.params
      # The continual state is saved before the snapshot, so an existing snapshot implies it is on disk.
      if strategy.regularizer_components:
        continual_state = _consolidated_regularizers(t, strategy, state, params, loss_fn, model, stream,
                                                     tokenizer, mesh, config)
        checkpoint.save_regularizers(workdir, t, continual_state)
      if strategy.uses_replay:
        train_t = stream.tasks[t].splits["train"]
        selection = config.continual.replay.selection
        embeddings = embedders[0](params, train_t.images) if selection == "herding" else None
        rows = replay.select_rows(selection, len(train_t), config.continual.replay.memory_per_task,
                                  seed=config.seed, task=t, image_embeddings=embeddings)
        memory = memory.add_task(t, rows)
        if jax.process_index() == 0:
          memory.save(_replay_path(workdir, t))
      checkpoint.save_snapshot(workdir, t, params)
      if jax.process_index() == 0:
        checkpoint.clear_progress(workdir, t)
    train_seconds = time.perf_counter() - task_start
    evaluation = _evaluate_after_task(t, params, stream, tokenizer, embedders, workdir, config)
    if jax.process_index() == 0:
      files.atomic_write_json(_eval_path(workdir, t), evaluation)
      for scope, per_policy in evaluation.items():
        for policy, per_task in per_policy.items():
          for k, values in per_task.items():
            tensorboard.scalars(t, values, f"eval_{scope}_{policy}/task_{int(k):02d}")
      tensorboard.sync()
    evaluations.append(evaluation)
    timings.append({"task": t, "train_s": round(train_seconds, 2),
                    "eval_s": round(time.perf_counter() - task_start - train_seconds, 2)})
    logging.info("task %d done: mean R@1 on it %.2f (%.0fs train, %.0fs eval)", t,
                 evaluation["task_aware"]["reindex"].get(str(t), {}).get(evaluate.HEADLINE, float("nan")),
                 timings[-1]["train_s"], timings[-1]["eval_s"])
  tensorboard.close()

  run_info = {"config": _config_json(config), "tasks": task_info, "devices": jax.device_count(),
              "processes": jax.process_count(), "timings": timings,
              "wall_s_this_invocation": round(time.perf_counter() - start_time, 2)}
  if jax.process_index() != 0:  # only process 0 queries the indexes: the others hold no metrics
    return {**run_info, "tasks_trained": len(evaluations)}
  results = report.build_results(evaluations, metrics, run_info)
  results["analysis"] = analysis.analyze_workdir(workdir, results["tasks_trained"])
  results["analysis_summary"] = analysis.summarize_analysis(results["analysis"])
  results_path = os.path.join(workdir, "results.json")
  files.atomic_write_json(results_path, results)
  plots = report.plot_results(results, workdir)
  plots.append(analysis.plot_analysis(results["analysis"], os.path.join(workdir, "plots", "analysis.png")))
  report_path = report.write_report(results, workdir, plots)
  print("\n" + report.summary_table(results) + "\n")
  print("wrote:\n  " + "\n  ".join([results_path, report_path, *plots, os.path.join(workdir, "tensorboard")]))
  return results
