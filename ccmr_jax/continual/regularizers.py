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

Each regularizer is described by one :class:`RegularizerSpec`, registered
right below its transform: its state type, how it consolidates, its penalty,
the importance it needs, and how to build it from a config section. The walk
over optimizer states (:func:`map_regularizer_states`) and the strategies of
the experiment read everything from the specs (:func:`regularizer_specs`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping, NamedTuple

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
    "online_ewc",
    "mas",
    "si",
    "consolidate",
    "penalty",
    "regularizer_states",
    "transfer_regularizer_states",
    "map_regularizer_states",
    "RegularizerSpec",
    "regularizer_specs",
    "IMPORTANCES",
]

PyTree = Any
_MaskedNode = optax.MaskedNode

# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, _MaskedNode)


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


def _check_decay(decay: Any) -> None:
  _check_concrete("ewc decay", decay, lambda v: 0.0 < v <= 1.0, "must satisfy 0 < decay <= 1")


def _scalar(x: Any) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def _mirror(hyperparameters: Mapping[str, Any]) -> dict:
  """The hyperparameters as the float32 scalars mirrored into a state."""
  return {name: _scalar(value) for name, value in hyperparameters.items()}


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


# What each importance is, and where it comes from (``importance.py``).
_IMPORTANCE_SOURCES = {
    "fisher": ("the new task's diagonal Fisher", "fisher_diagonal()"),
    "mas": ("the new task's Omega", "mas_importance()"),
}
IMPORTANCES = tuple(_IMPORTANCE_SOURCES)


def _require_importance(importance: Any, name: str, kind: str) -> None:
  if importance is None:
    what, source = _IMPORTANCE_SOURCES[kind]
    raise ValueError(f"{name}: consolidate() needs `importance` ({what}, a pytree like params), "
                     f"e.g. from {source}.")


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


def _pull(strength: jax.Array, weights: PyTree | None, params: PyTree, anchor: PyTree) -> PyTree:
  """``strength * w * (theta - theta*)``, the gradient of ``strength/2 * sum w (theta - theta*)^2``.

    ``weights=None`` stands for ``w = 1`` (no tree of ones is built).
    """
  if weights is None:
    return jax.tree.map(lambda p, a: strength * (_wide(p) - _wide(a)), params, anchor)
  return jax.tree.map(lambda p, w, a: strength * _wide(w) * (_wide(p) - _wide(a)), params, weights, anchor)


def _quadratic(weights: PyTree | None, params: PyTree, anchor: PyTree) -> jax.Array:
  """``sum_i w_i (theta_i - theta*_i)^2`` (``weights=None``: ``w = 1``)."""
  if weights is None:
    sq = jax.tree.map(lambda p, a: jnp.square(_wide(p) - _wide(a)), params, anchor)
  else:
    sq = jax.tree.map(lambda p, w, a: _wide(w) * jnp.square(_wide(p) - _wide(a)), params, weights, anchor)
  return _tree_sum(sq)


# --------------------------------------------------------------------------
# One record per regularizer
# --------------------------------------------------------------------------

# A hyperparameter a regularizer reads from its config section: (field, test of
# a value, the requirement in words, for the error message).
Hyperparameter = tuple[str, Callable[[float], bool], str]


def _positive(field: str) -> Hyperparameter:
  return (field, lambda v: v > 0, "a positive number")


@dataclasses.dataclass(frozen=True)
class RegularizerSpec:
  """Everything the code outside a regularizer's transform needs to know about it.

    Attributes:
      name: its strategy component and its ``config.continual`` section (``"online_ewc"``).
      transform: the function that builds it (``"online_ewc"``), for messages.
      state_type: the NamedTuple of its state; a state is recognised by its exact type.
      template_field: a field of the state shaped like the (masked) parameters.
      consolidate: ``(state, params, importance) -> state`` at a task boundary;
        ``params``/``importance`` are full trees.
      penalty: ``(state, params) -> scalar`` with ``params`` already restricted
        to the state's (masked) structure.
      importance: the importance :func:`consolidate` must receive, one of
        :data:`IMPORTANCES`, or None when it needs none.
      build: ``section -> transform``, from the mapping of its hyperparameters.
      chain_position: rank in the chain when several regularizers are combined.
      hyperparameters: ``(field, ok, requirement)`` of each field ``build`` reads.
    """

  name: str
  transform: str
  state_type: type
  template_field: str
  consolidate: Callable[[Any, PyTree, PyTree], Any]
  penalty: Callable[[Any, PyTree], jax.Array]
  importance: str | None
  build: Callable[[Mapping[str, Any]], optax.GradientTransformationExtraArgs]
  chain_position: int
  hyperparameters: tuple[Hyperparameter, ...] = ()

  def __post_init__(self):
    if self.importance is not None and self.importance not in IMPORTANCES:
      raise ValueError(f"{self.name}: importance must be None or one of {IMPORTANCES}, got {self.importance!r}")
    if self.template_field not in self.state_type._fields:
      raise ValueError(f"{self.name}: {self.state_type.__name__} has no field {self.template_field!r}")


