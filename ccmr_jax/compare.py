"""Compare finished runs: ``python -m ccmr_jax.compare --workdirs=DIR1,DIR2,... --out=DIR``.

Reads each workdir's ``results.json`` and writes to ``--out``:

  compare.md, compare.csv     one row per (run, policy, scope): final averages of
                              R@1/5/10 both ways, rsum, mean_r1, the forgetting
                              and BWT of mean_r1, the zero-shot and just-learned
                              mean_r1, the drift of old items, and the matched
                              query-gallery cosine of the policy
  compare_final_mean_r1.png   grouped bars: final average mean_r1, run × policy
  compare_curves.png          mean_r1 averaged over the seen tasks after each task t
  compare_mean_std.md/.csv    mean ± std (and n) over runs that differ only in
                              seed or task order (:func:`aggregate_rows`)

A run is labelled by its strategy (``config.train.strategy``), with the
workdir's name added when two runs share a strategy. The scope is
``task_aware`` (``results["policies"]``: each task's own gallery) and, when
the run has it, ``task_agnostic`` (``results["policies_agnostic"]``: the union
gallery of all seen tasks). A missing or malformed ``results.json`` stops the
command with a message naming the workdir and exit status 2.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import re
from typing import Sequence

import numpy as np
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ccmr_jax import cli, files, manifest
from ccmr_jax import workdir as layout
from ccmr_jax.metrics import HEADLINE, SCOPES, metric_names

FINAL_METRICS = tuple(metric_names((1, 5, 10)))
# Beside the final averages: the starting encoders' mean_r1 (mean over tasks), the just-learned mean_r1
# (mean of the diagonal R[k][k]), the drift of old tasks' items to the final snapshot (mean cosine), and the
# cosine of an S_final image query to its own caption in the gallery the policy searches (mean over tasks).
CONTEXT_COLUMNS = ("zero_shot_mean_r1", "diagonal_mean_r1", "drift_images", "drift_captions", "matched_cosine_i2t")
NUMERIC_COLUMNS = (*FINAL_METRICS, "forgetting_mean_r1", "bwt_mean_r1", *CONTEXT_COLUMNS)
COLUMNS = ("run", "policy", "scope", "tasks_trained", *NUMERIC_COLUMNS, "workdir")
AGGREGATE_COLUMNS = ("group", "policy", "scope", "n", *NUMERIC_COLUMNS)
OUTPUT_NAMES = ("compare.md", "compare.csv", "compare_final_mean_r1.png", "compare_curves.png",
                "compare_mean_std.md", "compare_mean_std.csv")
# Config fields in which replicates of one experiment differ: the training seed, the scenes' generator seed
# and the task order. Runs equal in everything else form one group of compare_mean_std.
REPLICATE_FIELDS = (("seed",), ("data", "scenes", "seed"), ("data", "task_order"))


class CompareError(Exception):
  """A run that cannot be compared (missing or malformed results); the message names its workdir."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run: where it lives and its ``results.json`` document."""

  workdir: str
  results: dict

  @property
  def strategy(self) -> str:
    return self.results["config"]["train"]["strategy"]

  def scopes(self) -> dict[str, dict]:
    """Scope name → ``{policy: {metric: summary}}``, for the scopes this run has."""
    return {scope: self.results[key] for scope, key in SCOPES.items() if key in self.results}


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_results(results, where: str) -> None:
  """Raises :class:`CompareError` unless ``results`` has what the comparison reads."""
  def fail(what: str):
    raise CompareError(f"{where} is malformed: {what}; rerun the experiment in that workdir to rewrite it")

  if not isinstance(results, dict):
    fail("it is not a JSON object")
  config = results.get("config")
  train_config = config.get("train") if isinstance(config, dict) else None
  if not (isinstance(train_config, dict) and isinstance(train_config.get("strategy"), str)):
    fail("config.train.strategy is missing")
  num_tasks = results.get("tasks_trained")
  if not isinstance(num_tasks, int) or num_tasks < 1:
    fail(f"tasks_trained should be a positive integer, found {num_tasks!r}")
  if not isinstance(results.get("policies"), dict) or not results["policies"]:
    fail("it has no 'policies'")
  for key in SCOPES.values():
    if not isinstance(results.get(key, {}), dict):
      fail(f"'{key}' is not an object")
    for policy, per_metric in results.get(key, {}).items():
      headline = per_metric.get(HEADLINE) if isinstance(per_metric, dict) else None
      if not isinstance(headline, dict):
        fail(f"{key}.{policy} has no {HEADLINE}")
      matrix = headline.get("matrix")
      if not (isinstance(matrix, list) and len(matrix) == num_tasks
              and all(isinstance(row, list) and len(row) == num_tasks for row in matrix)):
        fail(f"{key}.{policy}.{HEADLINE}.matrix should be {num_tasks}×{num_tasks}")
      if not all(_is_number(row[k]) for t, row in enumerate(matrix) for k in range(t + 1)):
        fail(f"{key}.{policy}.{HEADLINE}.matrix has a missing value on or below the diagonal")
      for metric, summary in per_metric.items():
        if not (isinstance(summary, dict) and _is_number(summary.get("final_average"))):
          fail(f"{key}.{policy}.{metric} has no numeric final_average")


