"""A study over cells of seeded runs: ``python -m ccmr_jax.study --cells=LABEL=DIR,... --out=DIR``.

A *cell* is one setting of an experiment (a factor's value, a strategy at its
chosen strength) run over several seeds. ``DIR`` is a sweep's folder, whose
sub-folders holding a ``results.json`` are the cell's runs
(``finetune_seed=0``, ``finetune_seed=1``, ...), or one run's workdir. Over
a cell's ``n`` runs every figure is the mean ± the sample standard deviation
(``ddof = 1``; 0 when ``n = 1``):

  * each policy's final average of mean R@1, ``x = (1/T) Σ_k R[T-1][k]``, in
    each scope, and its forgetting;
  * the paired difference to ``reindex``: ``d_s = x_s(policy) − x_s(reindex)``
    within each run ``s``, then the mean ± std of ``d`` (the seed's shared
    luck cancels, so this spread is the one that decides a finding);
  * context: zero-shot and just-learned mean R@1, the drift of old tasks'
    items to the final snapshot (mean cosine of ``S_k``'s and ``S_final``'s
    vectors, images and captions) and each policy's matched query–gallery
    cosine (i2t).

Over all runs of all cells, the gain of not re-indexing against drift:
``g = x(no_reindex) − x(reindex)`` (task-aware and task-agnostic) against
two drift distances, both towers' mean ``δ = 1 − (cos_images + cos_captions) / 2``
and the less-moved tower's ``δ_min = 1 − max(cos_images, cos_captions)``
(0 when a tower is frozen), each with the least-squares line ``g ≈ a + b x``
and its ``R²``.

With ``--baseline=LABEL`` (e.g. the ``finetune`` cell of a strategy table),
every other cell's finals are also set against that cell's, paired by seed:
``b_s = x_s(cell) − x_s(baseline)`` for each seed ``s`` both cells ran, then
the mean ± std of ``b``. A difference is called a *gain* (or a *loss*) only
where ``|mean b|`` exceeds both cells' standard deviations over seeds, and
only with at least two seeds on each side; otherwise it is *within spread*.

Writes ``study.md`` (the tables), ``study.csv`` (one row per cell × scope ×
policy, every mean and std), ``gain_vs_drift.png`` and ``gain_vs_drift.csv``
(one row per run: its cosines, gains and ``reindex`` finals) into ``--out``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from absl import app, flags

from ccmr_jax import cli, compare, files, manifest
from ccmr_jax import workdir as layout
from ccmr_jax.metrics import HEADLINE

REFERENCE = "reindex"
NOT_REINDEXING = "no_reindex"
# The columns of compare.comparison_rows that a cell averages.
CELL_COLUMNS = (HEADLINE, "forgetting_mean_r1", "zero_shot_mean_r1", "diagonal_mean_r1", "drift_images",
                "drift_captions", "matched_cosine_i2t")
CSV_COLUMNS = ("cell", "scope", "policy", "n",
               *(name for column in (*CELL_COLUMNS, "minus_reindex") for name in (column, f"{column}_std")))
BASELINE_COLUMNS = ("minus_baseline", "minus_baseline_std", "versus_baseline")
OUTPUT_NAMES = ("study.md", "study.csv", "gain_vs_drift.png", "gain_vs_drift.csv")


class StudyError(cli.UserError):
  """A cell that cannot be read (no runs, malformed results, a bad --cells entry); the message names it."""


@dataclasses.dataclass(frozen=True)
class Cell:
  """One labelled setting and its runs (one per seed)."""

  label: str
  folder: str
  runs: tuple[compare.Run, ...]


def parse_cells(specs: Sequence[str]) -> list[tuple[str, str]]:
  """``["LABEL=DIR", ...]`` → ``[(label, dir), ...]``; refuses an entry without ``=`` and a label given twice."""
  if not specs:
    raise StudyError("no cell given; pass --cells=LABEL=DIR,LABEL=DIR,...")
  cells = []
  for spec in specs:
    label, sep, folder = spec.partition("=")
    if not (sep and label.strip() and folder.strip()):
      raise StudyError(f"--cells entry {spec!r} should be LABEL=DIR (a sweep folder or a run's workdir)")
    if label in dict(cells):
      raise StudyError(f"cell {label!r} is given twice in --cells")
    cells.append((label, folder))
  return cells


def run_folders(folder: str) -> list[str]:
  """The runs of a cell folder: itself if it holds a ``results.json``, else its sub-folders that do (sorted)."""
  if manifest.is_sealed(layout.results_path(folder)):
    return [folder]
  if not files.is_dir(folder):
    raise StudyError(f"cell folder {folder} does not exist")
  runs = sorted(os.path.join(folder, name) for name in files.listdir(folder)
                if manifest.is_sealed(layout.results_path(os.path.join(folder, name))))
  if not runs:
    raise StudyError(f"cell folder {folder} holds no finished run (no results.json in it or its sub-folders)")
  return runs


def load_cells(specs: Sequence[str]) -> list[Cell]:
  """Reads every cell's runs; a malformed ``results.json`` stops it with the run's path."""
  try:
    return [Cell(label, folder, tuple(compare.load_runs(run_folders(folder))))
            for label, folder in parse_cells(specs)]
  except compare.CompareError as e:
    raise StudyError(str(e)) from e


def _shared_keys(cell: Cell, rows: Sequence[dict]) -> list[tuple[str, str]]:
  """The (scope, policy) pairs every run of the cell has, in the first run's order."""
  per_run = [{(r["scope"], r["policy"]) for r in rows if r["workdir"] == run.workdir} for run in cell.runs]
  first = [(r["scope"], r["policy"]) for r in rows if r["workdir"] == cell.runs[0].workdir]
  return [key for key in first if all(key in keys for keys in per_run)]


