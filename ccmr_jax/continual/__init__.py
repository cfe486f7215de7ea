"""Continual-learning regularizers (optax transforms) and importance estimates.

``regularizers`` and ``importance`` depend only on jax/optax/numpy and can be
copied into other projects. Typical use::

    opt = optax.chain(ewc(100.0), optax.adam(1e-3))   # regularizer first
    ...                                               # train a task
    fisher = fisher_diagonal(loss_fn, params, task_batches)
    opt_state = consolidate(opt_state, params, importance=fisher)

Adding a regularizer ``foo`` touches two files:

  * ``ccmr_jax/continual/regularizers.py``: ``FooState`` (a NamedTuple),
    ``foo(...)`` returning the optax transform, its consolidation and penalty
    (or a ``_WeightedAnchor`` when the penalty is ``strength/2 * sum w
    (theta - theta*)^2``), and one ``_register(RegularizerSpec(...))`` below
    them: component name, state type, a parameter-shaped field, consolidate,
    penalty, importance (``None``, ``"fisher"`` or ``"mas"``), ``build`` from
    the config section, chain position, and the accepted range of each
    hyperparameter. The walk over optimizer states (``consolidate``,
    ``penalty``, ``regularizer_states``, ``transfer_regularizer_states``) and
    ``strategies.py`` (component names, chain order, importances to
    estimate, config checks, transforms) read everything from the specs, so
    ``train.strategy=foo`` then works.
  * ``ccmr_jax/defaults.py``: the ``foo`` section of ``continual_defaults()``
    and a line of its docstring per field (``tests/test_strategies.py`` fails,
    naming the section or field, when either is missing).

Optional: exporting ``foo`` here (for ``from ccmr_jax.continual import foo``),
the user docs (README.md, docs/strategies.md) and tests. A regularizer that
needs an importance other than ``"fisher"`` or ``"mas"`` also needs its
estimator in ``importance.py``, an entry in ``regularizers._IMPORTANCE_SOURCES``
and its computation in ``experiment._consolidated_regularizers``.
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
    online_ewc,
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
    "online_ewc",
    "penalty",
    "regularizer_states",
    "si",
    "transfer_regularizer_states",
]