def load_run(workdir: str) -> Run:
  """Reads and checks ``workdir/results.json``.

  Args:
    workdir: a run's workdir.

  Returns:
    The :class:`Run`.

  Raises:
    CompareError: the file is missing, unreadable or lacks what the comparison needs.
  """
  path = layout.results_path(workdir)
  if not manifest.is_sealed(path):
    raise CompareError(f"workdir {workdir} has no results.json; it is written when a run has evaluated its tasks")
  try:
    results = manifest.read_json(path)
  except (OSError, ValueError) as e:
    raise CompareError(f"cannot read {path}: {e}") from e
  _check_results(results, path)
  return Run(workdir, results)


def load_runs(workdirs: Sequence[str]) -> list[Run]:
  """:func:`load_run` of each workdir; refuses an empty list and a workdir named twice."""
  if not workdirs:
    raise CompareError("no workdir given; pass --workdirs=DIR1,DIR2,...")
  seen = set()
  for workdir in workdirs:
    real = files.absolute(workdir).rstrip("/")
    if real in seen:
      raise CompareError(f"workdir {workdir} is given twice")
    seen.add(real)
  return [load_run(workdir) for workdir in workdirs]


def run_labels(runs: Sequence[Run]) -> list[str]:
  """Each run's strategy; where two runs share one, plus the workdir's name (or its path, if that is shared too)."""
  strategies = [run.strategy for run in runs]
  labels = [s if strategies.count(s) == 1 else f"{s} ({os.path.basename(os.path.normpath(run.workdir))})"
            for s, run in zip(strategies, runs)]
  return [label if labels.count(label) == 1 else f"{run.strategy} ({run.workdir})"
          for label, run in zip(labels, runs)]


def seen_task_average(matrix: list[list]) -> list[float]:
  """``a[t] = (1/(t+1)) Σ_{k<=t} R[t][k]``: the average over the seen tasks after each task ``t``."""
  return [float(np.mean(row[: t + 1])) for t, row in enumerate(matrix)]


def comparison_rows(runs: Sequence[Run]) -> list[dict]:
  """One row per (run, scope, policy), columns :data:`COLUMNS`.

  Metric columns hold the final average ``(1/T) Σ_k R[T-1][k]``; the last two
  the forgetting and BWT of ``mean_r1`` (see ``evaluate.continual_summary``).
  A metric a run did not record (other ``eval.ks``), and forgetting and BWT
  of a one-task run, are ``None``.

  Args:
    runs: the runs, in the order to list them.

  Returns:
    A list of dicts keyed by :data:`COLUMNS`.
  """
  rows = []
  for label, run in zip(run_labels(runs), runs):
    for scope, policies in run.scopes().items():
      for policy, per_metric in policies.items():
        row = {"run": label, "policy": policy, "scope": scope, "tasks_trained": run.results["tasks_trained"]}
        for metric in FINAL_METRICS:
          row[metric] = per_metric[metric]["final_average"] if metric in per_metric else None
        row["forgetting_mean_r1"] = per_metric[HEADLINE].get("forgetting")
        row["bwt_mean_r1"] = per_metric[HEADLINE].get("bwt")
        row.update(_context(run, policy, per_metric[HEADLINE]["matrix"]))
        row["workdir"] = run.workdir
        rows.append(row)
  return rows


def _context(run: Run, policy: str, matrix: list[list]) -> dict:
  """The :data:`CONTEXT_COLUMNS` of one run and policy (``None`` where the run did not record them)."""
  zero_shot = run.results.get("zero_shot", {}).get(HEADLINE)
  summary = run.results.get("analysis_summary", {})
  drift = summary.get("drift_to_final", {})
  return {"zero_shot_mean_r1": float(np.mean(zero_shot)) if zero_shot else None,
          "diagonal_mean_r1": float(np.mean([matrix[k][k] for k in range(len(matrix))])),
          "drift_images": drift.get("images", {}).get("mean_cosine"),
          "drift_captions": drift.get("captions", {}).get("mean_cosine"),
          "matched_cosine_i2t": summary.get("final_matched_cosine", {}).get(policy, {}).get("i2t")}