def cell_rows(cell: Cell) -> list[dict]:
  """One row per (scope, policy) of the cell: the mean and std of :data:`CELL_COLUMNS` and ``minus_reindex``."""
  rows = compare.comparison_rows(cell.runs)
  by_key = {(r["workdir"], r["scope"], r["policy"]): r for r in rows}
  workdirs = [run.workdir for run in cell.runs]
  out = []
  for scope, policy in _shared_keys(cell, rows):
    members = [by_key[w, scope, policy] for w in workdirs]
    row = {"cell": cell.label, "scope": scope, "policy": policy, "n": len(members)}
    for column in CELL_COLUMNS:
      row[column], row[f"{column}_std"] = compare.mean_std([m[column] for m in members])
    references = [by_key.get((w, scope, REFERENCE)) for w in workdirs]
    differences = [None if ref is None else m[HEADLINE] - ref[HEADLINE] for m, ref in zip(members, references)]
    row["minus_reindex"], row["minus_reindex_std"] = compare.mean_std(differences)
    out.append(row)
  return out


def _finals_by_seed(cell: Cell) -> dict[tuple[str, str], dict[int, float]]:
  """``{(scope, policy): {seed: final}}`` of the cell's runs; refuses a run without a seed and a seed run twice."""
  finals: dict[tuple[str, str], dict[int, float]] = {}
  seeds = set()
  for run in cell.runs:
    seed = run.results["config"].get("seed")
    if seed is None or seed in seeds:
      problem = "has no config.seed" if seed is None else f"repeats seed {seed}"
      raise StudyError(f"run {run.workdir} of cell {cell.label!r} {problem}; --baseline pairs the runs of two "
                       "cells by seed, so each cell needs one run per seed")
    seeds.add(seed)
    for scope, policies in run.scopes().items():
      for policy, summary in policies.items():
        finals.setdefault((scope, policy), {})[seed] = summary[HEADLINE]["final_average"]
  return finals


