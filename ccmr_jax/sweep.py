"""Run several strategies (and hyperparameter values), then compare them in one table.

  python -m ccmr_jax.sweep --config=configs/scenes.py --strategies=finetune,joint,ewc,ewc+replay \\
      --workdir=runs/sweep --sweep=ewc.strength=10,100,1000 [--sweep=replay.fraction=0.25,0.5] \\
      [--eval_split=val] [--seeds=0,1,2]

Every strategy runs in ``WORKDIR/<strategy>``. A ``--sweep=SECTION.FIELD=V1,V2,...``
sets ``config.continual.SECTION.FIELD``; it applies to the strategies that
read that section (``ewc.*`` to strategies with ``ewc``, ``importance.*`` to
those that estimate an importance), which then run once per value, in
``WORKDIR/<strategy>_<SECTION.FIELD>=<value>``; several sweeps that apply to
the same strategy make a grid, the fields named in the order given. A tuple
field takes its items joined by ``+`` (``--sweep=lwf.parts=cross,cross+image+text``).
Other strategies run once, unswept.

``--seeds=0,1,2`` runs every one of those once per seed, in ``<name>_seed=<seed>``
(``config.seed`` and, for the embedded scenes, ``data.scenes.seed``), and the
comparison adds ``compare_mean_std.md``: mean ± std over the seeds.

``--eval_split=val`` sets ``config.eval.split``, so the recall matrices come
from the validation split: tune on ``val``, report on ``test``, in separate
workdirs (a workdir refuses a run of another config).

The command resumes: a run whose ``results.json`` was written with the same
config is not started again, and ``experiment.run`` resumes a run that
stopped halfway. At the end ``WORKDIR`` receives ``compare.md``,
``compare.csv`` and the plots of :func:`ccmr_jax.compare.write_comparison`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
from absl import app, flags, logging

from ccmr_jax import cli, compare, distributed, experiment, manifest
from ccmr_jax import workdir as layout
from ccmr_jax.continual.strategies import check_continual_config, parse_strategy

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "scenes.py")
EVAL_SPLITS = experiment.EVAL_SPLITS


@dataclasses.dataclass(frozen=True)
class SweptField:
  """One ``--sweep``: a field of ``config.continual`` and the values it takes.

  Attributes:
    path: ``"section.field"``, relative to ``config.continual``.
    values: the parsed values, typed like the field's default.
  """

  path: str
  values: tuple

  @property
  def section(self) -> str:
    return self.path.split(".")[0]


def format_value(value: Any) -> str:
  """A value as it appears in a run directory's name (``10.0`` → ``10``, ``("a", "b")`` → ``a+b``)."""
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, tuple):
    return "+".join(value)
  return str(value)


