"""Training: the train state, the jitted data-parallel step, fitting one task.

The optimizer is ``optax.chain(*regularizers, clip, adamw)``: the continual
regularizers of the strategy (optax transforms, see :mod:`ccmr_jax.continual`)
come first, so they see and change the raw loss gradient. A fresh optimizer
state is made at the start of every task (Adam's moments belong to the task
that produced them); what must cross task boundaries lives in the params and
in the regularizer state handed over by the strategy.
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

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


# Training steps dispatched and not yet finished before fit waits: enough to keep a device busy while
# the host prepares the next batch, few enough that queued batches do not pile up in host memory.
MAX_STEPS_IN_FLIGHT = 2

TRAINABLE_PRESETS = {
    "all": ("*",),
    "projections": ("image_projection/*", "text_projection/*", "log_scale"),
    "text_side": ("text_tower/*", "text_projection/*", "log_scale"),  # the image side frozen
    "image_side": ("image_tower/*", "image_projection/*", "log_scale"),  # the text side frozen
}


def trainable_patterns(trainable: str) -> tuple[str, ...]:
  """``train.trainable`` as glob patterns over parameter paths (``text_tower/Embed_0/embedding``).

  Args:
    trainable: a preset of :data:`TRAINABLE_PRESETS`, or comma-separated
      ``fnmatch`` patterns (``*`` crosses ``/``) matched against the path of
      each parameter inside the ``params`` collection, e.g.
      ``"text_tower/*,text_projection/*"``.

  Raises:
    ValueError: not a string, or an empty pattern.
  """
  if not isinstance(trainable, str):
    raise ValueError(f"train.trainable must be a string, got {trainable!r}")
  if trainable in TRAINABLE_PRESETS:
    return TRAINABLE_PRESETS[trainable]
  patterns = tuple(p.strip() for p in trainable.split(","))
  if not all(patterns):
    raise ValueError(f"train.trainable {trainable!r} has an empty pattern; give a preset of "
                     f"{list(TRAINABLE_PRESETS)} or comma-separated path patterns such as 'text_tower/*,log_scale'")
  return patterns


def _param_path(path) -> str:
  keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  return "/".join(keys[1:] if keys and keys[0] == "params" else keys)


def trainable_mask(params, patterns: Sequence[str]):
  """A pytree of bools like ``params``: True where a parameter's path matches one of ``patterns``.

  Raises:
    ValueError: a pattern matches no parameter (a typo would freeze what it meant to train).
  """
  names = [_param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
  if unmatched:
    tops = sorted({name.split("/")[0] for name in names})
    raise ValueError(f"train.trainable: {unmatched} match no parameter; paths start with {tops} "
                     "(e.g. 'text_tower/*'), or use a preset of " + str(list(TRAINABLE_PRESETS)))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(fnmatch.fnmatchcase(_param_path(path), p) for p in patterns), params)


def make_optimizer(train_config: ml_collections.ConfigDict,
                   regularizers: Iterable[optax.GradientTransformation] = ()) -> optax.GradientTransformation:
  """``chain(*regularizers, clip_by_global_norm, adamw)`` over the parameters ``train.trainable`` names.

  AdamW's learning rate is an injected hyperparameter (see
  :func:`set_learning_rate`), so one compiled step serves tasks of any length.
  Unless every parameter trains, the chain runs inside ``optax.masked`` over
  the trainable ones (the others hold no optimizer or regularizer state, and
  the gradient norm is theirs alone) and the updates of the frozen ones are
  zeroed.
  """
  inner = optax.chain(
      *regularizers,
      optax.clip_by_global_norm(train_config.grad_clip),
      optax.inject_hyperparams(optax.adamw)(learning_rate=train_config.learning_rate,
                                            weight_decay=train_config.weight_decay),
  )
  patterns = trainable_patterns(train_config.get("trainable", "all"))
  if patterns == TRAINABLE_PRESETS["all"]:
    return inner
  trainable = functools.partial(trainable_mask, patterns=patterns)

  def frozen(params):
    return jax.tree.map(lambda t: not t, trainable(params))

  return optax.chain(optax.masked(inner, trainable), optax.masked(optax.set_to_zero(), frozen))


# The state of optax.inject_hyperparams: InjectStatefulHyperparamsState in optax >= 0.2.3, the older name before.
_INJECTED_STATES = tuple(getattr(optax, name) for name in ("InjectStatefulHyperparamsState", "InjectHyperparamsState")
                         if hasattr(optax, name))


def set_learning_rate(opt_state, learning_rate):
  """The state of :func:`make_optimizer` with AdamW's learning rate replaced (wherever it sits in the chain).

  Raises:
    ValueError: the state holds no injected learning rate (a learning rate that silently stays constant).
  """
  found = []

  def replace(node):
    if not isinstance(node, _INJECTED_STATES):
      return node
    found.append(node)
    return node._replace(hyperparams=dict(node.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32)))

  new_state = jax.tree.map(replace, opt_state, is_leaf=lambda node: isinstance(node, _INJECTED_STATES))
  if len(found) != 1:
    raise ValueError(f"expected one optax.inject_hyperparams state holding the learning rate, found {len(found)}")
  return new_state


def make_loss_fn(model, loss_config: ml_collections.ConfigDict,
                 lwf_config: ml_collections.ConfigDict | None = None,
                 bct_config: ml_collections.ConfigDict | None = None) -> Callable:
  """``loss_fn(params, batch, teacher_params=None) -> (loss, aux)``.

  Args:
    model: the dual encoder.
    loss_config: ``config.loss``, the contrastive objective.
    lwf_config: ``config.continual.lwf``, or None: no distillation.
    bct_config: ``config.continual.bct``, or None: no backward-compatible term.

  Returns:
    The loss function. Without ``teacher_params`` (the previous snapshot)
    the loss is the contrastive objective ``L``; with them it is
    ``L + lwf.weight · D + bct.weight · C``, ``D`` the similarity distillation
    from the teacher's embeddings of the same batch
    (:func:`ccmr_jax.continual.distillation.similarity_distillation`) and ``C``
    the cross-model contrastive term (:func:`ccmr_jax.losses.backward_compatible`),
    each only when its config is given. ``aux`` holds ``scale``,
    ``contrastive``, ``distillation`` and ``compatibility`` (0 when absent).
  """

  def loss_fn(params, batch, teacher_params=None):
    image_emb, text_emb, scale = model.apply(params, batch["image"], batch["tokens"])
    negatives = losses.valid_negatives(batch["image_key"], batch["text_key"])
    contrastive = losses.contrastive_loss(loss_config.name, image_emb, text_emb, scale, negatives,
                                          loss_config.margin)
    distill = compatibility = jnp.zeros((), jnp.float32)
    loss = contrastive
    if teacher_params is not None:
      old_image, old_text, _ = model.apply(teacher_params, batch["image"], batch["tokens"])
      if lwf_config is not None:
        distill = distillation.similarity_distillation(image_emb, text_emb, old_image, old_text,
                                                       lwf_config.temperature, tuple(lwf_config.parts))
        loss = loss + lwf_config.weight * distill
      if bct_config is not None:
        compatibility = losses.backward_compatible(image_emb, text_emb, old_image, old_text, scale, negatives)
        loss = loss + bct_config.weight * compatibility
    return loss, {"scale": scale, "contrastive": contrastive, "distillation": distill,
                  "compatibility": compatibility}

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


def init_params(model, seed: int, image_size: int, max_length: int, mesh: Mesh):
  """The model's randomly initialised variables for ``seed``, replicated over ``mesh``."""
  dummy_images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  dummy_tokens = jnp.zeros((1, max_length), jnp.int32)
  return jax.jit(model.init, out_shardings=sharding.replicated(mesh))(jax.random.key(seed), dummy_images,
                                                                      dummy_tokens)


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

  The host waits for the device at log and checkpoint points, and before
  dispatching a step while :data:`MAX_STEPS_IN_FLIGHT` earlier ones are
  unfinished: JAX would otherwise queue dozens of steps ahead (about 32 on
  CPU), each holding its batch on the host (19 MB at batch 128 of 224 px
  images), which the device never needs that early.

  Returns:
    ``(state, last_metrics)``.

  Raises:
    FloatingPointError: the loss or the parameters are NaN or Inf (task and
      step named).
  """
  start = time.perf_counter()
  last_log_time, last_log_step = start, start_step
  metrics: dict = {}
  in_flight: collections.deque = collections.deque()
  step = start_step
  for step, local_batch in enumerate(batches, start=start_step + 1):
    learning_rate = np.float32(schedule(step - 1))
    if len(in_flight) == MAX_STEPS_IN_FLIGHT:
      jax.block_until_ready(in_flight.popleft())
    state, device_metrics = step_fn(state, sharding.to_global(local_batch, mesh), learning_rate, teacher_params)
    in_flight.append(device_metrics["loss"])
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