def verdict(difference: float, cell_std: float, baseline_std: float, n_cell: int, n_baseline: int) -> str:
  """``gain``/``loss`` where ``|difference|`` exceeds both stds over ≥ 2 seeds each, else ``within spread``."""
  if min(n_cell, n_baseline) < 2:
    return "one seed: no verdict"
  if abs(difference) <= max(cell_std, baseline_std):
    return "within spread"
  return "gain" if difference > 0 else "loss"


def add_baseline_columns(cells: Sequence[Cell], rows: Sequence[dict], baseline: str) -> list[dict]:
  """``rows`` (:func:`cell_rows`) with :data:`BASELINE_COLUMNS`: each row's paired difference to ``baseline``.

  The baseline's own rows, and (scope, policy) pairs the baseline lacks or shares no seed with, get ``None``
  and an empty verdict.

  Raises:
    StudyError: ``baseline`` is not a cell, or a run has no seed or repeats one.
  """
  by_label = {cell.label: cell for cell in cells}
  if baseline not in by_label:
    raise StudyError(f"--baseline names {baseline!r}, which is not a cell; the cells are {list(by_label)}")
  finals = {cell.label: _finals_by_seed(cell) for cell in cells}
  reference = finals[baseline]
  base_rows = {(r["scope"], r["policy"]): r for r in rows if r["cell"] == baseline}
  out = []
  for row in rows:
    key = (row["scope"], row["policy"])
    mine, theirs = finals[row["cell"]].get(key, {}), reference.get(key, {})
    seeds = sorted(set(mine) & set(theirs))
    added = dict.fromkeys(BASELINE_COLUMNS, None) | {"versus_baseline": ""}
    base = base_rows.get(key)
    if row["cell"] != baseline and seeds and base is not None:
      mean, std = compare.mean_std([mine[s] - theirs[s] for s in seeds])
      added = {"minus_baseline": mean, "minus_baseline_std": std,
               "versus_baseline": verdict(mean, row[f"{HEADLINE}_std"], base[f"{HEADLINE}_std"], row["n"],
                                          base["n"])}
    out.append(row | added)
  return out


# The drift measures the gain is set against: both towers' mean drift, and the drift of the tower that moved
# less (0 when one tower is frozen).
PREDICTORS = {"mean drift": "δ = 1 − (cos_images + cos_captions)/2",
              "smaller drift": "δ_min = 1 − max(cos_images, cos_captions)"}


@dataclasses.dataclass(frozen=True)
class DriftPoint:
  """One run: per tower, old items' mean cosine to S_final; per scope, ``reindex``'s final and ``g``."""

  cell: str
  workdir: str
  cos_images: float
  cos_captions: float
  gain: dict[str, float]
  reindex: dict[str, float]

  def drift(self, predictor: str) -> float:
    """The :data:`PREDICTORS` value of this run."""
    if predictor == "mean drift":
      return 1.0 - 0.5 * (self.cos_images + self.cos_captions)
    return 1.0 - max(self.cos_images, self.cos_captions)

  def relative_gain(self, scope: str) -> float:
    """``100 · g / x(reindex)``: the gain as a percentage of ``reindex``'s final recall."""
    return 100.0 * self.gain[scope] / self.reindex[scope]


def drift_points(cells: Sequence[Cell]) -> list[DriftPoint]:
  """Every run with a drift measurement and both policies, with ``g = no_reindex − reindex`` per scope."""
  points = []
  for cell in cells:
    for run in cell.runs:
      drift = run.results.get("analysis_summary", {}).get("drift_to_final", {})
      cosines = [drift.get(side, {}).get("mean_cosine") for side in ("images", "captions")]
      finals = {scope: {p: policies[p][HEADLINE]["final_average"] for p in (NOT_REINDEXING, REFERENCE)}
                for scope, policies in run.scopes().items() if {NOT_REINDEXING, REFERENCE} <= set(policies)}
      gains = {scope: final[NOT_REINDEXING] - final[REFERENCE] for scope, final in finals.items()}
      if None not in cosines and gains:
        points.append(DriftPoint(cell.label, run.workdir, float(cosines[0]), float(cosines[1]), gains,
                                 {scope: final[REFERENCE] for scope, final in finals.items()}))
  return points


