"""Results as files: ``results.json``, ``report.md`` and PNG plots.

``results.json`` holds, for each indexing policy and metric, the matrix
``R[t][k]`` (after training task ``t``, on task ``k``'s test queries; ``null``
for ``k > t``) and its summary (final average, forgetting, BWT; see
:func:`ccmr_jax.evaluate.continual_summary` for the definitions).
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ccmr_jax import evaluate, files  # noqa: E402

DEFINITIONS = {
    "R[t][k]": "metric on task k's test queries after training task t; null for k > t",
    "recall@K": "percent of queries with a correct item in the top K (identical caption texts count as the same caption)",
    "rsum": "i2t R@1+R@5+R@10 + t2i R@1+R@5+R@10",
    "mean_r1": "(i2t R@1 + t2i R@1) / 2, the headline metric",
    "ann_agreement": "with an approximate index: recall of its top-K against exact top-K, mean of i2t and t2i (1 for exact)",
    "final_average": "mean over k of R[T-1][k]",
    "forgetting": "mean over k < T-1 of (max over k <= t < T-1 of R[t][k]) - R[T-1][k] (Chaudhry et al.)",
    "bwt": "mean over k < T-1 of R[T-1][k] - R[k][k] (Lopez-Paz & Ranzato)",
    "reindex": "after task t every seen gallery is embedded with snapshot S_t",
    "no_reindex": "the gallery of task k is embedded once with S_k and kept; queries use S_t",
    "task_aware": "queries of task k search task k's gallery only",
    "task_agnostic": "queries of task k search the union of every seen task's gallery (policies, per part)",
}


RESULT_KEYS = {"task_aware": "policies", "task_agnostic": "policies_agnostic"}


def _policy_summaries(evaluations: Sequence[dict], scope: str, metrics: Sequence[str]) -> dict:
  num_done = len(evaluations)
  policies = {}
  for policy in evaluate.POLICIES:
    per_metric = {}
    for metric in metrics:
      matrix = np.full((num_done, num_done), np.nan)
      for t, evaluation in enumerate(evaluations):
        for k in range(t + 1):
          matrix[t, k] = evaluation[scope][policy][str(k)].get(metric, 1.0 if metric == evaluate.ANN_AGREEMENT else np.nan)
      per_metric[metric] = {
          "matrix": [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in matrix],
          **evaluate.continual_summary(matrix),
      }
    policies[policy] = per_metric
  return policies


def build_results(evaluations: Sequence[dict], metrics: Sequence[str], run_info: dict) -> dict:
  """Assembles per-task evaluations ``[{scope: {policy: {k: {metric: value}}}}]`` into the results document.

  Task-aware results go under ``policies``, task-agnostic ones under ``policies_agnostic``.
  """
  out = {**run_info, "tasks_trained": len(evaluations), "definitions": DEFINITIONS}
  for scope, key in RESULT_KEYS.items():
    approximate = any(evaluate.ANN_AGREEMENT in m for e in evaluations for p in e[scope].values() for m in p.values())
    out[key] = _policy_summaries(evaluations, scope, [*metrics, *([evaluate.ANN_AGREEMENT] if approximate else [])])
  return out


def summary_rows(results: dict, metrics: Sequence[str]) -> list[tuple[str, str, str, float, float | None, float | None]]:
  rows = []
  for scope, key in RESULT_KEYS.items():
    for policy, per_metric in results[key].items():
      for metric in metrics:
        m = per_metric[metric]
        rows.append((scope, policy, metric, m["final_average"], m["forgetting"], m["bwt"]))
  return rows


def _fmt(value) -> str:
  return "—" if value is None else f"{value:.2f}"


def summary_table(results: dict, metrics: Sequence[str] = ("i2t_r1", "t2i_r1", "mean_r1")) -> str:
  """Markdown table: scope × policy × metric → final average, forgetting, BWT."""
  lines = ["| scope | policy | metric | final average | forgetting | BWT |", "|---|---|---|---:|---:|---:|"]
  for scope, policy, metric, final, forgetting, bwt in summary_rows(results, metrics):
    lines.append(f"| {scope} | {policy} | {metric} | {_fmt(final)} | {_fmt(forgetting)} | {_fmt(bwt)} |")
  return "\n".join(lines)


def matrix_table(matrix: list[list[float | None]], task_names: Sequence[str]) -> str:
  header = "| after task \\ on task | " + " | ".join(f"{k}: {n}" for k, n in enumerate(task_names[: len(matrix)])) + " |"
  lines = [header, "|---" * (len(matrix) + 1) + "|"]
  for t, row in enumerate(matrix):
    lines.append(f"| {t} | " + " | ".join(_fmt(v) for v in row) + " |")
  return "\n".join(lines)


def analysis_section(summary: dict) -> list[str]:
  """Markdown lines for :func:`ccmr_jax.analysis.summarize_analysis`'s headline numbers."""
  lines = ["## Forgetting analysis (after the last task)", "",
           "Drift of old tasks' test items from their own snapshot `S_k` to the final one (mean over k):", "",
           "| modality | mean cosine | kNN overlap |", "|---|---:|---:|"]
  for modality, stats in summary["drift_to_final"].items():
    lines.append(f"| {modality} | {_fmt3(stats['mean_cosine'])} | {_fmt3(stats['knn_overlap'])} |")
  lines += ["", "Query–gallery pairs each policy actually searches (mean over tasks):", "",
            "| policy | direction | matched cosine | modality gap | top-1 in another task (task-agnostic) |",
            "|---|---|---:|---:|---:|"]
  for policy, per_direction in summary["final_matched_cosine"].items():
    for direction, matched in per_direction.items():
      lines.append(f"| {policy} | {direction} | {_fmt3(matched)} | "
                   f"{_fmt3(summary['final_modality_gap'][policy][direction])} | "
                   f"{_fmt3(summary['final_top1_other_task'][policy][direction])} |")
  return lines + [""]


