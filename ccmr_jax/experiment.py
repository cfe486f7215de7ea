"""The continual loop, orchestration only: for each task, train → close → evaluate → record.

This is the one module that calls every stage. The workdir layout is in
:mod:`ccmr_jax.workdir`. Between tasks the run carries one value,
:class:`CarriedState` (the snapshot's params, the consolidated regularizer
states, the replay memory): handed on in memory, or loaded from the workdir
when a rerun resumes.

A rerun of the same command resumes: tasks whose evaluation is written are
skipped; a task with a snapshot but no evaluation is only evaluated; the
first task with neither is retrained from the previous snapshot, from its
last progress checkpoint if it has one (training is a deterministic function
of the config, so the numbers do not change). Before anything else the
rerun checks every artifact against its manifest (:mod:`ccmr_jax.integrity`):
damaged computed files are deleted and recomputed, damaged trained state
stops it (or, with ``repair``, is retrained).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
from absl import logging

from ccmr_jax import (analysis, checkpoint, drift_maps, evaluate, files, host_memory, index, integrity, manifest,
                      metrics, pretrain, report, search_figures, sharding, train)
from ccmr_jax import workdir as layout
from ccmr_jax.cli import UserError
from ccmr_jax.continual import replay
from ccmr_jax.continual.importance import fisher_diagonal, mas_importance
from ccmr_jax.continual.regularizers import regularizer_states, transfer_regularizer_states
from ccmr_jax.continual.strategies import Strategy, check_continual_config, parse_strategy
from ccmr_jax.data import sources
from ccmr_jax.data.batches import PairSampler
from ccmr_jax.data.examples import Examples
from ccmr_jax.data.task_split import TaskStream, split_into_tasks
from ccmr_jax.data.clip_tokenizer import ClipTokenizer
from ccmr_jax.data.tokenizer import TOKENIZER_KINDS, Tokenizer, build_tokenizer, tokenizer_from_json
from ccmr_jax.losses import LOSSES
from ccmr_jax.models import weights
from ccmr_jax.models.dual_encoder import build_model
from ccmr_jax.models.resnet import load_image_tower_weights

DATA_SOURCES = sources.DATA_SOURCES
EVAL_SPLITS = ("val", "test")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects config values that cannot work, naming the field and the fix."""
  try:
    sources.check_data_config(config)
    if parse_strategy(config.train.strategy).uses_compatibility and "bct" not in config.continual:
      raise ValueError("train.strategy uses bct but config.continual has no bct section; add "
                       "config.continual.bct = ml_collections.ConfigDict({'weight': 1.0}) (see ccmr_jax/defaults.py)")
    check_continual_config(config.continual)
    train.trainable_patterns(config.train.get("trainable", "all"))
    report.plots_enabled()  # a bad $CCMR_JAX_PLOTS stops the run before training, not after it
  except ValueError as e:
    raise UserError(str(e)) from e
  choices = {"loss.name": LOSSES, "eval.index_mode": index.INDEX_MODES, "eval.split": EVAL_SPLITS,
             "tokenizer.kind": TOKENIZER_KINDS}
  for path, allowed in choices.items():
    section, field = path.split(".")
    value = config[section].get(field, "words") if path == "tokenizer.kind" else config[section][field]
    if value not in allowed:
      raise UserError(f"unknown {path} {value!r}; choose one of {list(allowed)}")
  for path in ("train.batch_size", "train.epochs_per_task", "train.learning_rate", "train.log_every",
               "eval.batch_size", "eval.ann_threshold", "data.num_tasks", "model.embed_dim", "tokenizer.max_length"):
    section, field = path.split(".")
    if not config[section][field] > 0:
      raise UserError(f"{path} must be positive, got {config[section][field]!r}")
  if not all(isinstance(k, int) and k > 0 for k in config.eval.ks) or 1 not in config.eval.ks:
    raise UserError(f"eval.ks must be positive integers including 1, got {tuple(config.eval.ks)}")
  target = evaluate.recall_target(config)
  if not (isinstance(target, (int, float)) and 0 < target <= 1):
    raise UserError(f"eval.ann_recall_target must be a recall in (0, 1], got {target!r}")
  fit_images, ridge = evaluate.drift_map_settings(config)
  if not (isinstance(fit_images, int) and fit_images > 0):
    raise UserError(f"eval.drift_maps.fit_images must be a positive whole number, got {fit_images!r}")
  if not (isinstance(ridge, (int, float)) and ridge >= 0):
    raise UserError(f"eval.drift_maps.ridge must be >= 0, got {ridge!r}")
  checkpoint_every = config.train.get("checkpoint_every", 0)  # absent (a run made before it existed): none
  if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0):
    raise UserError(f"train.checkpoint_every must be a whole number of steps, 0 for never, got {checkpoint_every!r}")


