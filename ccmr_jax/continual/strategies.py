"""Strategies: how training fights forgetting, named in ``config.train.strategy``.

A strategy name is one component or several joined by ``+`` (for example
``ewc+replay``). This module turns the name into the pieces the training
loop uses: which tasks' data a task trains on, which optax regularizer
transforms go in front of the base optimizer, which importance estimates to
compute at a task's end, and whether replay and distillation are on.

  * ``finetune``: train task ``t`` on its own data; nothing against forgetting
    (the lower baseline). Stands alone.
  * ``joint``: train task ``t`` on the union of tasks ``0..t`` (the upper
    bound: nothing is ever out of reach). Stands alone.
  * ``l2``: quadratic pull to the previous task's parameters
    (:func:`~ccmr_jax.continual.regularizers.l2_anchor`).
  * ``ewc``: Elastic Weight Consolidation, one Fisher-weighted quadratic per
    past task (:func:`~ccmr_jax.continual.regularizers.ewc`; importance ``"fisher"``).
  * ``online_ewc``: online EWC, one decayed running Fisher anchored at the
    previous task (:func:`~ccmr_jax.continual.regularizers.online_ewc`;
    importance ``"fisher"``).
  * ``mas``: Memory Aware Synapses (importance ``"mas"``).
  * ``si``: Synaptic Intelligence (importance from its own path integral).
  * ``lwf``: distillation of the previous snapshot's similarity structure
    (:mod:`ccmr_jax.continual.distillation`), a term of the loss.
  * ``replay``: a memory of each past task's pairs mixed into the batches
    (:mod:`ccmr_jax.continual.replay`).
  * ``bct``: backward-compatible training, a cross-model contrastive term
    between the new encoders' queries and the previous snapshot's embeddings
    of the batch's other modality (:func:`ccmr_jax.losses.backward_compatible`),
    so new queries keep working against galleries old encoders embedded.

Regularizers combine: each adds its own penalty to the loss, so the total is
``L + sum_r P_r(theta)`` and the transforms simply chain. ``si`` goes first
in the chain because its path integral needs the raw loss gradient. Everything
about a regularizer (its component name, chain position, importance, how it is
built from its config section and which values that section accepts) comes
from its :class:`~ccmr_jax.continual.regularizers.RegularizerSpec`; no code
here names a regularizer.

Hyperparameters live in ``config.continual``, whose defaults are
:func:`ccmr_jax.defaults.continual_defaults` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import ml_collections
import optax

from ccmr_jax.continual import regularizers as regs
from ccmr_jax.continual.distillation import SIMILARITY_PARTS
from ccmr_jax.continual.replay import SELECTIONS
from ccmr_jax.defaults import continual_defaults

__all__ = ["STRATEGY_COMPONENTS", "STANDALONE_COMPONENTS", "REGULARIZER_COMPONENTS", "IMPORTANCE_ESTIMATORS",
           "Strategy", "check_continual_config", "continual_defaults", "parse_strategy"]

PyTree = Any

# The regularizers, in the order their transforms are chained.
_SPECS = regs.regularizer_specs()
REGULARIZER_COMPONENTS = tuple(spec.name for spec in _SPECS)
STANDALONE_COMPONENTS = ("finetune", "joint")
STRATEGY_COMPONENTS = STANDALONE_COMPONENTS + REGULARIZER_COMPONENTS + ("lwf", "replay", "bct")
IMPORTANCE_ESTIMATORS = regs.IMPORTANCES


def _field(continual: ml_collections.ConfigDict, path: str):
  section, name = path.split(".")
  if section not in continual or name not in continual[section]:
    raise ValueError(f"config.continual.{path} is missing; start from ccmr_jax.defaults.continual_defaults()")
  return continual[section][name]


def _check_number(continual, path: str, ok, requirement: str) -> None:
  value = _field(continual, path)
  is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not (is_number and math.isfinite(value) and ok(value)):
    raise ValueError(f"continual.{path} must be {requirement}, got {value!r}")


def check_continual_config(continual: ml_collections.ConfigDict) -> None:
  """Rejects values of the ``config.continual`` section that cannot work.

  Args:
    continual: the section (see :func:`continual_defaults`).

  Raises:
    ValueError: naming the field (``continual.ewc.strength`` …) and what it must be.
  """
  for spec in _SPECS:
    for field, ok, requirement in spec.hyperparameters:
      _check_number(continual, f"{spec.name}.{field}", ok, requirement)
  for path in ("lwf.weight", "lwf.temperature", *(("bct.weight",) if "bct" in continual else ())):
    _check_number(continual, path, lambda v: v > 0, "a positive number")
  _check_number(continual, "replay.fraction", lambda v: 0 < v < 1, "in (0, 1)")
  for path in ("replay.memory_per_task", "importance.max_batches"):
    value = _field(continual, path)
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
      raise ValueError(f"continual.{path} must be a positive integer, got {value!r}")
  if _field(continual, "replay.selection") not in SELECTIONS:
    raise ValueError(f"unknown continual.replay.selection {continual.replay.selection!r}; "
                     f"choose one of {list(SELECTIONS)}")
  parts = _field(continual, "lwf.parts")
  if (isinstance(parts, str) or not parts or len(set(parts)) != len(parts)
      or any(p not in SIMILARITY_PARTS for p in parts)):
    raise ValueError(f"continual.lwf.parts must be a non-empty selection of {list(SIMILARITY_PARTS)} "
                     f"without repeats, got {parts!r}")


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A parsed ``train.strategy``: its components, in the order they were named."""

  components: tuple[str, ...]

  @property
  def name(self) -> str:
    return "+".join(self.components)

  def training_tasks(self, task: int) -> list[int]:
    """Tasks whose training data task ``task`` trains on."""
    return list(range(task + 1)) if "joint" in self.components else [task]

  @property
  def regularizer_specs(self) -> tuple[regs.RegularizerSpec, ...]:
    """The specs of the strategy's regularizers, in chain order."""
    return tuple(spec for spec in _SPECS if spec.name in self.components)

  @property
  def regularizer_components(self) -> tuple[str, ...]:
    """The regularizer components, in chain order (``si`` first)."""
    return tuple(spec.name for spec in self.regularizer_specs)

  @property
  def needs_importance(self) -> tuple[str, ...]:
    """The importance estimates to compute at a task's end, from :data:`IMPORTANCE_ESTIMATORS`.

    ``"fisher"`` (``importance.fisher_diagonal``) for ``ewc`` / ``online_ewc``;
    ``"mas"`` (``importance.mas_importance``) for ``mas``; empty otherwise.
    """
    wanted = {spec.importance for spec in self.regularizer_specs}
    return tuple(e for e in IMPORTANCE_ESTIMATORS if e in wanted)

  @property
  def uses_replay(self) -> bool:
    return "replay" in self.components

  @property
  def uses_distillation(self) -> bool:
    return "lwf" in self.components

  @property
  def uses_compatibility(self) -> bool:
    """Whether the loss holds the backward-compatible term (``bct``)."""
    return "bct" in self.components

  @property
  def uses_teacher(self) -> bool:
    """Whether training task ``t > 0`` needs the previous snapshot's embeddings of each batch."""
    return self.uses_distillation or self.uses_compatibility

  @property
  def continual_sections(self) -> tuple[str, ...]:
    """The sections of ``config.continual`` this strategy reads (``"importance"`` when it estimates one)."""
    sections = [c for c in self.components if c not in STANDALONE_COMPONENTS]
    if self.needs_importance:
      sections.append("importance")
    return tuple(sections)

  def regularizers(self, config: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
    """The regularizer transforms to put before the base optimizer, in chain order.

    Args:
      config: the experiment config; ``config.continual`` holds the
        hyperparameters (read only when the strategy has a regularizer).

    Returns:
      ``[si, l2_anchor, ewc, online_ewc, mas]``, restricted to the strategy's
      components; empty for ``finetune``, ``joint``, ``lwf``, ``replay``.

    Raises:
      ValueError: ``config.continual`` is missing or holds an invalid value.
    """
    if not self.regularizer_components:
      return []
    if "continual" not in config:
      raise ValueError(f"train.strategy {self.name!r} needs config.continual; "
                       "set config.continual = ccmr_jax.defaults.continual_defaults()")
    continual = config.continual
    check_continual_config(continual)
    return [spec.build(continual[spec.name]) for spec in self.regularizer_specs]

  def consolidate(self, opt_state: PyTree, params: PyTree,
                  importances: Mapping[str, PyTree] | None = None) -> PyTree:
    """Marks a task boundary in every regularizer state, each with its own importance.

    Unlike :func:`regularizers.consolidate`, which hands one importance to
    every regularizer, each state receives the importance its spec names
    (``ewc`` and ``online_ewc``: ``importances["fisher"]``, ``mas``:
    ``importances["mas"]``), so ``ewc+mas`` works. ``l2`` and ``si`` take none.

    Args:
      opt_state: an optimizer state built with :meth:`regularizers`.
      params: the parameters at the end of the task just learned.
      importances: ``{estimator: pytree like params}`` for every estimator of
        :attr:`needs_importance`.

    Returns:
      ``opt_state`` with its regularizer states consolidated (unchanged for a
      strategy without regularizers).

    Raises:
      ValueError: an importance is missing, or ``opt_state`` holds no
        regularizer state although the strategy has some.
    """
    importances = dict(importances or {})
    missing = [e for e in self.needs_importance if e not in importances]
    if missing:
      raise ValueError(f"strategy {self.name!r} needs the importance estimate(s) {missing} to consolidate")
    if not self.regularizer_components:
      return opt_state
    new_state, found = regs.map_regularizer_states(
        lambda spec, state: regs.consolidate(state, params, importance=importances.get(spec.importance)), opt_state)
    if not found:
      raise ValueError(f"strategy {self.name!r}: opt_state holds no regularizer state; build the optimizer "
                       "with strategy.regularizers(config)")
    return new_state


def parse_strategy(name: str) -> Strategy:
  """``"a+b"`` → :class:`Strategy`; unknown or repeated components are errors."""
  components = tuple(part.strip() for part in str(name).split("+"))
  unknown = [c for c in components if c not in STRATEGY_COMPONENTS]
  if unknown or not components:
    raise ValueError(f"unknown train.strategy component(s) {unknown} in {name!r}; "
                     f"choose from {list(STRATEGY_COMPONENTS)}, joined with '+'")
  if len(set(components)) != len(components):
    raise ValueError(f"train.strategy {name!r} names a component twice")
  if len(components) > 1 and any(c in STANDALONE_COMPONENTS for c in components):
    raise ValueError(f"train.strategy {name!r}: 'finetune' and 'joint' stand alone")
  return Strategy(components)