def replicate_key(results: dict) -> str:
  """The run's config without :data:`REPLICATE_FIELDS`, as canonical JSON: equal for replicates."""
  config = copy.deepcopy(results["config"])
  for path in REPLICATE_FIELDS:
    node = config
    for key in path[:-1]:
      node = node.get(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
      node.pop(path[-1], None)
  return json.dumps(config, sort_keys=True)


def group_label(run: Run) -> str:
  """The run's folder name without its ``_seed=N`` suffix (its strategy if nothing is left)."""
  name = os.path.basename(os.path.normpath(run.workdir))
  return re.sub(r"_seed=\d+$", "", name) or run.strategy


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
  """Mean and sample std (``ddof = 1``; 0 for one value) of ``values``; ``(None, None)`` if any is ``None``."""
  if any(v is None for v in values):
    return None, None
  array = np.asarray(values, np.float64)
  return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else 0.0)


def aggregate_rows(runs: Sequence[Run], rows: Sequence[dict]) -> list[dict]:
  """Mean ± std over replicates: one row per (group of runs equal but for seed and task order, scope, policy).

  Each numeric column ``c`` gives ``c`` (the mean over the group's ``n``
  runs) and ``c_std`` (the sample standard deviation, ``ddof = 1``; 0 when
  ``n = 1``); a column some run lacks is ``None``. Groups are listed in the
  order of their first run.
  """
  keys = {run.workdir: replicate_key(run.results) for run in runs}
  first = {}
  for run in runs:
    first.setdefault(keys[run.workdir], run)
  labels = {key: group_label(run) for key, run in first.items()}
  if len(set(labels.values())) < len(labels):  # groups of the same name: add the folder each one lives in
    labels = {key: f"{os.path.basename(os.path.dirname(os.path.normpath(run.workdir)))}/{labels[key]}"
              for key, run in first.items()}
  grouped: dict[tuple, list[dict]] = {}
  for row in rows:
    grouped.setdefault((keys[row["workdir"]], row["scope"], row["policy"]), []).append(row)
  out = []
  for (key, scope, policy), members in grouped.items():
    row = {"group": labels[key], "policy": policy, "scope": scope, "n": len(members)}
    for column in NUMERIC_COLUMNS:
      row[column], row[f"{column}_std"] = mean_std([m[column] for m in members])
    out.append(row)
  return out