_SPECS: dict[type, RegularizerSpec] = {}


def _register(spec: RegularizerSpec) -> RegularizerSpec:
  clash = [s for s in _SPECS.values() if s.name == spec.name or s.chain_position == spec.chain_position]
  if spec.state_type in _SPECS or clash:
    raise ValueError(f"regularizer {spec.name!r}: its state type, name or chain position is taken")
  _SPECS[spec.state_type] = spec
  return spec


def regularizer_specs() -> tuple[RegularizerSpec, ...]:
  """The specs of all regularizers, in chain order."""
  return tuple(sorted(_SPECS.values(), key=lambda spec: spec.chain_position))


@dataclasses.dataclass(frozen=True)
class _WeightedAnchor:
  """The math of ``l2_anchor``, ``online_ewc`` and ``mas``, which differ only in ``w``::

        P(theta) = strength / 2 * sum_i w_i (theta_i - theta*_i)^2,
        grad P   = strength * w * (theta - theta*),

    ``theta*`` the parameters at the last consolidation, ``P = 0`` before the
    first one. The state has the fields ``num_tasks``, ``strength``,
    ``anchor``, the weights field and any other mirrored hyperparameter.

    Attributes:
      transform: the public function's name, for messages.
      state_type: the state NamedTuple.
      weights: the state field holding ``w``; None for ``w = 1``.
      importance: the importance consolidation adds to ``w`` (None when ``weights`` is).
      accumulate: ``(state, w_old, w_new) -> w``, on float32-or-wider leaves.
    """

  transform: str
  state_type: type
  weights: str | None = None
  importance: str | None = None
  accumulate: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None

  def _weights_of(self, state) -> PyTree | None:
    return None if self.weights is None else getattr(state, self.weights)

  def build(self, **hyperparameters) -> optax.GradientTransformationExtraArgs:
    """The transform whose state mirrors ``hyperparameters`` (``strength`` and others)."""

    def init_fn(params):
      weights = {} if self.weights is None else {self.weights: jax.tree.map(jnp.zeros_like, params)}
      return self.state_type(num_tasks=jnp.zeros((), jnp.int32), anchor=_tree_copy(params), **weights,
                             **_mirror(hyperparameters))

    def update_fn(updates, state, params=None, **extra_args):
      del extra_args
      _require_params(params, self.transform)
      state = state._replace(**_mirror(hyperparameters))
      reg = _pull(state.strength, self._weights_of(state), params, state.anchor)
      return _add_grad(updates, reg, state.num_tasks > 0), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def penalty(self, state, params: PyTree) -> jax.Array:
    val = 0.5 * state.strength * _quadratic(self._weights_of(state), params, state.anchor)
    return jnp.where(state.num_tasks > 0, val, 0.0)

  def consolidate(self, state, params: PyTree, importance: PyTree):
    """``theta* <- params`` and ``w <- accumulate(w, importance)``; one more task."""
    if self.weights is not None:
      _require_importance(importance, self.transform, self.importance)
    new = {"num_tasks": state.num_tasks + 1, "anchor": _like_state(state.anchor, params, "params", self.transform)}
    if self.weights is not None:
      old = getattr(state, self.weights)
      added = _like_state(old, importance, "importance", self.transform)
      new[self.weights] = jax.tree.map(lambda w, a: self.accumulate(state, _wide(w), _wide(a)).astype(w.dtype),
                                       old, added)
    return state._replace(**new)

  def spec(self, name: str, build, chain_position: int, hyperparameters) -> RegularizerSpec:
    return RegularizerSpec(name=name, transform=self.transform, state_type=self.state_type,
                           template_field="anchor", consolidate=self.consolidate, penalty=self.penalty,
                           importance=self.importance, build=build, chain_position=chain_position,
                           hyperparameters=hyperparameters)


# --------------------------------------------------------------------------
# Synaptic Intelligence
# --------------------------------------------------------------------------