def load_task_stream(config: ml_collections.ConfigDict) -> TaskStream:
  """The task stream of ``config.data``; missing or malformed data is a :class:`UserError`."""
  try:
    return split_into_tasks(sources.load_dataset(config), config.data.num_tasks, config.data.unlabeled,
                            tuple(config.data.get("task_order", ())))
  except (sources.DataError, ValueError) as e:
    raise UserError(str(e)) from e


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool = False) -> None:
  """Creates the workdir or checks that it belongs to the same config (see :func:`ccmr_jax.workdir.prepare`)."""
  differences = layout.prepare(workdir, config, allow_config_change, jax.process_index())
  if differences:
    logging.warning("resuming %s under a changed config:\n  %s", workdir, "\n  ".join(differences))


def plan_repairs(workdir: str, config: ml_collections.ConfigDict, repair: bool) -> integrity.Plan:
  """Checks every artifact of ``workdir`` against its manifest; returns what this run redoes about the damage.

  Raises:
    UserError: an artifact is damaged and cannot be recomputed without training (and ``repair`` is off),
      or ``config.json`` is damaged: the first such, in one line.
  """
  findings = integrity.scan(workdir)
  plan = integrity.plan_rerun(workdir, findings, config.data.num_tasks,
                              integrity.carried_kinds(parse_strategy(config.train.strategy)), repair)
  if plan.blocked:
    more = f" ({len(plan.blocked) - 1} more: python -m ccmr_jax.verify --workdir={workdir})" if plan.blocked[1:] else ""
    raise UserError(plan.blocked[0] + more)
  return plan


def apply_repairs(workdir: str, plan: integrity.Plan) -> None:
  """Logs each repair and deletes what ``plan`` recomputes (process 0; the others wait for it)."""
  for note in plan.notes:
    logging.warning("repair: %s", note)
  if jax.process_index() == 0:
    integrity.apply(workdir, plan)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ccmr_jax: workdir repaired")


def new_tokenizer(stream: TaskStream, config: ml_collections.ConfigDict) -> Tokenizer | ClipTokenizer:
  """``tokenizer.kind``'s tokenizer: words of task 0's training captions, or CLIP's BPE (``clip_bpe``)."""
  if config.tokenizer.get("kind", "words") == "clip_bpe":
    try:
      return ClipTokenizer.load(config.tokenizer.get("bpe_vocab", ""), config.tokenizer.max_length)
    except (OSError, ValueError, ImportError) as e:
      raise UserError(f"tokenizer.bpe_vocab: {e}") from e
  return build_tokenizer(stream.tasks[0].splits["train"].captions, config.tokenizer.max_length,
                         config.tokenizer.num_oov_buckets, config.tokenizer.min_count)


def load_or_build_tokenizer(workdir: str, stream: TaskStream, config: ml_collections.ConfigDict,
                            pretrained: pretrain.Pretrained | None = None) -> Tokenizer | ClipTokenizer:
  """The tokenizer of ``workdir``; else the pretrained towers' one, or a new one (:func:`new_tokenizer`)."""
  path = layout.tokenizer_path(workdir)
  if manifest.is_sealed(path):
    try:
      tokenizer = tokenizer_from_json(manifest.read_text(path))
    except ValueError as e:
      raise UserError(f"{path}: {e}; delete the workdir to start over") from e
    if pretrained is not None and tokenizer != pretrained.tokenizer:
      raise UserError(f"{path} is not the tokenizer of the pretrained towers in {pretrained.source}; "
                      "delete the workdir to start over")
    return tokenizer
  tokenizer = pretrained.tokenizer if pretrained is not None else new_tokenizer(stream, config)
  if jax.process_index() == 0:
    manifest.write_text(path, tokenizer.to_json())
  return tokenizer


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