def _scopes(points: Sequence[DriftPoint]) -> list[str]:
  """The scopes any point has a gain in, in first-seen order."""
  return list(dict.fromkeys(scope for p in points for scope in p.gain))


@dataclasses.dataclass(frozen=True)
class LineFit:
  """``g ≈ intercept + slope · δ`` by least squares over ``n`` runs, with its coefficient of determination."""

  intercept: float
  slope: float
  r_squared: float
  n: int


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LineFit | None:
  """Least squares ``y ≈ a + b x``; ``R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)²``. ``None`` below 3 points or one x."""
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  if len(x) < 3 or np.ptp(x) == 0:
    return None
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (intercept + slope * x)
  total = float(((y - y.mean()) ** 2).sum())
  r_squared = 1.0 - float((residual ** 2).sum()) / total if total > 0 else 1.0
  return LineFit(float(intercept), float(slope), r_squared, len(x))


def drift_fits(points: Sequence[DriftPoint],
               fit_cells: Sequence[str] | None = None) -> dict[tuple[str, str, str], LineFit | None]:
  """:func:`fit_line` of the gain (``"points"``, and ``"percent"`` of reindex) against each of :data:`PREDICTORS`.

  Args:
    points: the runs (:func:`drift_points`).
    fit_cells: the cells whose runs the lines are fitted to; ``None``: every cell.

  Returns:
    ``{(predictor, scope, unit): fit}`` for every scope the points have.
  """
  chosen = [p for p in points if fit_cells is None or p.cell in fit_cells]
  scopes = _scopes(points)
  fits = {}
  for predictor in PREDICTORS:
    for scope in scopes:
      mine = [p for p in chosen if scope in p.gain]
      xs = [p.drift(predictor) for p in mine]
      fits[predictor, scope, "points"] = fit_line(xs, [p.gain[scope] for p in mine])
      fits[predictor, scope, "percent"] = fit_line(xs, [p.relative_gain(scope) for p in mine])
  return fits


def _points_csv(points: Sequence[DriftPoint]) -> str:
  scopes = _scopes(points)
  rows = [{"cell": p.cell, "workdir": p.workdir, "cos_images": p.cos_images, "cos_captions": p.cos_captions,
           **{f"gain_{scope}": p.gain.get(scope) for scope in scopes},
           **{f"reindex_{scope}": p.reindex.get(scope) for scope in scopes}} for p in points]
  return compare.csv_text(rows, ("cell", "workdir", "cos_images", "cos_captions",
                                 *(f"{column}_{s}" for column in ("gain", "reindex") for s in scopes)))


