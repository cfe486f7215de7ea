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
    "final_average": "mean over k of R[T-1][k]",
    "forgetting": "mean over k < T-1 of (max over k <= t < T-1 of R[t][k]) - R[T-1][k] (Chaudhry et al.)",
    "bwt": "mean over k < T-1 of R[T-1][k] - R[k][k] (Lopez-Paz & Ranzato)",
    "reindex": "after task t every seen gallery is embedded with snapshot S_t",
    "no_reindex": "the gallery of task k is embedded once with S_k and kept; queries use S_t",
}


def build_results(evaluations: Sequence[dict], metrics: Sequence[str], run_info: dict) -> dict:
  """Assembles per-task evaluations ``[{policy: {k: {metric: value}}}]`` into the results document."""
  num_done = len(evaluations)
  policies = {}
  for policy in evaluate.POLICIES:
    per_metric = {}
    for metric in metrics:
      matrix = np.full((num_done, num_done), np.nan)
      for t, evaluation in enumerate(evaluations):
        for k in range(t + 1):
          matrix[t, k] = evaluation[policy][str(k)][metric]
      per_metric[metric] = {
          "matrix": [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in matrix],
          **evaluate.continual_summary(matrix),
      }
    policies[policy] = per_metric
  return {**run_info, "tasks_trained": num_done, "definitions": DEFINITIONS, "policies": policies}


def summary_rows(results: dict, metrics: Sequence[str]) -> list[tuple[str, str, float, float | None, float | None]]:
  rows = []
  for policy, per_metric in results["policies"].items():
    for metric in metrics:
      m = per_metric[metric]
      rows.append((policy, metric, m["final_average"], m["forgetting"], m["bwt"]))
  return rows


def _fmt(value) -> str:
  return "—" if value is None else f"{value:.2f}"


def summary_table(results: dict, metrics: Sequence[str] = ("i2t_r1", "t2i_r1", "mean_r1", "rsum")) -> str:
  """Markdown table: policy × metric → final average, forgetting, BWT."""
  lines = ["| policy | metric | final average | forgetting | BWT |", "|---|---|---:|---:|---:|"]
  for policy, metric, final, forgetting, bwt in summary_rows(results, metrics):
    lines.append(f"| {policy} | {metric} | {_fmt(final)} | {_fmt(forgetting)} | {_fmt(bwt)} |")
  return "\n".join(lines)


def matrix_table(matrix: list[list[float | None]], task_names: Sequence[str]) -> str:
  header = "| after task \\ on task | " + " | ".join(f"{k}: {n}" for k, n in enumerate(task_names[: len(matrix)])) + " |"
  lines = [header, "|---" * (len(matrix) + 1) + "|"]
  for t, row in enumerate(matrix):
    lines.append(f"| {t} | " + " | ".join(_fmt(v) for v in row) + " |")
  return "\n".join(lines)


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
  for policy, per_metric in results["policies"].items():
    parts += [f"## `{policy}`: mean R@1 matrix", "", matrix_table(per_metric[evaluate.HEADLINE]["matrix"], names), "",
              f"rsum matrix ({policy}):", "", matrix_table(per_metric["rsum"]["matrix"], names), ""]
  parts += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, workdir)})" for p in plot_paths]
  parts += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
  path = os.path.join(workdir, "report.md")
  files.atomic_write_text(path, "\n".join(parts) + "\n")
  return path


def _save_figure(fig, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def plot_results(results: dict, workdir: str, metric: str = evaluate.HEADLINE) -> list[str]:
  """Recall-matrix heatmaps and per-task curves, one column per policy."""
  policies = list(results["policies"])
  names = [t["name"] for t in results["tasks"]]
  num = results["tasks_trained"]
  fig, axes = plt.subplots(1, len(policies), figsize=(4.6 * len(policies), 4), squeeze=False)
  for ax, policy in zip(axes[0], policies):
    matrix = np.array([[np.nan if v is None else v for v in row] for row in results["policies"][policy][metric]["matrix"]])
    image = ax.imshow(matrix, vmin=0, vmax=max(1.0, np.nanmax(matrix)), cmap="viridis")
    for t in range(num):
      for k in range(t + 1):
        ax.text(k, t, f"{matrix[t, k]:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(f"{policy}: {metric}")
    ax.set_xlabel("evaluated on task k")
    ax.set_ylabel("after training task t")
    ax.set_xticks(range(num))
    ax.set_yticks(range(num))
    fig.colorbar(image, ax=ax, fraction=0.046)
  matrix_path = os.path.join(workdir, "plots", "recall_matrix.png")
  _save_figure(fig, matrix_path)

  fig, axes = plt.subplots(1, len(policies), figsize=(4.6 * len(policies), 3.6), squeeze=False, sharey=True)
  for ax, policy in zip(axes[0], policies):
    matrix = results["policies"][policy][metric]["matrix"]
    for k in range(num):
      ts = list(range(k, num))
      ax.plot(ts, [matrix[t][k] for t in ts], marker="o", label=f"task {k}: {names[k]}")
    ax.set_title(f"{policy}: {metric} of each task")
    ax.set_xlabel("after training task t")
    ax.set_xticks(range(num))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(metric)
  axes[0][-1].legend(fontsize=7, loc="best")
  curves_path = os.path.join(workdir, "plots", "task_curves.png")
  _save_figure(fig, curves_path)
  return [matrix_path, curves_path]