@dataclasses.dataclass(frozen=True)
class Components:
  """Everything a run builds once from its config, before the first task."""

  stream: TaskStream
  task_info: list[dict]
  tokenizer: Tokenizer
  strategy: Strategy
  mesh: Any
  model: Any
  initial_params: Any
  abstract_params: Any  # shapes, dtypes and shardings of the params: the target of a snapshot's restore
  optimizer: Any
  loss_fn: Callable
  step_fn: Callable
  embedders: evaluate.Embedders
  regularizer_template: list  # the regularizer states of a fresh optimizer state: the target of a restore
  tensorboard: report.TensorBoard


class CarriedState(NamedTuple):
  """What a finished task hands the next one.

  Attributes:
    params: the snapshot ``S_t`` (the initial params before task 0).
    regularizers: the regularizer states consolidated after task ``t``; empty
      before task 0 and for strategies without regularizers.
    memory: the replay memory of tasks ``0..t`` (empty without replay).
  """

  params: Any
  regularizers: list
  memory: replay.ReplayMemory


def _initial_params(config: ml_collections.ConfigDict, model, tokenizer: Tokenizer, mesh,
                    pretrained: pretrain.Pretrained | None):
  params = train.init_params(model, config.seed, sources.input_image_size(config), tokenizer.max_length, mesh)
  if pretrained is not None:
    try:
      params = sharding.replicate(weights.load_encoder_weights(params, pretrained.weights_path), mesh)
    except ValueError as e:
      raise UserError(f"model.init_from: {e}") from e
    logging.info("encoders initialised from the pretrained towers in %s", pretrained.source)
  if config.model.get("image_tower_weights"):
    try:
      params = sharding.replicate(load_image_tower_weights(params, config.model.image_tower_weights), mesh)
    except (OSError, ValueError) as e:
      raise UserError(f"model.image_tower_weights: {e}") from e
    logging.info("image tower initialised from %s", config.model.image_tower_weights)
  return params


def build_components(config: ml_collections.ConfigDict, workdir: str) -> Components:
  """The task stream, tokenizer, model, initial params, optimizer, jitted step and embedders of a run."""
  stream = load_task_stream(config)
  task_info = _log_stream(stream)
  pretrained = pretrain.initial_weights(config)
  tokenizer = load_or_build_tokenizer(workdir, stream, config, pretrained)
  strategy = parse_strategy(config.train.strategy)
  mesh = sharding.make_mesh()
  try:
    sharding.check_divisible(config.train.batch_size, mesh)
    sharding.check_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.max_length)
  except ValueError as e:
    raise UserError(str(e)) from e
  params = _initial_params(config, model, tokenizer, mesh, pretrained)
  try:
    train.trainable_mask(params, train.trainable_patterns(config.train.get("trainable", "all")))
  except ValueError as e:
    raise UserError(str(e)) from e
  optimizer = train.make_optimizer(config.train, strategy.regularizers(config))
  loss_fn = train.make_loss_fn(model, config.loss, config.continual.lwf if strategy.uses_distillation else None,
                               config.continual.bct if strategy.uses_compatibility else None)
  return Components(
      stream=stream, task_info=task_info, tokenizer=tokenizer, strategy=strategy, mesh=mesh, model=model,
      initial_params=params, abstract_params=checkpoint.abstract_like(params), optimizer=optimizer, loss_fn=loss_fn,
      step_fn=train.make_train_step(loss_fn, optimizer, mesh),
      embedders=evaluate.make_embedders(model, mesh, config.eval.batch_size),
      regularizer_template=regularizer_states(sharding.replicate(optimizer.init(params), mesh)),
      tensorboard=report.TensorBoard(layout.tensorboard_dir(workdir), jax.process_index() == 0))