def _parse_value(text: str, default: Any, path: str) -> Any:
  try:
    if isinstance(default, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError
      return text.lower() == "true"
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    raise ValueError(f"--sweep={path}: {text!r} is not a {type(default).__name__}") from None
  if isinstance(default, tuple):
    return tuple(text.split("+"))
  return text


def parse_sweep(text: str, continual: ml_collections.ConfigDict) -> SweptField:
  """Parses ``"section.field=v1,v2,..."`` against the ``config.continual`` section.

  Args:
    text: the value of one ``--sweep`` flag.
    continual: the config's ``continual`` section; its defaults give the types.

  Returns:
    The :class:`SweptField`.

  Raises:
    ValueError: malformed text, a field ``config.continual`` does not have,
      a value of the wrong type, or a value given twice.
  """
  path, equals, values_text = text.partition("=")
  path = path.strip()
  section, dot, field = path.partition(".")
  if not equals or not dot or not values_text.strip():
    raise ValueError(f"--sweep={text!r}: expected SECTION.FIELD=V1,V2,... (e.g. ewc.strength=10,100)")
  if section not in continual or not isinstance(continual[section], ml_collections.ConfigDict) \
      or field not in continual[section]:
    raise ValueError(f"--sweep={text!r}: config.continual has no field {path!r}; "
                     f"its sections are {sorted(continual.keys())}")
  values = tuple(_parse_value(v.strip(), continual[section][field], path) for v in values_text.split(","))
  if len(set(values)) != len(values):
    raise ValueError(f"--sweep={text!r} names a value twice")
  return SweptField(path, values)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One run of the sweep.

  Attributes:
    name: its directory under the sweep's workdir.
    strategy: the ``train.strategy`` it sets.
    assignments: ``(path under config.continual, value)`` pairs it sets.
    seed: the seed it sets (:func:`run_config`), or None to keep the config's.
  """

  name: str
  strategy: str
  assignments: tuple[tuple[str, Any], ...]
  seed: int | None = None


def plan_runs(strategies: Sequence[str], sweeps: Sequence[SweptField], seeds: Sequence[int] = ()) -> list[PlannedRun]:
  """Every (strategy, swept values, seed) run, strategies in the order given.

  A sweep applies to a strategy that reads its section of ``config.continual``
  (:attr:`Strategy.continual_sections`); a strategy with several applicable
  sweeps runs over their grid; with ``seeds`` each of those runs once per
  seed, in ``<name>_seed=<seed>``.

  Raises:
    ValueError: no strategy, an unknown or repeated strategy, a field swept
      twice, a sweep that applies to none of the strategies, or a repeated
      or negative seed.
  """
  if len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
    raise ValueError(f"--seeds must be distinct whole numbers >= 0, got {list(seeds)}")
  if not strategies:
    raise ValueError("--strategies is empty; name at least one, e.g. --strategies=finetune,joint")
  parsed = [parse_strategy(name) for name in strategies]
  names = [s.name for s in parsed]
  if len(set(names)) != len(names):
    raise ValueError(f"--strategies names a strategy twice: {names}")
  paths = [f.path for f in sweeps]
  if len(set(paths)) != len(paths):
    raise ValueError(f"--sweep names a field twice: {paths}")
  for swept in sweeps:
    if not any(swept.section in s.continual_sections for s in parsed):
      raise ValueError(f"--sweep={swept.path}=... applies to none of the strategies {names}: "
                       f"only strategies that use '{swept.section}' read config.continual.{swept.section}")
  runs = []
  for strategy in parsed:
    applicable = [f for f in sweeps if f.section in strategy.continual_sections]
    for values in itertools.product(*(f.values for f in applicable)):
      assignments = tuple((f.path, v) for f, v in zip(applicable, values))
      name = strategy.name + "".join(f"_{path}={format_value(v)}" for path, v in assignments)
      runs += [PlannedRun(f"{name}_seed={seed}", strategy.name, assignments, seed) for seed in seeds] \
          or [PlannedRun(name, strategy.name, assignments)]
  return runs


def run_config(base: ml_collections.ConfigDict, planned: PlannedRun,
               eval_split: str | None = None) -> ml_collections.ConfigDict:
  """A copy of ``base`` with the run's strategy, swept values, seed and evaluation split set.

  A seed sets ``config.seed`` (initialisation, batch order, replay draws) and,
  for the embedded scenes, ``data.scenes.seed`` (the task stream's images; the
  pretraining corpus keeps its own seed): a replicate of the whole experiment.

  Raises:
    ValueError: a swept value ``check_continual_config`` refuses (the message
      names the field).
  """
  config = copy.deepcopy(base)
  config.unlock()
  config.train.strategy = planned.strategy
  if planned.seed is not None:
    config.seed = planned.seed
    if config.data.source == "scenes":
      config.data.scenes.seed = planned.seed
  for path, value in planned.assignments:
    section, field = path.split(".")
    config.continual[section][field] = value
  if eval_split is not None:
    config.eval.split = eval_split
  if "continual" in config:
    check_continual_config(config.continual)
  return config


def _finished_with(run_dir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether ``run_dir`` holds the results of a finished run of exactly ``config``."""
  path = layout.results_path(run_dir)
  if not manifest.is_sealed(path):
    return False
  try:
    return manifest.read_json(path).get("config") == json.loads(config.to_json())
  except (OSError, ValueError):
    return False


def run_sweep(base: ml_collections.ConfigDict, strategies: Sequence[str], sweep_texts: Sequence[str],
              workdir: str, eval_split: str | None = None, seeds: Sequence[int] = ()) -> list[str]:
  """Runs (or resumes) every planned run, then writes the comparison into ``workdir``.

  Every config is built and checked before the first run starts.

  Args:
    base: the experiment config (``--config``).
    strategies: ``train.strategy`` values.
    sweep_texts: ``--sweep`` values, ``"section.field=v1,v2"``.
    workdir: the sweep's folder; run ``r`` goes to ``workdir/r.name``.
    eval_split: ``"val"`` or ``"test"`` to set ``config.eval.split``; None
      keeps the config's.
    seeds: run everything once per seed (:func:`run_config`); empty keeps the config's seed.

  Returns:
    The paths the comparison wrote (empty on processes other than 0).

  Raises:
    cli.UserError: bad strategies, sweeps or swept values (raised
      before any run starts), or a run's config or workdir is refused.
    compare.CompareError: a run left no usable ``results.json``.
  """
  try:
    if eval_split is not None and eval_split not in EVAL_SPLITS:
      raise ValueError(f"--eval_split must be one of {list(EVAL_SPLITS)}, got {eval_split!r}")
    if sweep_texts and "continual" not in base:
      raise ValueError("--sweep needs a config with a 'continual' section (ccmr_jax.defaults.continual_defaults())")
    sweeps = [parse_sweep(text, base.continual) for text in sweep_texts]
    planned = plan_runs(strategies, sweeps, seeds)
    configs = [run_config(base, p, eval_split) for p in planned]
  except ValueError as e:
    raise cli.UserError(str(e)) from e
  run_dirs = [os.path.join(workdir, p.name) for p in planned]
  for p, config, run_dir in zip(planned, configs, run_dirs):
    if _finished_with(run_dir, config):
      logging.info("sweep: %s is finished, skipping it", p.name)
      continue
    logging.info("sweep: running %s in %s", p.name, run_dir)
    experiment.run(config, run_dir)
  if jax.process_index() != 0:
    return []
  return compare.write_comparison(compare.load_runs(run_dirs), workdir)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command's flags on ``flag_values`` (the command calls it once, before parsing)."""
  cli.define_config_file("config", _DEFAULT_CONFIG, "Experiment config file.", flag_values=flag_values)
  flags.DEFINE_list("strategies", None, "Comma-separated train.strategy values, e.g. finetune,joint,ewc+replay.",
                    flag_values=flag_values, required=True)
  flags.DEFINE_string("workdir", None, "Folder of the sweep: one run folder per run, and the comparison.",
                      flag_values=flag_values, required=True)
  flags.DEFINE_multi_string("sweep", [], "SECTION.FIELD=V1,V2,...: values of config.continual.SECTION.FIELD "
                            "to try; repeat the flag to sweep a grid.", flag_values=flag_values)
  flags.DEFINE_list("seeds", [], "Comma-separated seeds: every run once per seed (config.seed and the scenes' "
                    "data.scenes.seed), then mean ± std in compare_mean_std.md.", flag_values=flag_values)
  flags.DEFINE_enum("eval_split", None, list(EVAL_SPLITS), "Split the recall matrices are measured on "
                    "(sets config.eval.split); default: the config's.", flag_values=flag_values)


@cli.exits_on_user_error(compare.CompareError)
def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.configure_logging()
  config = flag_values["config"].value
  try:
    distributed.maybe_initialize(config)  # before anything touches a device
  except ValueError as e:
    raise cli.UserError(str(e)) from e
  try:
    seeds = [int(seed) for seed in flag_values["seeds"].value]
  except ValueError as e:
    raise cli.UserError(f"--seeds must be whole numbers, got {flag_values['seeds'].value}") from e
  paths = run_sweep(config, flag_values["strategies"].value, flag_values["sweep"].value,
                    flag_values["workdir"].value, flag_values["eval_split"].value, seeds)
  if paths:
    print("wrote:\n  " + "\n  ".join(paths))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