def _fmt3(value) -> str:
  return "—" if value is None else f"{value:.3f}"


def write_report(results: dict, workdir: str, plot_paths: Sequence[str]) -> str:
  """Writes ``report.md`` (tables and plots) and returns its path."""
  names = [t["name"] for t in results["tasks"]]
  parts = [
      f"# Continual retrieval report — {results['config']['data']['source']}, strategy `{results['config']['train']['strategy']}`",
      "",
      f"Tasks trained: {results['tasks_trained']} of {len(names)}. Headline: `mean_r1` = (i2t R@1 + t2i R@1)/2.",
      "",
      "## Summary",
      "",
      summary_table(results),
      "",
  ]
  for scope, key in RESULT_KEYS.items():
    for policy, per_metric in results[key].items():
      parts += [f"## {scope}, `{policy}`: mean R@1 matrix", "",
                matrix_table(per_metric[evaluate.HEADLINE]["matrix"], names), "",
                f"rsum matrix ({scope}, {policy}):", "", matrix_table(per_metric["rsum"]["matrix"], names), ""]
  if "analysis_summary" in results:
    parts += analysis_section(results["analysis_summary"])
  parts += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, workdir)})" for p in plot_paths]
  parts += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
  path = os.path.join(workdir, "report.md")
  files.atomic_write_text(path, "\n".join(parts) + "\n")
  return path


def _save_figure(fig, path: str) -> None:
  files.atomic_save_figure(fig, path)
  plt.close(fig)


def plot_results(results: dict, workdir: str, metric: str = evaluate.HEADLINE) -> list[str]:
  """Recall-matrix heatmaps and per-task curves: rows are scopes, columns policies."""
  policies = list(evaluate.POLICIES)
  scopes = [scope for scope, key in RESULT_KEYS.items() if key in results]
  names = [t["name"] for t in results["tasks"]]
  num = results["tasks_trained"]

  def matrix_of(scope, policy):
    rows = results[RESULT_KEYS[scope]][policy][metric]["matrix"]
    return np.array([[np.nan if v is None else v for v in row] for row in rows])

  fig, axes = plt.subplots(len(scopes), len(policies), figsize=(5.2 * len(policies), 4 * len(scopes)),
                           squeeze=False, layout="constrained")
  for row, scope in enumerate(scopes):
    for ax, policy in zip(axes[row], policies):
      matrix = matrix_of(scope, policy)
      top = max(1.0, np.nanmax(matrix))
      image = ax.imshow(matrix, vmin=0, vmax=top, cmap="viridis")
      for t in range(num):
        for k in range(t + 1):
          ax.text(k, t, f"{matrix[t, k]:.1f}", ha="center", va="center", fontsize=8,
                  color="w" if matrix[t, k] < 0.6 * top else "k")
      ax.set_title(f"{scope}, {policy}: {metric}")
      ax.set_xlabel("evaluated on task k")
      ax.set_ylabel("after training task t")
      ax.set_xticks(range(num))
      ax.set_yticks(range(num))
      fig.colorbar(image, ax=ax, fraction=0.046)
  matrix_path = os.path.join(workdir, "plots", "recall_matrix.png")
  _save_figure(fig, matrix_path)

  fig, axes = plt.subplots(len(scopes), len(policies), figsize=(5.2 * len(policies), 3.6 * len(scopes)),
                           squeeze=False, sharey=True, layout="constrained")
  for row, scope in enumerate(scopes):
    for ax, policy in zip(axes[row], policies):
      matrix = matrix_of(scope, policy)
      for k in range(num):
        ts = list(range(k, num))
        ax.plot(ts, [matrix[t, k] for t in ts], marker="o", label=f"task {k}: {names[k]}")
      ax.set_title(f"{scope}, {policy}: {metric} of each task")
      ax.set_xlabel("after training task t")
      ax.set_xticks(range(num))
      ax.grid(alpha=0.3)
    axes[row][0].set_ylabel(metric)
  axes[0][-1].legend(fontsize=7, loc="best")
  curves_path = os.path.join(workdir, "plots", "task_curves.png")
  _save_figure(fig, curves_path)
  return [matrix_path, curves_path]