def _next_task_trains(c: Components, workdir: str, task: int) -> bool:
  """Whether task ``task + 1`` exists and has no snapshot yet, so that it trains from ``task``'s state."""
  return task + 1 < len(c.stream) and task + 1 not in checkpoint.completed_snapshots(workdir)


def load_carried(c: Components, workdir: str, task: int) -> CarriedState:
  """The state task ``task`` handed on, read from the workdir (``task = -1``: the start of the run).

  The regularizer states and the replay memory are read only when the next
  task trains from them: a workdir whose later tasks all have snapshots (a
  re-evaluation) needs only the snapshots.
  """
  if task < 0:
    return CarriedState(c.initial_params, [], replay.ReplayMemory())
  params = checkpoint.restore_snapshot(workdir, task, c.abstract_params)
  if not _next_task_trains(c, workdir, task):
    return CarriedState(params, [], replay.ReplayMemory())
  regularizers = []
  if c.strategy.regularizer_components:
    regularizers = checkpoint.restore_regularizers(workdir, task, checkpoint.abstract_like(c.regularizer_template))
  memory = replay.ReplayMemory.load(layout.replay_path(workdir, task)) if c.strategy.uses_replay \
      else replay.ReplayMemory()
  return CarriedState(params, regularizers, memory)


def _sampler(c: Components, t: int, carried: CarriedState, config: ml_collections.ConfigDict):
  train_data = c.stream.training_data(c.strategy.training_tasks(t))
  if c.strategy.uses_replay:
    memory = carried.memory.examples(c.stream) if carried.memory.tasks else None
    sampler = replay.MixedSampler.create(train_data, memory, c.tokenizer, config.continual.replay.fraction)
  else:
    sampler = PairSampler.create(train_data, c.tokenizer)
  if sampler.steps_per_epoch(config.train.batch_size) == 0:
    raise UserError(f"train.batch_size={config.train.batch_size} exceeds the {len(train_data)} "
                    f"training images of task {t}; lower it")
  return sampler, len(train_data)


