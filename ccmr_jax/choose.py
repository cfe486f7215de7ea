"""Choose each strategy's setting on val: ``python -m ccmr_jax.choose --workdir=SWEEP --out=DIR``.

Tune on ``val``, report on ``test``. ``SWEEP`` is a sweep's folder whose runs
were evaluated on the validation split (``ccmr_jax.sweep --eval_split=val``).
Runs whose folder names differ only in ``_seed=N`` are one *setting*; a
setting belongs to its strategy (``config.train.strategy``). The criterion of
a setting is

  ``c = (1/S) Σ_s (1/|P|) Σ_{p ∈ P} x_s(p)``,

the final average of task-aware mean R@1 ``x_s(p) = (1/T) Σ_k R[T-1][k]``
under each policy ``p`` of ``--policies`` (default ``reindex`` and
``no_reindex``: a strategy must serve both), averaged over the setting's
``S`` seeds. Each strategy's chosen setting has the highest ``c``; a tie
goes to the setting listed first.

Writes ``choose.md`` (every setting, its per-policy finals, ``c``, and the
choice) and ``chosen.json`` (per strategy: the chosen setting's folder
names and the ``config.continual`` values that set it apart from the other
settings of its strategy, as ``--config.continual.SECTION.FIELD`` overrides
for the test runs).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from absl import app, flags
from flax import traverse_util

from ccmr_jax import cli, compare, files, study
from ccmr_jax.metrics import HEADLINE

OUTPUT_NAMES = ("choose.md", "chosen.json")
DEFAULT_POLICIES = ("reindex", "no_reindex")


class ChooseError(cli.UserError):
  """Runs that cannot be chosen from (not on val, missing a policy); the message names the run."""


@dataclasses.dataclass(frozen=True)
class Setting:
  """One strategy setting: its runs (one per seed) and its criterion."""

  name: str
  strategy: str
  runs: tuple[compare.Run, ...]
  finals: dict[str, float]
  criterion: float


def _continual_values(setting: Setting) -> dict:
  """``{"section.field": value}`` of the setting's ``config.continual``."""
  return traverse_util.flatten_dict(setting.runs[0].results["config"].get("continual", {}), sep=".")


def _final(run: compare.Run, policy: str) -> float:
  policies = run.results["policies"]
  if policy not in policies:
    raise ChooseError(f"run {run.workdir} has no policy {policy!r}; it has {sorted(policies)}")
  return policies[policy][HEADLINE]["final_average"]


def settings(runs: Sequence[compare.Run], policies: Sequence[str] = DEFAULT_POLICIES) -> list[Setting]:
  """Groups runs into settings (folder name without ``_seed=N``) and scores each by the criterion."""
  if not policies:
    raise ChooseError("--policies is empty; name the policies the criterion averages, e.g. reindex,no_reindex")
  for run in runs:
    split = run.results["config"].get("eval", {}).get("split", "test")
    if split != "val":
      raise ChooseError(f"run {run.workdir} was evaluated on {split!r}; choose on runs evaluated on val "
                        "(python -m ccmr_jax.sweep ... --eval_split=val, or ccmr_jax.reevaluate --split=val)")
  groups: dict[str, list[compare.Run]] = {}
  for run in runs:
    groups.setdefault(compare.group_label(run), []).append(run)
  out = []
  for name, members in groups.items():
    strategies = {run.strategy for run in members}
    if len(strategies) > 1:
      raise ChooseError(f"setting {name} mixes strategies {sorted(strategies)}")
    finals = {p: float(np.mean([_final(run, p) for run in members])) for p in policies}
    out.append(Setting(name, members[0].strategy, tuple(members), finals, float(np.mean(list(finals.values())))))
  return out


def choose(found: Sequence[Setting]) -> dict[str, dict]:
  """Per strategy, the setting of highest criterion and the ``config.continual`` values that set it apart."""
  chosen = {}
  for strategy in dict.fromkeys(s.strategy for s in found):
    mine = [s for s in found if s.strategy == strategy]
    best = max(mine, key=lambda s: s.criterion)
    continual = [_continual_values(s) for s in mine]
    differing = sorted(key for key in continual[0] if any(c.get(key) != continual[0][key] for c in continual))
    values = _continual_values(best)
    chosen[strategy] = {"setting": best.name, "criterion": best.criterion,
                        "runs": [os.path.basename(os.path.normpath(r.workdir)) for r in best.runs],
                        "overrides": {f"continual.{key}": values[key] for key in differing}}
  return chosen


def _markdown(found: Sequence[Setting], chosen: dict[str, dict], policies: Sequence[str]) -> str:
  lines = ["# Settings chosen on val", "",
           "Criterion c = mean over the policies " + ", ".join(f"`{p}`" for p in policies) + " (and over seeds) of "
           "the task-aware final average of mean R@1 on the validation split; each strategy keeps its highest c.", "",
           "| strategy | setting | n | " + " | ".join(f"`{p}` final" for p in policies) + " | c | chosen |",
           "|---|---|---:|" + "---:|" * (len(policies) + 1) + "---|"]
  for s in found:
    mark = "**yes**" if chosen[s.strategy]["setting"] == s.name else ""
    lines.append(f"| {s.strategy} | {s.name} | {len(s.runs)} | "
                 + " | ".join(f"{s.finals[p]:.2f}" for p in policies) + f" | {s.criterion:.2f} | {mark} |")
  return "\n".join(lines) + "\n"


def write_choice(workdir: str, out_dir: str, policies: Sequence[str] = DEFAULT_POLICIES) -> list[str]:
  """Reads the sweep's runs, chooses, and writes :data:`OUTPUT_NAMES` into ``out_dir``."""
  try:
    runs = compare.load_runs(study.run_folders(workdir))
  except (compare.CompareError, study.StudyError) as e:
    raise ChooseError(str(e)) from e
  found = settings(runs, policies)
  chosen = choose(found)
  paths = [os.path.join(out_dir, name) for name in OUTPUT_NAMES]
  files.atomic_write_text(paths[0], _markdown(found, chosen, policies))
  files.atomic_write_json(paths[1], chosen)
  return paths


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command's flags on ``flag_values`` (the command calls it once, before parsing)."""
  flags.DEFINE_string("workdir", None, "A sweep's folder of runs evaluated on val.", flag_values=flag_values,
                      required=True)
  flags.DEFINE_string("out", None, "Folder for choose.md and chosen.json.", flag_values=flag_values, required=True)
  flags.DEFINE_list("policies", list(DEFAULT_POLICIES), "Policies whose task-aware finals the criterion averages.",
                    flag_values=flag_values)


@cli.exits_on_user_error()
def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.write_outputs(lambda out: write_choice(flag_values["workdir"].value, out, flag_values["policies"].value),
                    flag_values["out"].value)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