def _aggregate_markdown(rows: Sequence[dict]) -> str:
  columns = [c for c in AGGREGATE_COLUMNS if c not in ("group", "policy", "scope", "n")]
  lines = ["# Mean ± std over replicates", "",
           "Runs whose configs differ only in the seed, the scenes' generator seed or the task order form a "
           "group; each cell is the mean ± the sample standard deviation (ddof = 1) over the group's n runs.", "",
           "| group | policy | scope | n | " + " | ".join(columns) + " |",
           "|---|---|---|---:|" + "---:|" * len(columns)]
  for row in rows:
    cells = ["—" if row[c] is None else f"{row[c]:.2f} ± {row[c + '_std']:.2f}" for c in columns]
    lines.append(f"| {row['group']} | {row['policy']} | {row['scope']} | {row['n']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _fmt(value) -> str:
  if value is None:
    return "—"
  return f"{value:.2f}" if isinstance(value, float) else str(value)


def _markdown(runs: Sequence[Run], rows: list[dict]) -> str:
  metric_columns = [c for c in COLUMNS if c != "workdir"]
  lines = ["# Comparison of runs", "",
           "Final average = mean over tasks k of R[T-1][k]; forgetting and BWT of mean_r1 = (i2t R@1 + t2i R@1)/2 "
           "(see each run's report.md for the definitions). Scope task_aware searches each task's own gallery; "
           "task_agnostic the union gallery of all seen tasks.", ""]
  if len({run.results["tasks_trained"] for run in runs}) > 1:
    lines += ["**Note:** the runs trained different numbers of tasks; their final averages are not comparable.", ""]
  if len({repr(run.results["config"].get("data")) for run in runs}) > 1:
    lines += ["**Note:** the runs use different data configs; their task streams may differ.", ""]
  lines += ["| " + " | ".join(metric_columns) + " |", "|---|---|---|" + "---:|" * (len(metric_columns) - 3)]
  lines += ["| " + " | ".join(_fmt(row[c]) for c in metric_columns) + " |" for row in rows]
  lines += ["", "| run | workdir |", "|---|---|"]
  lines += [f"| {label} | `{run.workdir}` |" for label, run in zip(run_labels(runs), runs)]
  lines += ["", "![final mean_r1](compare_final_mean_r1.png)", "", "![mean_r1 over seen tasks](compare_curves.png)"]
  return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({c: "" if row[c] is None else row[c] for c in columns})
  return buffer.getvalue()


def new_figure(width: float, height: float) -> Figure:
  figure = Figure(figsize=(width, height))
  FigureCanvasAgg(figure)
  return figure


def _plot_final_bars(runs: Sequence[Run], rows: list[dict], path: str) -> None:
  labels = run_labels(runs)
  series = list(dict.fromkeys((row["policy"], row["scope"]) for row in rows))
  value = {(row["run"], row["policy"], row["scope"]): row[HEADLINE] for row in rows}
  figure = new_figure(max(5.0, 1.2 + 0.5 * len(labels) * len(series)), 4.0)
  ax = figure.subplots()
  width = 0.8 / len(series)
  for i, (policy, scope) in enumerate(series):
    xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
    heights = [value.get((label, policy, scope), np.nan) for label in labels]
    bars = ax.bar(xs, heights, width, label=f"{policy}, {scope}")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
  ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
  ax.set_ylabel("final average mean_r1")
  ax.set_title("final average of mean_r1 over all tasks")
  ax.legend(fontsize=7)
  ax.grid(axis="y", alpha=0.3)
  files.atomic_save_figure(figure, path)


def _plot_curves(runs: Sequence[Run], path: str) -> None:
  labels = run_labels(runs)
  scopes = list(dict.fromkeys(scope for run in runs for scope in run.scopes()))
  figure = new_figure(5.2 * len(scopes), 4.0)
  axes = figure.subplots(1, len(scopes), squeeze=False, sharey=True)[0]
  styles = ["-", "--", ":", "-."]
  for ax, scope in zip(axes, scopes):
    for color, (label, run) in enumerate(zip(labels, runs)):
      for style, (policy, per_metric) in enumerate(run.scopes().get(scope, {}).items()):
        curve = seen_task_average(per_metric[HEADLINE]["matrix"])
        ax.plot(range(len(curve)), curve, styles[style % len(styles)], color=f"C{color}", marker="o",
                label=f"{label}, {policy}")
    ax.set_title(f"{scope}: mean_r1 averaged over seen tasks")
    ax.set_xlabel("after training task t")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_xticks(range(max(run.results["tasks_trained"] for run in runs)))
  axes[0].set_ylabel("mean over k <= t of R[t][k]")
  files.atomic_save_figure(figure, path)


def write_comparison(runs: Sequence[Run], out_dir: str) -> list[str]:
  """Writes compare.md, compare.csv, the two plots and the mean ± std tables into ``out_dir``.

  Args:
    runs: loaded runs (:func:`load_runs`), in the order to list them.
    out_dir: the folder to write; created if needed.

  Returns:
    The paths written, in the order of :data:`OUTPUT_NAMES`.
  """
  rows = comparison_rows(runs)
  paths = [os.path.join(out_dir, name) for name in OUTPUT_NAMES]
  files.atomic_write_text(paths[0], _markdown(runs, rows))
  files.atomic_write_text(paths[1], csv_text(rows))
  _plot_final_bars(runs, rows, paths[2])
  _plot_curves(runs, paths[3])
  aggregates = aggregate_rows(runs, rows)
  files.atomic_write_text(paths[4], _aggregate_markdown(aggregates))
  files.atomic_write_text(paths[5], csv_text(aggregates, [c for name in AGGREGATE_COLUMNS
                                                      for c in ((name, f"{name}_std") if name in NUMERIC_COLUMNS
                                                                else (name,))]))
  return paths


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command's flags on ``flag_values`` (the command calls it once, before parsing)."""
  flags.DEFINE_list("workdirs", None, "Comma-separated workdirs of finished runs.", flag_values=flag_values,
                    required=True)
  flags.DEFINE_string("out", None, "Folder for compare.md, compare.csv and the plots.", flag_values=flag_values,
                      required=True)


@cli.exits_on_user_error(CompareError)
def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runs = load_runs(flag_values["workdirs"].value)
  cli.write_outputs(lambda out: write_comparison(runs, out), flag_values["out"].value)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
