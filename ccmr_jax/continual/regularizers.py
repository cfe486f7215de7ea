"""Continual-learning regularizers as optax gradient transformations.

This module is self-contained: it depends only on ``jax``, ``optax``, ``numpy``
and the standard library, so it can be copied into any project.

Every regularizer keeps, in its optimizer state, the statistics of the tasks
learned so far (anchors and per-parameter importances) and adds the gradient of
a quadratic penalty to the incoming gradient::

    opt = optax.chain(ewc(strength=100.0), optax.adam(1e-3))

Given a loss gradient ``g`` at parameters ``theta``, ``opt.update(g, state,
theta)`` is exactly ``adam.update(g + grad_penalty(theta), ...)``. The
regularizer must therefore come *before* the base optimizer in the chain (it
works in "gradient units"), and ``update`` must receive ``params``.

Task boundaries are marked by :func:`consolidate`, which finds every regularizer
state inside an arbitrary optimizer state (``optax.chain``, ``optax.masked``,
``optax.named_chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``, ...)
and stores the current parameters as anchor together with the new task's
importance. Before the first consolidation every penalty is exactly zero.
:func:`penalty` evaluates the explicit penalty (for logging/tests) and
:func:`transfer_regularizer_states` moves regularizer states into a freshly
initialised optimizer state.

All state fields are JAX arrays (or pytrees of arrays shaped like the
parameters), so states can be jitted, sharded with ``optax.tree_map_params``
and checkpointed with Orbax. The configuration needed at consolidation time
(strength, EWC decay, SI damping) is mirrored into the state as scalar arrays
and refreshed at every update.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "L2AnchorState",
    "EWCState",
    "OnlineEWCState",
    "MASState",
    "SIState",
    "l2_anchor",
    "ewc",
    "mas",
    "si",
    "consolidate",
    "penalty",
    "regularizer_states",
    "transfer_regularizer_states",
]

PyTree = Any
_MaskedNode = optax.MaskedNode

# --------------------------------------------------------------------------
# State types
# --------------------------------------------------------------------------


class L2AnchorState(NamedTuple):
  """State of :func:`l2_anchor`.

    Attributes:
      num_tasks: int32 scalar, number of consolidations so far (0 = inactive).
      strength: float32 scalar, the penalty strength.
      anchor: parameters at the last consolidation (``theta*``).
    """

  num_tasks: jax.Array
  strength: jax.Array
  anchor: PyTree


class EWCState(NamedTuple):
  """State of :func:`ewc` with ``mode='separate'``.

    Instead of one (Fisher, anchor) pair per past task, only the sufficient
    statistics of the sum of the per-task quadratics are stored.

    Attributes:
      num_tasks: int32 scalar, number of consolidations so far.
      strength: float32 scalar, the penalty strength.
      fisher_sum: ``sum_k F_k`` (pytree like the parameters).
      fisher_anchor_sum: ``sum_k F_k * theta*_k`` (pytree like the parameters).
      residual: float32 scalar, the part of ``sum_k sum_i F_k (theta - theta*_k)^2``
        that does not depend on ``theta`` once the quadratic is written around
        its minimiser (only used to report the penalty value; see :func:`ewc`).
    """

  num_tasks: jax.Array
  strength: jax.Array
  fisher_sum: PyTree
  fisher_anchor_sum: PyTree
  residual: jax.Array


class OnlineEWCState(NamedTuple):
  """State of :func:`ewc` with ``mode='online'``.

    Attributes:
      num_tasks: int32 scalar, number of consolidations so far.
      strength: float32 scalar, the penalty strength.
      decay: float32 scalar, the Fisher decay ``gamma``.
      fisher: the running Fisher ``F`` (pytree like the parameters).
      anchor: parameters at the last consolidation (``theta*``).
    """

  num_tasks: jax.Array
  strength: jax.Array
  decay: jax.Array
  fisher: PyTree
  anchor: PyTree


class MASState(NamedTuple):
  """State of :func:`mas`.

    Attributes:
      num_tasks: int32 scalar, number of consolidations so far.
      strength: float32 scalar, the penalty strength.
      importance: accumulated importance ``Omega`` (pytree like the parameters).
      anchor: parameters at the last consolidation (``theta*``).
    """

  num_tasks: jax.Array
  strength: jax.Array
  importance: PyTree
  anchor: PyTree


class SIState(NamedTuple):
  """State of :func:`si` (Synaptic Intelligence).

    Attributes:
      num_tasks: int32 scalar, number of consolidations so far.
      strength: float32 scalar, the penalty strength ``c``.
      damping: float32 scalar, the damping ``xi``.
      importance: consolidated importance ``Omega`` (pytree like the params).
      anchor: parameters at the last consolidation; before the first one, the
        parameters given to ``init``. It is both the penalty anchor ``theta*``
        and the start point ``theta_start`` of the current task's path.
      path_integral: running ``omega`` of the current task.
      prev_params: parameters seen by the previous ``update`` call.
      prev_grads: loss gradient received by the previous ``update`` call.
      has_prev: bool scalar, whether ``prev_params``/``prev_grads`` hold a step
        whose parameter change has not yet been added to ``path_integral``.
    """

  num_tasks: jax.Array
  strength: jax.Array
  damping: jax.Array
  importance: PyTree
  anchor: PyTree
  path_integral: PyTree
  prev_params: PyTree
  prev_grads: PyTree
  has_prev: jax.Array


_STATE_TYPES = (L2AnchorState, EWCState, OnlineEWCState, MASState, SIState)


def _is_reg_state(x: Any) -> bool:
  return isinstance(x, _STATE_TYPES)


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, _MaskedNode)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _check_concrete(name: str, value: Any, ok: Callable[[float], bool], msg: str) -> None:
  """Validates ``value`` when it is a concrete Python/NumPy number."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got {value!r}.")
  if isinstance(value, numbers.Real):
    v = float(value)
    if not ok(v):
      raise ValueError(f"{name} {msg}, got {value!r}.")


