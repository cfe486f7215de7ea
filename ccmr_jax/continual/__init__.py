"""Continual-learning regularizers (optax transforms) and importance estimates.

``regularizers`` and ``importance`` depend only on jax/optax/numpy and can be
copied into other projects. Typical use::

    opt = optax.chain(ewc(100.0), optax.adam(1e-3))   # regularizer first
    ...                                               # train a task
    fisher = fisher_diagonal(loss_fn, params, task_batches)
    opt_state = consolidate(opt_state, params, importance=fisher)
"""

from ccmr_jax.continual.importance import fisher_diagonal, mas_importance
from ccmr_jax.continual.regularizers import (
    EWCState,
    L2AnchorState,
    MASState,
    OnlineEWCState,
    SIState,
    consolidate,
    ewc,
    l2_anchor,
    mas,
    penalty,
    regularizer_states,
    si,
    transfer_regularizer_states,
)

__all__ = [
    "EWCState",
    "L2AnchorState",
    "MASState",
    "OnlineEWCState",
    "SIState",
    "consolidate",
    "ewc",
    "fisher_diagonal",
    "l2_anchor",
    "mas",
    "mas_importance",
    "penalty",
    "regularizer_states",
    "si",
    "transfer_regularizer_states",
]