class SIState(NamedTuple):
  """State of :func:`si` (Synaptic Intelligence).

    Attributes:
      num_tasks: int32 scalar, number of consolidations so far (0 = inactive).
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
    reg = _pull(2.0 * s, state.importance, params, state.anchor)
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
  val = state.strength * _quadratic(state.importance, params, state.anchor)
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


_register(RegularizerSpec(
    name="si", transform="si", state_type=SIState, template_field="anchor", consolidate=_si_consolidate,
    penalty=_si_penalty, importance=None, build=lambda c: si(c["strength"], damping=c["damping"]),
    # First in the chain: its path integral needs the raw loss gradient.
    chain_position=0, hyperparameters=(_positive("strength"), _positive("damping"))))

# --------------------------------------------------------------------------
# L2 anchor
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


_L2 = _WeightedAnchor("l2_anchor", L2AnchorState)


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
  return _L2.build(strength=strength)


_register(_L2.spec("l2", lambda c: l2_anchor(c["strength"]), chain_position=1,
                   hyperparameters=(_positive("strength"),)))

# --------------------------------------------------------------------------
# EWC
# --------------------------------------------------------------------------


class EWCState(NamedTuple):
  """State of :func:`ewc` (one quadratic per past task).

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


def ewc(strength: float, mode: str = "separate", decay: float = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""Elastic Weight Consolidation with a diagonal Fisher (Kirkpatrick et al. 2017).

    One penalty per past task::

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

    ``P = 0`` before the first consolidation. The transform adds ``grad P`` to
    the updates.

    Args:
      strength: non-negative penalty strength (``lambda``).
      mode: ``'separate'`` (the above) or ``'online'``, which returns
        ``online_ewc(strength, decay)`` (see :func:`online_ewc`).
      decay: the Fisher decay of ``mode='online'``, ``0 < decay <= 1``; ignored
        (but still validated) in ``'separate'`` mode.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`EWCState` (:class:`OnlineEWCState` for ``mode='online'``).
      ``update`` requires ``params``; :func:`consolidate` requires
      ``importance`` (e.g. from ``fisher_diagonal``), non-negative, shaped like
      the parameters.

    Example::

        opt = optax.chain(ewc(100.0), optax.adam(1e-3))
        state = opt.init(params)
        ...                                              # train task 1
        fisher = fisher_diagonal(loss_fn, params, task1_batches)
        state = consolidate(state, params, importance=fisher)
    """
  _check_strength(strength)
  if mode not in ("separate", "online"):
    raise ValueError(f"ewc: mode must be 'separate' or 'online', got {mode!r}.")
  _check_decay(decay)
  if mode == "online":
    return online_ewc(strength, decay)

  def init_fn(params):
    return EWCState(
        num_tasks=jnp.zeros((), jnp.int32),
        strength=_scalar(strength),
        fisher_sum=jax.tree.map(jnp.zeros_like, params),
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
  _require_importance(importance, "ewc", "fisher")
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


_register(RegularizerSpec(
    name="ewc", transform="ewc", state_type=EWCState, template_field="fisher_sum", consolidate=_ewc_consolidate,
    penalty=_ewc_penalty, importance="fisher", build=lambda c: ewc(c["strength"]), chain_position=2,
    hyperparameters=(_positive("strength"),)))

# --------------------------------------------------------------------------
# Online EWC
# --------------------------------------------------------------------------


class OnlineEWCState(NamedTuple):
  """State of :func:`online_ewc`.

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


_ONLINE_EWC = _WeightedAnchor("online_ewc", OnlineEWCState, weights="fisher", importance="fisher",
                              accumulate=lambda state, f, f_new: state.decay * f + f_new)


def online_ewc(strength: float, decay: float) -> optax.GradientTransformationExtraArgs:
  r"""Online EWC (Schwarz et al. 2018, "Progress & Compress").

    One running Fisher, anchored at the last task::

        F <- decay * F + F_new,   theta* <- current params
        P(theta) = strength / 2 * sum_i F_i (theta_i - theta*_i)^2

    at each :func:`consolidate` (``F_new`` its ``importance``). ``P = 0``
    before the first consolidation. The transform adds ``grad P = strength *
    F * (theta - theta*)`` to the updates. ``decay = 1`` sums the Fishers of
    all tasks but, unlike :func:`ewc`, pulls towards the last anchor only.

    Args:
      strength: non-negative penalty strength (``lambda``).
      decay: the Fisher decay ``gamma``, ``0 < decay <= 1``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`OnlineEWCState`. ``update`` requires ``params``;
      :func:`consolidate` requires ``importance`` (e.g. from
      ``fisher_diagonal``), non-negative, shaped like the parameters.

    Example::

        opt = optax.chain(online_ewc(100.0, decay=0.9), optax.adam(1e-3))
        state = opt.init(params)
        ...                                              # train task 1
        fisher = fisher_diagonal(loss_fn, params, task1_batches)
        state = consolidate(state, params, importance=fisher)
    """
  _check_strength(strength)
  _check_decay(decay)
  return _ONLINE_EWC.build(strength=strength, decay=decay)


_register(_ONLINE_EWC.spec("online_ewc", lambda c: online_ewc(c["strength"], c["decay"]), chain_position=3,
                           hyperparameters=(_positive("strength"), ("decay", lambda v: 0 < v <= 1, "in (0, 1]"))))

# --------------------------------------------------------------------------
# MAS
# --------------------------------------------------------------------------


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


_MAS = _WeightedAnchor("mas", MASState, weights="importance", importance="mas",
                       accumulate=lambda state, omega, omega_new: omega + omega_new)


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
  return _MAS.build(strength=strength)


_register(_MAS.spec("mas", lambda c: mas(c["strength"]), chain_position=4, hyperparameters=(_positive("strength"),)))

# --------------------------------------------------------------------------
# Walking an optimizer state
# --------------------------------------------------------------------------


def _is_reg_state(x: Any) -> bool:
  return type(x) in _SPECS


def map_regularizer_states(fn: Callable[[RegularizerSpec, Any], Any], opt_state: PyTree) -> tuple[PyTree, int]:
  """Replaces every regularizer state of ``opt_state`` by ``fn(spec, state)``, in tree order.

    The one walk behind :func:`consolidate`, :func:`regularizer_states`,
    :func:`penalty` and :func:`transfer_regularizer_states`. ``opt_state`` is
    any pytree (nested ``optax.chain``, ``optax.masked``, ... states, or a
    single regularizer state); its other parts are returned as they are.

    Returns:
      The new tree and the number of regularizer states found.
    """
  found = 0

  def visit(node):
    nonlocal found
    if not _is_reg_state(node):
      return node
    found += 1
    return fn(_SPECS[type(node)], node)

  return jax.tree.map(visit, opt_state, is_leaf=_is_reg_state), found


@jax.jit
def _consolidate_one(state, params, importance):
  # Jitted so that eager calls compile once instead of dispatching op by op.
  return _SPECS[type(state)].consolidate(state, params, importance)


@jax.jit
def _penalty_one(state, params):
  spec = _SPECS[type(state)]
  p = _like_state(getattr(state, spec.template_field), params, "params", spec.transform)
  return spec.penalty(state, p).astype(jnp.float32)


def regularizer_states(opt_state: PyTree) -> list:
  """Returns the regularizer states found in ``opt_state``, in tree order.

    Useful for logging, e.g. ``[s.num_tasks for s in regularizer_states(st)]``.
    """
  found = []

  def keep(spec, state):
    del spec
    found.append(state)
    return state

  map_regularizer_states(keep, opt_state)
  return found


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
    :func:`l2_anchor`, :func:`ewc`, :func:`online_ewc`, :func:`mas` or
    :func:`si` by its consolidated version; every other part of the state is
    returned unchanged:

    - ``l2_anchor``: ``theta* <- params``.
    - ``ewc``: ``sum F <- sum F + importance``,
      ``sum F theta* <- sum F theta* + importance * params``.
    - ``online_ewc``: ``F <- decay * F + importance``, ``theta* <- params``.
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
        ``ewc``/``online_ewc``, ``Omega_new`` for ``mas``), non-negative.
        Required if the state contains one of them; ignored by ``l2_anchor``
        and ``si``. If several importance-based regularizers are present, all
        receive the same ``importance``.
      missing_ok: if False (default) raise when ``opt_state`` contains no
        regularizer state (usually a wiring mistake); if True return
        ``opt_state`` unchanged in that case.

    Returns:
      The new optimizer state, with the same tree structure and dtypes.

    Raises:
      ValueError: if ``importance`` is missing for ``ewc``/``online_ewc``/``mas``,
        if ``params``/``importance`` do not match the parameter structure, or if
        no regularizer state is found and ``missing_ok`` is False.

    Example::

        opt = optax.chain(ewc(10.0), optax.adam(1e-3))
        opt_state = opt.init(params)
        ...
        opt_state = consolidate(opt_state, params, importance=fisher)
    """
  new_state, found = map_regularizer_states(lambda spec, state: _consolidate_one(state, params, importance),
                                            opt_state)
  if not found and not missing_ok:
    kinds = "/".join(spec.transform for spec in regularizer_specs())
    raise ValueError(f"consolidate: no regularizer state ({kinds}) found in opt_state. Build "
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
  pending = iter(enumerate(sources, start=1))

  def take(spec, node):
    index, new = next(pending, (len(sources) + 1, None))
    if (new is None or type(new) is not type(node) or jax.tree.structure(new) != jax.tree.structure(node)):
      raise ValueError("transfer_regularizer_states: regularizer state "
                       f"#{index} ({spec.state_type.__name__}) has no matching state in "
                       f"`source` (source holds {[type(x).__name__ for x in sources]}).")
    return _tree_copy(new)

  out, seen = map_regularizer_states(take, target)
  if seen != len(sources):
    raise ValueError(f"transfer_regularizer_states: `source` has {len(sources)} regularizer "
                     f"states but `target` has {seen}.")
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