def _check_strength(strength: Any) -> None:
  _check_concrete(
      "strength",
      strength,
      lambda v: v >= 0.0 and v < float("inf"),
      "must be a finite number >= 0",
  )


def _scalar(x: Any) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def _wide(x: jax.Array) -> jax.Array:
  """Casts to at least float32 (keeps float64 when x64 is on)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _tree_copy(tree: PyTree) -> PyTree:
  """Copies the leaves, so state never shares buffers with the caller's params
    (which a train step may donate)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _tree_sum(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  total = jnp.zeros((), jnp.float32)
  for leaf in leaves:
    total = total + jnp.sum(_wide(leaf))
  return total


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0`` and 0 elsewhere (NaN-free gradients)."""
  pos = den > 0
  return jnp.where(pos, num / jnp.where(pos, den, 1), 0)


def _require_params(params: Any, name: str) -> None:
  if params is None:
    raise ValueError(f"{name}: `update` needs the current parameters. Call "
                     "`optimizer.update(grads, opt_state, params)`, not "
                     "`optimizer.update(grads, opt_state)`.")


def _add_grad(updates: PyTree, reg_grad: PyTree, active: jax.Array) -> PyTree:
  """``updates + where(active, reg_grad, 0)``, keeping the updates' dtypes."""
  return jax.tree.map(
      lambda u, r: u + jnp.where(active, r, jnp.zeros_like(r)).astype(u.dtype),
      updates,
      reg_grad,
  )


def _like_state(template: PyTree, tree: PyTree, what: str, reg: str) -> PyTree:
  """Restricts a full pytree ``tree`` to the structure of ``template``.

    ``template`` is a parameter-shaped tree stored in a regularizer state. Inside
    ``optax.masked`` some of its subtrees are ``optax.MaskedNode``; the matching
    subtrees of ``tree`` (full or already masked) are replaced by ``MaskedNode``.
    Every remaining leaf must have the same shape as the template leaf; it is
    cast to the template's dtype.
    """

  def pick(t, x):
    if _is_masked_node(t):
      return t
    x = jnp.asarray(x)
    if x.shape != jnp.shape(t):
      raise ValueError(f"{reg}: a leaf of `{what}` has shape {x.shape} but the "
                       f"regularizer state expects {jnp.shape(t)}.")
    return jnp.array(x, dtype=t.dtype, copy=True)  # never alias the caller's buffers

  try:
    return jax.tree.map(pick, template, tree, is_leaf=_is_masked_node)
  except ValueError as err:
    if str(err).startswith(reg):
      raise
    raise ValueError(f"{reg}: `{what}` does not have the structure of the parameters the "
                     "optimizer was initialised with (pass the full parameter pytree; "
                     f"masking is applied automatically). Original error: {err}") from err


# --------------------------------------------------------------------------
# L2 anchor
# --------------------------------------------------------------------------


def l2_anchor(strength: float) -> optax.GradientTransformationExtraArgs:
  r"""Quadratic pull towards the parameters of the last consolidation.

    Penalty::

        P(theta) = strength / 2 * sum_i (theta_i - theta*_i)^2

    where ``theta*`` are the parameters passed to the most recent
    :func:`consolidate`. ``P = 0`` before the first consolidation. The
    transform adds ``grad P = strength * (theta - theta*)`` to the updates.

    Args:
      strength: non-negative penalty strength.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`L2AnchorState`. ``update`` requires ``params``.

    Example::

        opt = optax.chain(l2_anchor(1.0), optax.sgd(1e-2))
        state = opt.init(params)
        ...                                  # train task 1
        state = consolidate(state, params)   # task boundary
        ...                                  # train task 2, pulled to task-1 params
    """
  _check_strength(strength)

  def init_fn(params):
    return L2AnchorState(
        num_tasks=jnp.zeros((), jnp.int32),
        strength=_scalar(strength),
        anchor=_tree_copy(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "l2_anchor")
    s = _scalar(strength)
    reg = jax.tree.map(lambda p, a: s * (_wide(p) - _wide(a)), params, state.anchor)
    updates = _add_grad(updates, reg, state.num_tasks > 0)
    return updates, state._replace(strength=s)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _l2_penalty(state: L2AnchorState, params: PyTree) -> jax.Array:
  sq = jax.tree.map(lambda p, a: jnp.square(_wide(p) - _wide(a)), params, state.anchor)
  val = 0.5 * state.strength * _tree_sum(sq)
  return jnp.where(state.num_tasks > 0, val, 0.0)


def _l2_consolidate(state: L2AnchorState, params: PyTree, importance: PyTree) -> L2AnchorState:
  del importance
  p = _like_state(state.anchor, params, "params", "l2_anchor")
  return state._replace(num_tasks=state.num_tasks + 1, anchor=p)


# --------------------------------------------------------------------------
# EWC
# --------------------------------------------------------------------------


def ewc(strength: float, mode: str = "separate", decay: float = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""Elastic Weight Consolidation with a diagonal Fisher.

    ``mode='separate'`` (Kirkpatrick et al. 2017, one penalty per past task)::

        P(theta) = strength / 2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2

    where ``F_k`` is the importance passed to the k-th :func:`consolidate` and
    ``theta*_k`` the parameters at that call. The per-task anchors are *not*
    stored. Since ``grad P = strength * sum_k F_k (theta - theta*_k) =
    strength * (A theta - b)`` with ``A = sum_k F_k`` and ``b = sum_k F_k
    theta*_k``, the state keeps only ``A`` and ``b`` (two parameter-sized
    trees, whatever the number of tasks). For the penalty *value* the quadratic
    is rewritten around its minimiser ``m = b / A``::

        P(theta) = strength / 2 * ( sum_i A_i (theta_i - m_i)^2 + R )

    with the scalar ``R = sum_k sum_i F_k,i theta*_k,i^2 - sum_i A_i m_i^2 >= 0``,
    updated at each consolidation with the numerically stable pooled form
    ``R += sum_i A_old F_new / (A_old + F_new) * (m_old - theta*_new)^2``.

    ``mode='online'`` (online EWC, Schwarz et al. 2018, "Progress & Compress")::

        F <- decay * F + F_new,   theta* <- current params
        P(theta) = strength / 2 * sum_i F_i (theta_i - theta*_i)^2

    ``P = 0`` before the first consolidation in both modes. The transform adds
    ``grad P`` to the updates.

    Args:
      strength: non-negative penalty strength (``lambda``).
      mode: ``'separate'`` or ``'online'``.
      decay: Fisher decay ``gamma`` of online EWC, ``0 < decay <= 1``. Ignored
        (but still validated) in ``'separate'`` mode.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`EWCState` (separate) or :class:`OnlineEWCState` (online).
      ``update`` requires ``params``; :func:`consolidate` requires
      ``importance`` (e.g. from ``fisher_diagonal``), non-negative, shaped like
      the parameters.

    Example::

        opt = optax.chain(ewc(100.0, mode="online", decay=0.9), optax.adam(1e-3))
        state = opt.init(params)
        ...                                              # train task 1
        fisher = fisher_diagonal(loss_fn, params, task1_batches)
        state = consolidate(state, params, importance=fisher)
    """
  _check_strength(strength)
  if mode not in ("separate", "online"):
    raise ValueError(f"ewc: mode must be 'separate' or 'online', got {mode!r}.")
  _check_concrete("ewc decay", decay, lambda v: 0.0 < v <= 1.0, "must satisfy 0 < decay <= 1")

  if mode == "separate":

    def init_fn(params):
      zeros = jax.tree.map(jnp.zeros_like, params)
      return EWCState(
          num_tasks=jnp.zeros((), jnp.int32),
          strength=_scalar(strength),
          fisher_sum=zeros,
          fisher_anchor_sum=jax.tree.map(jnp.zeros_like, params),
          residual=jnp.zeros((), jnp.float32),
      )

    def update_fn(updates, state, params=None, **extra_args):
      del extra_args
      _require_params(params, "ewc")
      s = _scalar(strength)
      reg = jax.tree.map(
          lambda p, f, fa: s * (_wide(f) * _wide(p) - _wide(fa)),
          params,
          state.fisher_sum,
          state.fisher_anchor_sum,
      )
      updates = _add_grad(updates, reg, state.num_tasks > 0)
      return updates, state._replace(strength=s)

  else:

    def init_fn(params):
      return OnlineEWCState(
          num_tasks=jnp.zeros((), jnp.int32),
          strength=_scalar(strength),
          decay=_scalar(decay),
          fisher=jax.tree.map(jnp.zeros_like, params),
          anchor=_tree_copy(params),
      )

    def update_fn(updates, state, params=None, **extra_args):
      del extra_args
      _require_params(params, "ewc")
      s = _scalar(strength)
      updates = _add_grad(updates, _weighted_pull(s, state.fisher, params, state.anchor), state.num_tasks > 0)
      return updates, state._replace(strength=s, decay=_scalar(decay))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _ewc_penalty(state: EWCState, params: PyTree) -> jax.Array:

  def term(p, f, fa):
    f, fa = _wide(f), _wide(fa)
    m = _safe_div(fa, f)
    return f * jnp.square(_wide(p) - m)

  sq = jax.tree.map(term, params, state.fisher_sum, state.fisher_anchor_sum)
  val = 0.5 * state.strength * (_tree_sum(sq) + state.residual)
  return jnp.where(state.num_tasks > 0, val, 0.0)


def _ewc_consolidate(state: EWCState, params: PyTree, importance: PyTree) -> EWCState:
  if importance is None:
    raise ValueError("ewc: consolidate() needs `importance` (the new task's diagonal "
                     "Fisher, a pytree like params), e.g. from fisher_diagonal().")
  p = _like_state(state.fisher_sum, params, "params", "ewc")
  f_new = _like_state(state.fisher_sum, importance, "importance", "ewc")

  def pooled(f_old, fa_old, fn, a):
    f_old, fa_old, fn, a = _wide(f_old), _wide(fa_old), _wide(fn), _wide(a)
    m_old = _safe_div(fa_old, f_old)
    return _safe_div(f_old * fn, f_old + fn) * jnp.square(m_old - a)

  extra = _tree_sum(jax.tree.map(pooled, state.fisher_sum, state.fisher_anchor_sum, f_new, p))
  fisher_sum = jax.tree.map(lambda f, fn: (_wide(f) + _wide(fn)).astype(f.dtype), state.fisher_sum, f_new)
  fisher_anchor_sum = jax.tree.map(
      lambda fa, fn, a: (_wide(fa) + _wide(fn) * _wide(a)).astype(fa.dtype),
      state.fisher_anchor_sum,
      f_new,
      p,
  )
  return state._replace(
      num_tasks=state.num_tasks + 1,
      fisher_sum=fisher_sum,
      fisher_anchor_sum=fisher_anchor_sum,
      residual=(state.residual + extra).astype(state.residual.dtype),
  )


def _weighted_pull(strength: jax.Array, weights: PyTree, params: PyTree, anchor: PyTree) -> PyTree:
  """``strength * w * (theta - theta*)``: the gradient of :func:`_weighted_anchor_penalty`."""
  return jax.tree.map(lambda p, w, a: strength * _wide(w) * (_wide(p) - _wide(a)), params, weights, anchor)


def _weighted_anchor_penalty(params: PyTree, weights: PyTree, anchor: PyTree, strength: jax.Array,
                             num_tasks: jax.Array) -> jax.Array:
  """``strength / 2 * sum_i w_i (theta_i - theta*_i)^2``, zero before the first consolidation."""
  sq = jax.tree.map(lambda p, w, a: _wide(w) * jnp.square(_wide(p) - _wide(a)), params, weights, anchor)
  return jnp.where(num_tasks > 0, 0.5 * strength * _tree_sum(sq), 0.0)


def _online_ewc_penalty(state: OnlineEWCState, params: PyTree) -> jax.Array:
  return _weighted_anchor_penalty(params, state.fisher, state.anchor, state.strength, state.num_tasks)


def _online_ewc_consolidate(state: OnlineEWCState, params: PyTree, importance: PyTree) -> OnlineEWCState:
  if importance is None:
    raise ValueError("ewc (online): consolidate() needs `importance` (the new task's "
                     "diagonal Fisher, a pytree like params), e.g. from fisher_diagonal().")
  p = _like_state(state.anchor, params, "params", "ewc")
  f_new = _like_state(state.fisher, importance, "importance", "ewc")
  fisher = jax.tree.map(
      lambda f, fn: (state.decay * _wide(f) + _wide(fn)).astype(f.dtype),
      state.fisher,
      f_new,
  )
  return state._replace(num_tasks=state.num_tasks + 1, fisher=fisher, anchor=p)


# --------------------------------------------------------------------------
# MAS
# --------------------------------------------------------------------------


def mas(strength: float) -> optax.GradientTransformationExtraArgs:
  r"""Memory Aware Synapses (Aljundi et al. 2018).

    Penalty::

        P(theta) = strength / 2 * sum_i Omega_i (theta_i - theta*_i)^2

    ``theta*`` are the parameters at the last :func:`consolidate` and ``Omega``
    is the *running sum* of the per-task importances passed to it,
    ``Omega <- Omega + Omega_new`` (the importances of all past tasks are
    accumulated; a running mean would only rescale ``strength`` by the number
    of tasks). ``P = 0`` before the first consolidation. The transform adds
    ``grad P = strength * Omega * (theta - theta*)`` to the updates.

    Args:
      strength: non-negative penalty strength (``lambda``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`MASState`. ``update`` requires ``params``; :func:`consolidate`
      requires ``importance`` (e.g. from ``mas_importance``).

    Example::

        opt = optax.chain(mas(1.0), optax.adam(1e-3))
        state = opt.init(params)
        ...                                               # train task 1
        omega = mas_importance(embed_fn, params, task1_batches)
        state = consolidate(state, params, importance=omega)
    """
  _check_strength(strength)

  def init_fn(params):
    return MASState(
        num_tasks=jnp.zeros((), jnp.int32),
        strength=_scalar(strength),
        importance=jax.tree.map(jnp.zeros_like, params),
        anchor=_tree_copy(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "mas")
    s = _scalar(strength)
    updates = _add_grad(updates, _weighted_pull(s, state.importance, params, state.anchor), state.num_tasks > 0)
    return updates, state._replace(strength=s)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _mas_penalty(state: MASState, params: PyTree) -> jax.Array:
  return _weighted_anchor_penalty(params, state.importance, state.anchor, state.strength, state.num_tasks)


def _mas_consolidate(state: MASState, params: PyTree, importance: PyTree) -> MASState:
  if importance is None:
    raise ValueError("mas: consolidate() needs `importance` (the new task's Omega, a "
                     "pytree like params), e.g. from mas_importance().")
  p = _like_state(state.anchor, params, "params", "mas")
  o_new = _like_state(state.importance, importance, "importance", "mas")
  omega = jax.tree.map(lambda o, on: (_wide(o) + _wide(on)).astype(o.dtype), state.importance, o_new)
  return state._replace(num_tasks=state.num_tasks + 1, importance=omega, anchor=p)


# --------------------------------------------------------------------------
# Synaptic Intelligence
# --------------------------------------------------------------------------


def si(strength: float, damping: float = 0.1) -> optax.GradientTransformationExtraArgs:
  r"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017).

    Path integral. Let ``theta(t)`` be the parameters passed to the t-th
    ``update`` call of the current task and ``g(t)`` the incoming updates of
    that call (the loss gradient at ``theta(t)``, *before* this transform adds
    its own penalty gradient). The step produced from ``g(t)`` is
    ``delta(t) = theta(t+1) - theta(t)``; it is only observable at the next
    call (or at :func:`consolidate`), because the later transforms of the chain
    run after this one. Hence at call ``t+1`` the state accumulates::

        omega_i += -g_i(t) * (theta_i(t+1) - theta_i(t))

    i.e. gradient ``g(t)`` is paired with the change it produced. The last step
    of a task (``g(T-1)`` with ``theta_end - theta(T-1)``) is added by
    :func:`consolidate`, which must therefore receive the parameters obtained
    after the last update. The first ``update`` after ``init`` or after a
    consolidation only records ``theta`` and ``g``. Note that ``delta`` is the
    total change of the parameters between calls, whatever caused it.

    Consolidation, with ``theta_start`` the parameters at the previous
    consolidation (or at ``init``) and ``theta_end`` the current ones::

        Omega  <- Omega + omega / ((theta_end - theta_start)^2 + damping)
        omega  <- 0;   theta* <- theta_end;   theta_start <- theta_end

    Penalty (as in the SI paper, *without* a factor 1/2)::

        P(theta) = strength * sum_i Omega_i (theta_i - theta*_i)^2

    so the transform adds ``grad P = 2 * strength * Omega * (theta - theta*)``.
    ``P = 0`` before the first consolidation.

    Args:
      strength: non-negative penalty strength (``c`` in the paper).
      damping: ``xi > 0``, keeps the normaliser away from zero.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`SIState`. It must be the first transform of the chain (it needs
      the raw loss gradient), ``update`` requires ``params``, ``init`` must be
      called with the parameters training starts from, and :func:`consolidate`
      ignores ``importance``.

    Example::

        opt = optax.chain(si(1.0, damping=0.1), optax.adam(1e-3))
        state = opt.init(params)
        ...                                   # train task 1 (omega accumulates)
        state = consolidate(state, params)    # nothing else needed at task start
    """
  _check_strength(strength)
  _check_concrete("si damping", damping, lambda v: 0.0 < v < float("inf"), "must be a finite number > 0")

  def init_fn(params):
    return SIState(
        num_tasks=jnp.zeros((), jnp.int32),
        strength=_scalar(strength),
        damping=_scalar(damping),
        importance=jax.tree.map(jnp.zeros_like, params),
        anchor=_tree_copy(params),
        path_integral=jax.tree.map(jnp.zeros_like, params),
        prev_params=_tree_copy(params),
        prev_grads=jax.tree.map(jnp.zeros_like, params),
        has_prev=jnp.zeros((), jnp.bool_),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "si")
    s = _scalar(strength)
    path = _flush_path(state, params)
    prev_params = jax.tree.map(lambda p, old: jnp.asarray(p).astype(old.dtype), params, state.prev_params)
    prev_grads = jax.tree.map(lambda u, old: jnp.asarray(u).astype(old.dtype), updates, state.prev_grads)
    reg = jax.tree.map(
        lambda p, o, a: 2.0 * s * _wide(o) * (_wide(p) - _wide(a)),
        params,
        state.importance,
        state.anchor,
    )
    new_updates = _add_grad(updates, reg, state.num_tasks > 0)
    new_state = state._replace(
        strength=s,
        damping=_scalar(damping),
        path_integral=path,
        prev_params=prev_params,
        prev_grads=prev_grads,
        has_prev=jnp.ones((), jnp.bool_),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _flush_path(state: SIState, params: PyTree) -> PyTree:
  """``omega - g_prev * (params - prev_params)`` if a step is pending."""

  def add(w, g, p, pp):
    contrib = -_wide(g) * (_wide(p) - _wide(pp))
    return (_wide(w) + jnp.where(state.has_prev, contrib, 0.0)).astype(w.dtype)

  return jax.tree.map(add, state.path_integral, state.prev_grads, params, state.prev_params)


def _si_penalty(state: SIState, params: PyTree) -> jax.Array:
  sq = jax.tree.map(
      lambda p, o, a: _wide(o) * jnp.square(_wide(p) - _wide(a)),
      params,
      state.importance,
      state.anchor,
  )
  val = state.strength * _tree_sum(sq)
  return jnp.where(state.num_tasks > 0, val, 0.0)


def _si_consolidate(state: SIState, params: PyTree, importance: PyTree) -> SIState:
  del importance
  p = _like_state(state.anchor, params, "params", "si")
  path = _flush_path(state, p)

  def new_omega(o, w, end, start):
    denom = jnp.square(_wide(end) - _wide(start)) + state.damping
    return (_wide(o) + _wide(w) / denom).astype(o.dtype)

  omega = jax.tree.map(new_omega, state.importance, path, p, state.anchor)
  return state._replace(
      num_tasks=state.num_tasks + 1,
      importance=omega,
      anchor=p,
      path_integral=jax.tree.map(jnp.zeros_like, state.path_integral),
      prev_params=p,
      prev_grads=jax.tree.map(jnp.zeros_like, state.prev_grads),
      has_prev=jnp.zeros((), jnp.bool_),
  )


# --------------------------------------------------------------------------
# Task boundary and penalty over a whole optimizer state
# --------------------------------------------------------------------------

_CONSOLIDATE = {
    L2AnchorState: _l2_consolidate,
    EWCState: _ewc_consolidate,
    OnlineEWCState: _online_ewc_consolidate,
    MASState: _mas_consolidate,
    SIState: _si_consolidate,
}

_PENALTY = {
    L2AnchorState: _l2_penalty,
    EWCState: _ewc_penalty,
    OnlineEWCState: _online_ewc_penalty,
    MASState: _mas_penalty,
    SIState: _si_penalty,
}

_TEMPLATE_FIELD = {
    L2AnchorState: "anchor",
    EWCState: "fisher_sum",
    OnlineEWCState: "anchor",
    MASState: "anchor",
    SIState: "anchor",
}

_NAMES = {
    L2AnchorState: "l2_anchor",
    EWCState: "ewc",
    OnlineEWCState: "ewc",
    MASState: "mas",
    SIState: "si",
}


@jax.jit
def _consolidate_one(state, params, importance):
  # Jitted so that eager calls compile once instead of dispatching op by op.
  return _CONSOLIDATE[type(state)](state, params, importance)


@jax.jit
def _penalty_one(state, params):
  kind = type(state)
  template = getattr(state, _TEMPLATE_FIELD[kind])
  p = _like_state(template, params, "params", _NAMES[kind])
  return _PENALTY[kind](state, p).astype(jnp.float32)


def regularizer_states(opt_state: PyTree) -> list:
  """Returns the regularizer states found in ``opt_state``, in tree order.

    Useful for logging, e.g. ``[s.num_tasks for s in regularizer_states(st)]``.
    """
  leaves = jax.tree.leaves(opt_state, is_leaf=_is_reg_state)
  return [leaf for leaf in leaves if _is_reg_state(leaf)]


def consolidate(
    opt_state: PyTree,
    params: PyTree,
    importance: PyTree | None = None,
    *,
    missing_ok: bool = False,
) -> PyTree:
  r"""Marks a task boundary in every regularizer state of ``opt_state``.

    Walks the whole optimizer state as a pytree (so any nesting of
    ``optax.chain``, ``optax.masked``, ``optax.named_chain``,
    ``optax.multi_transform``, ``optax.inject_hyperparams``,
    ``optax.MultiSteps``, ... works), and replaces each state created by
    :func:`l2_anchor`, :func:`ewc`, :func:`mas` or :func:`si` by its
    consolidated version; every other part of the state is returned unchanged:

    - ``l2_anchor``: ``theta* <- params``.
    - ``ewc`` separate: ``sum F <- sum F + importance``,
      ``sum F theta* <- sum F theta* + importance * params``.
    - ``ewc`` online: ``F <- decay * F + importance``, ``theta* <- params``.
    - ``mas``: ``Omega <- Omega + importance``, ``theta* <- params``.
    - ``si``: adds the pending last step to ``omega``, then
      ``Omega <- Omega + omega / ((params - theta_start)^2 + damping)``,
      resets ``omega`` and sets ``theta* = theta_start = params``.

    and increments ``num_tasks`` (which activates the penalty).

    ``params`` and ``importance`` are *full* pytrees shaped like the parameters
    given to ``opt.init``. For a regularizer inside ``optax.masked`` (whose state
    holds ``optax.MaskedNode`` for masked-out subtrees) the masked-out parts are
    dropped automatically. Values are cast to the dtypes of the state, so a
    jitted train step is not recompiled. The function is pure and can be
    jitted (``missing_ok`` static).

    Args:
      opt_state: an optimizer state containing regularizer states.
      params: parameters at the end of the task just learned.
      importance: the new task's per-parameter importance (diagonal Fisher for
        ``ewc``, ``Omega_new`` for ``mas``), non-negative. Required if the state
        contains an ``ewc`` or ``mas`` regularizer; ignored by ``l2_anchor`` and
        ``si``. If several importance-based regularizers are present, all
        receive the same ``importance``.
      missing_ok: if False (default) raise when ``opt_state`` contains no
        regularizer state (usually a wiring mistake); if True return
        ``opt_state`` unchanged in that case.

    Returns:
      The new optimizer state, with the same tree structure and dtypes.

    Raises:
      ValueError: if ``importance`` is missing for ``ewc``/``mas``, if
        ``params``/``importance`` do not match the parameter structure, or if no
        regularizer state is found and ``missing_ok`` is False.

    Example::

        opt = optax.chain(ewc(10.0), optax.adam(1e-3))
        opt_state = opt.init(params)
        ...
        opt_state = consolidate(opt_state, params, importance=fisher)
    """
  found = []

  def visit(node):
    if not _is_reg_state(node):
      return node
    found.append(type(node).__name__)
    return _consolidate_one(node, params, importance)

  new_state = jax.tree.map(visit, opt_state, is_leaf=_is_reg_state)
  if not found and not missing_ok:
    raise ValueError("consolidate: no l2_anchor/ewc/mas/si state found in opt_state. Build "
                     "the optimizer as e.g. optax.chain(ewc(...), optax.adam(...)), or pass "
                     "missing_ok=True.")
  return new_state


def transfer_regularizer_states(source: PyTree, target: PyTree) -> PyTree:
  """Returns ``target`` with its regularizer states replaced by those of ``source``.

    For training loops that build a *fresh* optimizer state at every task start
    (e.g. to reset Adam's moments) but must keep what the regularizers learned::

        old = consolidate(opt_state, params, importance=fisher)
        opt_state = transfer_regularizer_states(old, opt.init(params))

    States are matched in tree order; both optimizer states must contain the
    same kinds of regularizer, in the same order, over the same parameter
    structure. The transferred arrays are copies (safe with buffer donation).

    Raises:
      ValueError: if the regularizer states of ``source`` and ``target`` differ
        in number, kind or structure.
    """
  sources = regularizer_states(source)
  pending = iter(sources)
  seen = []

  def visit(node):
    if not _is_reg_state(node):
      return node
    seen.append(type(node).__name__)
    new = next(pending, None)
    if (new is None or type(new) is not type(node) or jax.tree.structure(new) != jax.tree.structure(node)):
      raise ValueError("transfer_regularizer_states: regularizer state "
                       f"#{len(seen)} ({type(node).__name__}) has no matching state in "
                       f"`source` (source holds {[type(x).__name__ for x in sources]}).")
    return _tree_copy(new)

  out = jax.tree.map(visit, target, is_leaf=_is_reg_state)
  if len(seen) != len(sources):
    raise ValueError(f"transfer_regularizer_states: `source` has {len(sources)} regularizer "
                     f"states but `target` has {len(seen)}.")
  return out


def penalty(opt_state: PyTree, params: PyTree) -> jax.Array:
  r"""Total explicit penalty of all regularizers in ``opt_state`` at ``params``.

    ``opt_state`` may be a whole optimizer state or a single regularizer state.
    The value is the scalar ``P(theta)`` documented for each regularizer (0
    before its first consolidation, and 0.0 if no regularizer is present), and
    ``jax.grad(lambda p: penalty(opt_state, p))(params)`` equals the gradient the
    transforms add to the updates. ``params`` is the full parameter pytree
    (masked-out parts are dropped for regularizers inside ``optax.masked``).
    Differentiable and jittable; handy for logging.

    Args:
      opt_state: an optimizer state (or a single regularizer state).
      params: the current parameters.

    Returns:
      A float32 scalar.
    """
  total = jnp.zeros((), jnp.float32)
  for state in regularizer_states(opt_state):
    total = total + _penalty_one(state, params)
  return total