def _plot_gain_vs_drift(points: Sequence[DriftPoint], fits: dict[tuple[str, str], LineFit | None],
                        path: str) -> None:
  scopes = list(dict.fromkeys(scope for _, scope in fits)) or ["task_aware"]
  figure = compare.new_figure(4.6 * len(scopes) + 1.6, 3.8 * len(PREDICTORS))
  axes = figure.subplots(len(PREDICTORS), len(scopes), squeeze=False, sharey=True)
  labels = list(dict.fromkeys(p.cell for p in points))
  for row, predictor in enumerate(PREDICTORS):
    for ax, scope in zip(axes[row], scopes):
      for i, label in enumerate(labels):
        mine = [p for p in points if p.cell == label and scope in p.gain]
        ax.scatter([p.drift(predictor) for p in mine], [p.gain[scope] for p in mine], color=f"C{i % 10}",
                   marker="osD^v<>"[i // 10 % 7], label=label)
      fit = fits.get((predictor, scope))
      if fit is not None:
        xs = np.linspace(0.0, max(p.drift(predictor) for p in points), 50)
        ax.plot(xs, fit.intercept + fit.slope * xs, "k--", lw=1)
        ax.set_title(f"{scope}: g = {fit.intercept:.1f} {fit.slope:+.1f} x, R² {fit.r_squared:.2f} ({fit.n} runs)",
                     fontsize=9)
      ax.axhline(0.0, color="grey", lw=0.8)
      ax.set_xlabel("x: " + PREDICTORS[predictor], fontsize=8)
      ax.grid(alpha=0.3)
    axes[row][0].set_ylabel("g = no_reindex − reindex (points)")
  handles, names = axes[0][0].get_legend_handles_labels()
  figure.legend(handles, names, loc="center right", fontsize=7)
  figure.tight_layout(rect=(0.0, 0.0, 1.0 - 1.5 / (4.6 * len(scopes) + 1.6), 1.0))
  files.atomic_save_figure(figure, path)


def _cell(row: dict | None, column: str) -> str:
  if row is None or row[column] is None:
    return "—"
  return f"{row[column]:.2f} ± {row[column + '_std']:.2f}"


def _best_compensation(rows: Sequence[dict]) -> dict | None:
  """The policy other than reindex and no_reindex with the highest mean final (``None`` if there is none)."""
  others = [r for r in rows if r["policy"] not in (REFERENCE, NOT_REINDEXING)]
  return max(others, key=lambda r: r[HEADLINE]) if others else None


def _by_cell_and_scope(rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, dict]]:
  """``{(cell, scope): {policy: row}}``, in the rows' order."""
  groups: dict[tuple[str, str], dict[str, dict]] = {}
  for row in rows:
    groups.setdefault((row["cell"], row["scope"]), {})[row["policy"]] = row
  return groups


def _recall_table(rows: Sequence[dict]) -> list[str]:
  lines = ["| cell | scope | n | reindex final | no_reindex final | no − re (paired) | best compensation: final, − re "
           "(paired) | reindex forgetting | no_reindex forgetting |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
  for (cell, scope), by_policy in _by_cell_and_scope(rows).items():
    re, no = by_policy.get(REFERENCE), by_policy.get(NOT_REINDEXING)
    best = _best_compensation(list(by_policy.values()))
    best_text = "—" if best is None else (f"`{best['policy']}`: {_cell(best, HEADLINE)}, "
                                         f"{_cell(best, 'minus_reindex')}")
    n = next(iter(by_policy.values()))["n"]
    lines.append(f"| {cell} | {scope} | {n} | {_cell(re, HEADLINE)} | {_cell(no, HEADLINE)} | "
                 f"{_cell(no, 'minus_reindex')} | {best_text} | {_cell(re, 'forgetting_mean_r1')} | "
                 f"{_cell(no, 'forgetting_mean_r1')} |")
  return lines


def _context_table(rows: Sequence[dict]) -> list[str]:
  lines = ["| cell | zero-shot | just learned | drift images | drift captions | matched cosine i2t reindex | "
           "matched cosine i2t no_reindex |", "|---|---:|---:|---:|---:|---:|---:|"]
  aware = {(r["cell"], r["policy"]): r for r in rows if r["scope"] == "task_aware"}
  for cell in dict.fromkeys(r["cell"] for r in rows):
    re, no = aware.get((cell, REFERENCE)), aware.get((cell, NOT_REINDEXING))
    lines.append(f"| {cell} | {_cell(re, 'zero_shot_mean_r1')} | {_cell(re, 'diagonal_mean_r1')} | "
                 f"{_cell(re, 'drift_images')} | {_cell(re, 'drift_captions')} | {_cell(re, 'matched_cosine_i2t')} | "
                 f"{_cell(no, 'matched_cosine_i2t')} |")
  return lines


def _policy_table(rows: Sequence[dict]) -> list[str]:
  policies = list(dict.fromkeys(r["policy"] for r in rows))
  lines = ["| cell | scope | " + " | ".join(f"`{p}`" for p in policies) + " |",
           "|---|---|" + "---:|" * len(policies)]
  for (cell, scope), by_policy in _by_cell_and_scope(rows).items():
    cells = [_cell(by_policy.get(p), HEADLINE) + ("" if p == REFERENCE or p not in by_policy else
                                                  f" ({_cell(by_policy[p], 'minus_reindex')})") for p in policies]
    lines.append(f"| {cell} | {scope} | " + " | ".join(cells) + " |")
  return lines


def _baseline_table(rows: Sequence[dict], baseline: str) -> list[str]:
  policies = (REFERENCE, NOT_REINDEXING)
  lines = ["| cell | scope | n | " + " | ".join(f"{p} final | − {baseline} (paired) | verdict" for p in policies)
           + " |", "|---|---|---:|" + "---:|---:|---|" * len(policies)]
  for (cell, scope), by_policy in _by_cell_and_scope(rows).items():
    if cell == baseline:
      continue
    cells = []
    for policy in policies:
      row = by_policy.get(policy)
      paired = "—" if row is None or row["minus_baseline"] is None else _cell(row, "minus_baseline")
      cells += [_cell(row, HEADLINE), paired, "" if row is None else row["versus_baseline"]]
    n = next(iter(by_policy.values()))["n"]
    lines.append(f"| {cell} | {scope} | {n} | " + " | ".join(cells) + " |")
  return lines


def _fit_lines(fits: dict[tuple[str, str, str], LineFit | None]) -> list[str]:
  lines = []
  for (predictor, scope, unit), fit in fits.items():
    x = PREDICTORS[predictor].split(" = ")[0]
    y = "g" if unit == "points" else "100 g / reindex"
    if fit is None:
      lines.append(f"- {scope}, {predictor}, {y}: too few runs (or one drift value) to fit a line.")
      continue
    lines.append(f"- {scope}, {predictor}: {y} ≈ {fit.intercept:.2f} {fit.slope:+.2f} · {x} over {fit.n} runs, "
                 f"R² = {fit.r_squared:.2f}.")
  return lines


def _gain_table(points: Sequence[DriftPoint]) -> list[str]:
  scopes = _scopes(points)
  lines = ["| cell | n | δ | δ_min | " + " | ".join(f"g {s} | 100 g / reindex {s}" for s in scopes) + " |",
           "|---|---:|---:|---:|" + "---:|---:|" * len(scopes)]
  for cell in dict.fromkeys(p.cell for p in points):
    mine = [p for p in points if p.cell == cell]
    cells = [compare.mean_std([p.drift(predictor) for p in mine]) for predictor in PREDICTORS]
    for scope in scopes:
      relative = [p.relative_gain(scope) if scope in p.gain else None for p in mine]
      cells += [compare.mean_std([p.gain.get(scope) for p in mine]), compare.mean_std(relative)]
    text = ["—" if mean is None else f"{mean:.2f} ± {std:.2f}" for mean, std in cells]
    lines.append(f"| {cell} | {len(mine)} | " + " | ".join(text) + " |")
  return lines


def _baseline_section(rows: Sequence[dict], baseline: str | None) -> list[str]:
  if baseline is None:
    return []
  return [f"## Against `{baseline}` (paired by seed)", "",
          f"− {baseline} (paired) = mean ± std over the seeds both cells ran of the per-seed difference of finals. "
          "A gain or a loss only where it exceeds both cells' stds over seeds (≥ 2 seeds each).", "",
          *_baseline_table(rows, baseline), ""]


def study_markdown(cells: Sequence[Cell], rows: Sequence[dict], points: Sequence[DriftPoint],
                   fits: dict[tuple[str, str, str], LineFit | None], fit_cells: Sequence[str] | None,
                   baseline: str | None = None) -> str:
  """The tables of ``study.md``: recall per cell and scope, against the baseline, context, every policy, the fit."""
  lines = ["# Study", "", "Mean ± sample std (ddof = 1) over each cell's n runs (seeds). Final = mean over tasks k of "
           "R[T-1][k] of mean R@1 = (i2t R@1 + t2i R@1)/2, in percent; \"− re (paired)\" is the mean ± std of the "
           "per-run difference to reindex. Drift = mean cosine of an old item's S_k and S_final vectors; "
           "matched cosine = S_final image query to its own caption in the searched gallery.", "",
           "## Recall", "", *_recall_table(rows), "", *_baseline_section(rows, baseline),
           "## Context (task-aware)", "", *_context_table(rows), "",
           "## Every policy (final, and − reindex paired)", "", *_policy_table(rows), "",
           "## Gain of not re-indexing against drift", "",
           "Every run (gain_vs_drift.csv): g = no_reindex − reindex final mean R@1 against "
           + " and ".join(PREDICTORS.values()) + ", cos = an old item's mean cosine between S_k and S_final.", "",
           *_gain_table(points), "",
           "Least-squares lines over " + ("every run" if fit_cells is None else "the runs of " + ", ".join(fit_cells))
           + ":", "", *_fit_lines(fits), "", "![gain against drift](gain_vs_drift.png)", "", "## Cells", "",
           "| cell | folder | runs |", "|---|---|---|"]
  lines += [f"| {c.label} | `{c.folder}` | {', '.join(os.path.basename(r.workdir) for r in c.runs)} |" for c in cells]
  return "\n".join(lines) + "\n"


def write_study(cells: Sequence[Cell], out_dir: str, fit_cells: Sequence[str] | None = None,
                baseline: str | None = None) -> list[str]:
  """Writes :data:`OUTPUT_NAMES` into ``out_dir`` and returns their paths.

  Args:
    cells: the loaded cells (:func:`load_cells`).
    out_dir: the folder to write; created if needed.
    fit_cells: labels of the cells the gain-against-drift lines are fitted to (``None``: all).
    baseline: label of the cell the others are set against (:func:`add_baseline_columns`); ``None``: none.

  Raises:
    StudyError: ``fit_cells`` or ``baseline`` names a cell that is not among ``cells``.
  """
  unknown = sorted(set(fit_cells or ()) - {cell.label for cell in cells})
  if unknown:
    raise StudyError(f"--fit_cells names {unknown}, which are not cells; the cells are "
                     f"{[cell.label for cell in cells]}")
  rows = [row for cell in cells for row in cell_rows(cell)]
  columns = CSV_COLUMNS
  if baseline is not None:
    rows, columns = add_baseline_columns(cells, rows, baseline), CSV_COLUMNS + BASELINE_COLUMNS
  points = drift_points(cells)
  fits = drift_fits(points, fit_cells)
  paths = [os.path.join(out_dir, name) for name in OUTPUT_NAMES]
  files.atomic_write_text(paths[0], study_markdown(cells, rows, points, fits, fit_cells, baseline))
  files.atomic_write_text(paths[1], compare.csv_text(rows, columns))
  _plot_gain_vs_drift(points, {key[:2]: fit for key, fit in fits.items() if key[2] == "points"}, paths[2])
  files.atomic_write_text(paths[3], _points_csv(points))
  return paths


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command's flags on ``flag_values`` (the command calls it once, before parsing)."""
  flags.DEFINE_list("cells", None, "Comma-separated LABEL=DIR: a sweep folder of one setting's seeded runs, or one "
                    "run's workdir.", flag_values=flag_values, required=True)
  flags.DEFINE_string("out", None, "Folder for study.md, study.csv and gain_vs_drift.png/.csv.",
                      flag_values=flag_values, required=True)
  flags.DEFINE_list("fit_cells", None, "Labels of the cells whose runs the gain-against-drift lines are fitted "
                    "to (default: every cell); every run is still plotted and tabled.", flag_values=flag_values)
  flags.DEFINE_string("baseline", None, "Label of the cell every other cell is set against, paired by seed "
                      "(e.g. finetune in a strategy table); default: none.", flag_values=flag_values)


@cli.exits_on_user_error()
def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cells = load_cells(flag_values["cells"].value)
  fit_cells, baseline = flag_values["fit_cells"].value, flag_values["baseline"].value
  cli.write_outputs(lambda out: write_study(cells, out, fit_cells, baseline), flag_values["out"].value)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
