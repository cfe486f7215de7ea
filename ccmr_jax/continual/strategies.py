"""Strategies: how training fights forgetting, named in ``config.train.strategy``.

A strategy name is one component or several joined by ``+`` (for example
``ewc+replay``). This module turns the name into the pieces the training
loop uses: which tasks' data a task trains on, and which optax regularizer
transforms go in front of the base optimizer.

  * ``finetune``: train task ``t`` on its own data; nothing against forgetting
    (the lower baseline).
  * ``joint``: train task ``t`` on the union of tasks ``0..t`` (the upper
    bound: nothing is ever out of reach).
"""

from __future__ import annotations

import dataclasses

STRATEGY_COMPONENTS = ("finetune", "joint")


@dataclasses.dataclass(frozen=True)
class Strategy:
  components: tuple[str, ...]

  @property
  def name(self) -> str:
    return "+".join(self.components)

  def training_tasks(self, task: int) -> list[int]:
    """Tasks whose training data task ``task`` trains on."""
    return list(range(task + 1)) if "joint" in self.components else [task]


def parse_strategy(name: str) -> Strategy:
  """``"a+b"`` → :class:`Strategy`; unknown or repeated components are errors."""
  components = tuple(part.strip() for part in str(name).split("+"))
  unknown = [c for c in components if c not in STRATEGY_COMPONENTS]
  if unknown or not components:
    raise ValueError(f"unknown train.strategy component(s) {unknown} in {name!r}; "
                     f"choose from {list(STRATEGY_COMPONENTS)}, joined with '+'")
  if len(set(components)) != len(components):
    raise ValueError(f"train.strategy {name!r} names a component twice")
  if len(components) > 1 and ("finetune" in components or "joint" in components):
    raise ValueError(f"train.strategy {name!r}: 'finetune' and 'joint' stand alone")
  return Strategy(components)
