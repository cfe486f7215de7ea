"""Training: the train state, the jitted data-parallel step, fitting one task.

The optimizer is ``optax.chain(*regularizers, clip, adamw)``: the continual
regularizers of the strategy (optax transforms, see :mod:`ccmr_jax.continual`)
come first, so they see and change the raw loss gradient. A fresh optimizer
state is made at the start of every task (Adam's moments belong to the task
that produced them); what must cross task boundaries lives in the params and
in the regularizer state handed over by the strategy.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from ccmr_jax import losses, sharding
from ccmr_jax.continual import distillation


class TrainState(NamedTuple):
  step: jnp.ndarray
  params: Any
  opt_state: Any


def learning_rate_schedule(train_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, cosine decay to ``final_lr_fraction`` of it, over one task."""
  warmup = min(train_config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=train_config.learning_rate * train_config.final_lr_fraction)


def make_optimizer(train_config: ml_collections.ConfigDict,
                   regularizers: Iterable[optax.GradientTransformation] = ()) -> optax.GradientTransformation:
  """``chain(*regularizers, clip_by_global_norm, adamw)``.

  AdamW's learning rate is an injected hyperparameter (see
  :func:`set_learning_rate`), so one compiled step serves tasks of any length.
  """
  return optax.chain(
      *regularizers,
      optax.clip_by_global_norm(train_config.grad_clip),
      optax.inject_hyperparams(optax.adamw)(learning_rate=train_config.learning_rate,
                                            weight_decay=train_config.weight_decay),
  )


def set_learning_rate(opt_state, learning_rate):
  """The state of :func:`make_optimizer` with AdamW's learning rate replaced."""
  adamw_state = opt_state[-1]
  hyperparams = dict(adamw_state.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32))
  return (*opt_state[:-1], adamw_state._replace(hyperparams=hyperparams))


def make_loss_fn(model, loss_config: ml_collections.ConfigDict,
                 lwf_config: ml_collections.ConfigDict | None = None) -> Callable:
  """``loss_fn(params, batch, teacher_params=None) -> (loss, aux)``.

  Args:
    model: the dual encoder.
    loss_config: ``config.loss``, the contrastive objective.
    lwf_config: ``config.continual.lwf``; needed only when the loss is called
      with ``teacher_params``.

  Returns:
    The loss function. Without ``teacher_params`` the loss is the contrastive
    objective; with them it adds ``lwf_config.weight`` times the similarity
    distillation from the teacher's embeddings of the same batch. ``aux``
    holds ``scale``, ``contrastive`` and ``distillation`` (0 without a teacher).
  """

  def loss_fn(params, batch, teacher_params=None):
    image_emb, text_emb, scale = model.apply(params, batch["image"], batch["tokens"])
    negatives = losses.valid_negatives(batch["image_key"], batch["text_key"])
    contrastive = losses.contrastive_loss(loss_config.name, image_emb, text_emb, scale, negatives,
                                          loss_config.margin)
    distill = jnp.zeros((), jnp.float32)
    loss = contrastive
    if teacher_params is not None:
      old_image, old_text, _ = model.apply(teacher_params, batch["image"], batch["tokens"])
      distill = distillation.similarity_distillation(image_emb, text_emb, old_image, old_text,
                                                     lwf_config.temperature, tuple(lwf_config.parts))
      loss = contrastive + lwf_config.weight * distill
    return loss, {"scale": scale, "contrastive": contrastive, "distillation": distill}

  return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh) -> Callable:
  """The jitted step ``(state, batch, learning_rate, teacher_params) -> (state, metrics)``.

  State and ``teacher_params`` (None, or the previous snapshot's params for
  distillation) are replicated, the batch sharded on ``data``; the old
  state's buffers are donated. Metrics stay on device: the caller reads them
  only when it logs.
  """

  def step(state: TrainState, batch, learning_rate, teacher_params):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, teacher_params)
    opt_state = set_learning_rate(state.opt_state, learning_rate)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return TrainState(state.step + 1, params, opt_state), metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, sharding.batch_sharded(mesh), replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def init_state(params, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """A replicated state at step 0; it owns ``params`` (the first step donates them)."""
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  return sharding.replicate(state, mesh)


@jax.jit
def _all_finite(tree) -> jnp.ndarray:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def fit(state: TrainState, step_fn: Callable, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
        schedule: optax.Schedule, total_steps: int, task: int, log_every: int,
        on_log: Callable[[int, dict], None] | None = None, teacher_params=None, start_step: int = 0,
        checkpoint_every: int = 0, on_checkpoint: Callable[[int, TrainState], None] | None = None):
  """Runs ``step_fn`` over ``batches`` with the learning rates of ``schedule``.

  Args:
    state: the state after ``start_step`` steps of this task.
    step_fn: the jitted step of :func:`make_train_step`.
    batches: this process's share of the batches after the first ``start_step``.
    mesh: the device mesh.
    schedule: the task's learning rate by step (0-based).
    total_steps: the task's length, resumed steps included.
    task: the task index, for messages.
    log_every: steps between logs; the loss is checked for NaN/Inf there.
    on_log: called with ``(step, metrics)`` at every log.
    teacher_params: None, or the params distilled from (go to every step).
    start_step: steps already done (a resumed task).
    checkpoint_every: steps between calls of ``on_checkpoint`` (0: never);
      not called at the last step (the task's end is the caller's to save).
    on_checkpoint: called with ``(step, state)`` once that step's loss and
      the new parameters are checked finite: a checkpoint never holds a
      diverged state.

  The host waits for the device only at log and checkpoint points.

  Returns:
    ``(state, last_metrics)``.

  Raises:
    FloatingPointError: the loss or the parameters are NaN or Inf (task and
      step named).
  """
  start = time.perf_counter()
  last_log_time, last_log_step = start, start_step
  metrics: dict = {}
  step = start_step
  for step, local_batch in enumerate(batches, start=start_step + 1):
    learning_rate = np.float32(schedule(step - 1))
    state, device_metrics = step_fn(state, sharding.to_global(local_batch, mesh), learning_rate, teacher_params)
    log_now = step % log_every == 0 or step == total_steps
    checkpoint_now = on_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 \
        and step < total_steps
    if log_now or checkpoint_now:
      metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      metrics["learning_rate"] = float(learning_rate)
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"training diverged: loss={metrics['loss']} at step {step} of task {task}")
    if log_now:
      now = time.perf_counter()
      batch_size = len(local_batch["image"]) * jax.process_count()
      metrics["pairs_per_s"] = (step - last_log_step) * batch_size / (now - last_log_time)
      eta = (total_steps - step) * (now - start) / (step - start_step)
      logging.info("task %d step %d/%d loss %.4f pairs/s %.0f eta %.0fs", task, step, total_steps,
                   metrics["loss"], metrics["pairs_per_s"], eta)
      if on_log is not None:
        on_log(step, metrics)
      last_log_time, last_log_step = now, step
    if checkpoint_now:
      if not bool(_all_finite(state.params)):
        raise FloatingPointError(f"training diverged: non-finite parameters at step {step} of task {task}")
      on_checkpoint(step, state)
  if step != total_steps:
    raise RuntimeError(f"task {task}: expected {total_steps} steps, the data gave {step}")
  return state, metrics