def _batches_from(sampler, config: ml_collections.ConfigDict, task: int, steps_per_epoch: int, start_step: int):
  """This process's batches of task ``task`` after the first ``start_step`` steps.

  Epochs before the start are not drawn; the start epoch is drawn whole (its
  order depends on all of it) and its first batches are skipped.
  """
  for epoch in range(start_step // steps_per_epoch, config.train.epochs_per_task):
    batches = sampler.epoch(config.train.batch_size, config.seed, task, epoch,
                            jax.process_index(), jax.process_count())
    yield from itertools.islice(batches, max(start_step - epoch * steps_per_epoch, 0), None)


def _initial_train_state(c: Components, t: int, carried: CarriedState, workdir: str, total_steps: int):
  """Task ``t``'s train state at its start, or at its last progress checkpoint; returns it and its step."""
  state = train.init_state(carried.params, c.optimizer, c.mesh)
  if carried.regularizers:
    state = state._replace(opt_state=sharding.replicate(
        transfer_regularizer_states(carried.regularizers, state.opt_state), c.mesh))
  start_step = checkpoint.latest_progress(workdir, t) or 0
  if start_step:
    logging.info("task %d: resuming from its checkpoint at step %d of %d", t, start_step, total_steps)
    state = checkpoint.restore_progress(workdir, t, start_step, checkpoint.abstract_like(state))
  return state, start_step


def train_task(c: Components, t: int, carried: CarriedState, workdir: str,
               config: ml_collections.ConfigDict) -> train.TrainState:
  """Fits task ``t`` from the carried state (or its last progress checkpoint); returns the final train state."""
  sampler, num_images = _sampler(c, t, carried, config)
  steps_per_epoch = sampler.steps_per_epoch(config.train.batch_size)
  total_steps = steps_per_epoch * config.train.epochs_per_task
  # Copied before the train state is built: the first step donates its params.
  teacher = jax.tree.map(jnp.copy, carried.params) if c.strategy.uses_teacher and t > 0 else None
  state, start_step = _initial_train_state(c, t, carried, workdir, total_steps)
  logging.info("task %d (%s): %d steps on %d images (strategy %s)", t, c.stream.tasks[t].name,
               total_steps, num_images, c.strategy.name)
  state, _ = train.fit(state, c.step_fn, _batches_from(sampler, config, t, steps_per_epoch, start_step), c.mesh,
                       train.learning_rate_schedule(config.train, total_steps), total_steps, t,
                       config.train.log_every,
                       on_log=lambda step, m: c.tensorboard.scalars(step, m, f"train/task_{t:02d}"),
                       teacher_params=teacher, start_step=start_step,
                       checkpoint_every=config.train.get("checkpoint_every", 0),
                       on_checkpoint=lambda step, s: checkpoint.save_progress(workdir, t, step, s))
  return state


def _consolidated_regularizers(c: Components, t: int, state: train.TrainState,
                               config: ml_collections.ConfigDict) -> list:
  """The regularizer states after task ``t``: importances on its own training data, then consolidation."""
  sampler = PairSampler.create(c.stream.tasks[t].splits["train"], c.tokenizer)
  max_batches = config.continual.importance.max_batches

  def batches():
    for batch in sampler.epoch(config.train.batch_size, config.seed, t, 0, jax.process_index(),
                               jax.process_count()):
      yield sharding.to_global(batch, c.mesh)

  importances = {}
  if "fisher" in c.strategy.needs_importance:
    importances["fisher"] = fisher_diagonal(c.loss_fn, state.params, batches(), has_aux=True,
                                            max_batches=max_batches)
  if "mas" in c.strategy.needs_importance:
    importances["mas"] = mas_importance(
        lambda p, b: c.model.apply(p, b["image"], b["tokens"], method=c.model.embed_unnormalized), state.params,
        batches(), max_batches=max_batches)
  return regularizer_states(c.strategy.consolidate(state.opt_state, state.params, importances))


def _replay_memory(c: Components, t: int, params, carried: CarriedState,
                   config: ml_collections.ConfigDict) -> replay.ReplayMemory:
  """The replay memory of tasks ``0..t``: the carried one plus the rows selected from task ``t``."""
  train_t = c.stream.tasks[t].splits["train"]
  selection = config.continual.replay.selection
  embeddings = c.embedders.images(params, train_t.images) if selection == "herding" else None
  rows = replay.select_rows(selection, len(train_t), config.continual.replay.memory_per_task,
                            seed=config.seed, task=t, image_embeddings=embeddings)
  return carried.memory.add_task(t, rows)


def close_task(c: Components, t: int, state: train.TrainState, carried: CarriedState, workdir: str,
               config: ml_collections.ConfigDict) -> CarriedState:
  """Consolidates, selects replay rows, writes the snapshot ``S_t``, clears progress; returns the new carried state.

  The continual state is written before the snapshot, so an existing
  snapshot implies it is on disk.
  """
  regularizers, memory = [], carried.memory
  if c.strategy.regularizer_components:
    regularizers = _consolidated_regularizers(c, t, state, config)
    checkpoint.save_regularizers(workdir, t, regularizers)
  if c.strategy.uses_replay:
    memory = _replay_memory(c, t, state.params, carried, config)
    if jax.process_index() == 0:
      memory.save(layout.replay_path(workdir, t))
  checkpoint.save_snapshot(workdir, t, state.params)
  if jax.process_index() == 0:
    checkpoint.clear_progress(workdir, t)
  return CarriedState(state.params, regularizers, memory)


def advance(c: Components, t: int, carried: CarriedState, workdir: str,
            config: ml_collections.ConfigDict) -> CarriedState:
  """Task ``t`` trained and closed, or its snapshot (and continual state) read when it was trained before."""
  if t in checkpoint.completed_snapshots(workdir):
    logging.info("task %d: snapshot found, evaluating it", t)
    return load_carried(c, workdir, t)
  state = train_task(c, t, carried, workdir, config)
  return close_task(c, t, state, carried, workdir, config)


def zero_shot_row(c: Components, workdir: str, config: ml_collections.ConfigDict) -> dict:
  """``eval/zero_shot.json``: the starting encoders on every task (computed once, then read)."""
  path = layout.zero_shot_path(workdir)
  if manifest.is_sealed(path):
    return manifest.read_json(path)
  splits = [task.splits[config.eval.split] for task in c.stream.tasks]
  row = evaluate.evaluate_zero_shot(c.initial_params, splits, c.tokenizer, c.embedders, config)
  if jax.process_index() == 0:
    manifest.write_json(path, row)
  return row


def drift_map_fit_data(c: Components, t: int, workdir: str, config: ml_collections.ConfigDict) -> Examples:
  """The drift maps' fit data after task ``t``: task ``t``'s training draw and the replay memory kept before it.

  The memory is read from the workdir (``continual/task_{t-1}/replay.npz``), so a resumed or re-evaluated
  run fits on the same rows.
  """
  memory = None
  if c.strategy.uses_replay and t > 0 and manifest.is_sealed(layout.replay_path(workdir, t - 1)):
    memory = replay.ReplayMemory.load(layout.replay_path(workdir, t - 1)).examples(c.stream)
  fit_images, _ = evaluate.drift_map_settings(config)
  return drift_maps.fit_examples(c.stream.tasks[t].splits["train"], t, memory, fit_images, config.seed)


def evaluate_and_record(c: Components, t: int, params, workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Evaluates ``S_t`` on every seen task and writes ``eval/after_task_TT.json`` and its TensorBoard scalars."""
  splits = [task.splits[config.eval.split] for task in c.stream.tasks]
  evaluation = evaluate.evaluate_after_task(
      t, params, splits, c.tokenizer, c.embedders, workdir, config, fit_data=drift_map_fit_data(c, t, workdir, config),
      restore=lambda k: checkpoint.restore_snapshot(workdir, k, c.abstract_params))
  if jax.process_index() == 0:
    manifest.write_json(layout.evaluation_path(workdir, t), evaluation)
    for scope in metrics.SCOPES:
      for policy, per_task in evaluation[scope].items():
        for k, values in per_task.items():
          c.tensorboard.scalars(t, values, f"eval_{scope}_{policy}/task_{int(k):02d}")
    c.tensorboard.sync()
  return evaluation


def draw_plots(results: dict, workdir: str, first_split: Examples) -> list[str]:
  """The run's figures under ``plots/``: recall matrices, task curves, price of re-indexing, analysis, examples."""
  plots = report.plot_results(results, workdir)
  plots.append(analysis.plot_analysis(results["analysis"], os.path.join(layout.plots_dir(workdir), "analysis.png")))
  rows = {int(image_id): row for row, image_id in enumerate(first_split.image_ids)}
  plots.append(search_figures.plot_examples(results["examples"], lambda image_id: first_split.images[rows[image_id]],
                                            search_figures.examples_path(workdir)))
  return plots


def write_outputs(evaluations: list[dict], zero_shot: dict, run_info: dict, workdir: str,
                  config: ml_collections.ConfigDict, first_split: Examples) -> dict:
  """``results.json`` (matrices, summaries, analysis, examples), ``report.md`` and the plots (unless
  ``$CCMR_JAX_PLOTS=0``: :func:`ccmr_jax.report.plots_enabled`); prints the summary.

  ``first_split`` is task 0's evaluation split: the pixels of the examples' images.
  """
  results = report.build_results(evaluations, metrics.metric_names(config.eval.ks), run_info, zero_shot)
  results["analysis"] = analysis.analyze_workdir(workdir, results["tasks_trained"])
  results["analysis_summary"] = analysis.summarize_analysis(results["analysis"])
  results["examples"] = search_figures.report_examples(workdir, results["tasks_trained"])
  manifest.write_json(layout.results_path(workdir), results)
  plots = draw_plots(results, workdir, first_split) if report.plots_enabled() else []
  report_path = report.write_report(results, workdir, plots)
  print("\n" + report.summary_table(results) + "\n")
  print("wrote:\n  " + "\n  ".join([layout.results_path(workdir), report_path, *plots,
                                    layout.tensorboard_dir(workdir)]))
  return results


def _run(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool, repair: bool) -> dict:
  start_time = time.perf_counter()
  check_config(config)
  plan = plan_repairs(workdir, config, repair)
  prepare_workdir(workdir, config, allow_config_change)
  apply_repairs(workdir, plan)
  c = build_components(config, workdir)
  zero_shot = zero_shot_row(c, workdir, config)
  host_memory.release_free_memory()
  first = layout.first_unfinished_task(workdir, len(c.stream))
  if first > 0:
    logging.info("resuming: tasks 0..%d already evaluated", first - 1)
  evaluations = [manifest.read_json(layout.evaluation_path(workdir, t)) for t in range(first)]
  carried = load_carried(c, workdir, first - 1)
  timings = []
  for t in range(first, len(c.stream)):
    task_start = time.perf_counter()
    carried = advance(c, t, carried, workdir, config)
    host_memory.release_free_memory()  # what training (and compiling) freed
    train_seconds = time.perf_counter() - task_start
    evaluations.append(evaluate_and_record(c, t, carried.params, workdir, config))
    host_memory.release_free_memory()
    timings.append({"task": t, "train_s": round(train_seconds, 2),
                    "eval_s": round(time.perf_counter() - task_start - train_seconds, 2)})
    logging.info("task %d done: mean R@1 on it %.2f (%.0fs train, %.0fs eval)", t,
                 evaluations[-1]["task_aware"]["reindex"].get(str(t), {}).get(metrics.HEADLINE, float("nan")),
                 timings[-1]["train_s"], timings[-1]["eval_s"])
  c.tensorboard.close()
  run_info = {"config": layout.config_json(config), "tasks": c.task_info, "machine": report.machine_info(),
              "devices": jax.device_count(), "processes": jax.process_count(), "timings": timings,
              "wall_s_this_invocation": round(time.perf_counter() - start_time, 2)}
  if jax.process_index() != 0:  # only process 0 queries the indexes: the others hold no metrics
    return {**run_info, "tasks_trained": len(evaluations)}
  return write_outputs(evaluations, zero_shot, run_info, workdir, config, c.stream.tasks[0].splits[config.eval.split])


def run(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False,
        repair: bool = False) -> dict:
  """Runs (or resumes) the whole continual experiment; returns the results document.

  Args:
    config: the experiment config.
    workdir: local folder or ``gs://`` prefix; a rerun with the same config
      resumes from what it holds (finished evaluations, snapshots, the last
      progress checkpoint of the task in training). Process 0 holds the
      workdir's lock while it runs.
    allow_config_change: resume a workdir made with another config (the
      differences are logged and the workdir's config.json replaced).
    repair: retrain the tasks whose trained artifacts (snapshot, regularizer
      state, replay memory, progress checkpoint) are damaged, instead of
      stopping (see :mod:`ccmr_jax.integrity`); damaged computed artifacts
      are recomputed either way.

  Raises:
    UserError: bad config or data, a workdir that cannot be used or is in use,
      a diverged loss, a full disk: a one-line cause and its fix.
  """
  try:
    with layout.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
      return _run(config, workdir, allow_config_change, repair)
  except FloatingPointError as e:
    raise UserError(f"{e}; the checkpoints before it are kept in {workdir}/progress and {workdir}/snapshots. "
                    "Lower train.learning_rate (or check the data) and rerun with --allow_config_change "
                    "to resume from them") from e
  except files.CorruptFileError as e:
    raise UserError(str(e)) from e
  except OSError as e:
    if e.errno in layout.DISK_FULL:
      raise UserError(f"no space left on the device while writing {e.filename or 'to the workdir'}; free space "
                      "(or use a --workdir on a larger disk) and rerun the same command: finished tasks and the "
                      "last checkpoint are kept, half-written files are not") from e
    raise
