"""Results as files: ``results.json``, ``report.md`` and PNG plots.

``results.json`` holds, for each indexing policy and metric, the matrix
``R[t][k]`` (after training task ``t``, on task ``k``'s test queries; ``null``
for ``k > t``) and its summary (final average, forgetting, BWT; see
:func:`ccmr_jax.metrics.continual_summary` for the definitions).
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ccmr_jax import files, metrics, policies  # noqa: E402
from ccmr_jax import workdir as layout  # noqa: E402

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
    "no_reindex+KIND": "the kept gallery of S_k, searched by S_t's queries moved into S_k's space by a map of KIND "
                       "(shift, linear, residual, procrustes) fitted after task t on task t's training data (and the "
                       "replay memory)",
    "remap_KIND": "the kept gallery of S_k moved into S_t's space by a map of KIND (linear, residual) fitted on "
                  "the same data; no encoder pass",
    "reindexing_cost": "per policy, over the run: gallery items (images + captions) passed through an encoder and the "
                       "seconds it took, and the drift maps' fit (its items encoded by S_t and each older snapshot)",
    "task_aware": "queries of task k search task k's gallery only",
    "task_agnostic": "queries of task k search the union of every seen task's gallery (policies, per part)",
    "zero_shot[k]": "R[-1][k]: the starting encoders (before task 0) on task k's queries and gallery, task-aware",
}


def evaluated_policies(evaluations: Sequence[dict]) -> list[str]:
  """The policies of :data:`ccmr_jax.policies.POLICY_NAMES` every evaluation holds (a run evaluated before a
  policy existed lacks it)."""
  return [p for p in policies.POLICY_NAMES if all(p in e[scope] for e in evaluations for scope in metrics.SCOPES)]


def _policy_summaries(evaluations: Sequence[dict], scope: str, metric_names: Sequence[str]) -> dict:
  num_done = len(evaluations)
  summaries = {}
  for policy in evaluated_policies(evaluations):
    per_metric = {}
    for metric in metric_names:
      matrix = np.full((num_done, num_done), np.nan)
      for t, evaluation in enumerate(evaluations):
        for k in range(t + 1):
          matrix[t, k] = evaluation[scope][policy][str(k)].get(metric, 1.0 if metric == metrics.ANN_AGREEMENT else np.nan)
      per_metric[metric] = {
          "matrix": [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in matrix],
          **metrics.continual_summary(matrix),
      }
    summaries[policy] = per_metric
  return summaries


def build_results(evaluations: Sequence[dict], metric_names: Sequence[str], run_info: dict,
                  zero_shot: dict | None = None) -> dict:
  """Assembles per-task evaluations ``[{scope: {policy: {k: {metric: value}}}}]`` into the results document.

  Task-aware results go under ``policies``, task-agnostic ones under
  ``policies_agnostic``; ``zero_shot`` (``{str(k): metrics}`` of the starting
  encoders on every task) goes under ``zero_shot`` as ``{metric: [R[-1][k] for k]}``.
  """
  out = {**run_info, "tasks_trained": len(evaluations), "definitions": DEFINITIONS}
  if zero_shot:
    out["zero_shot"] = {metric: [round(float(zero_shot[str(k)][metric]), 4) for k in range(len(zero_shot))]
                        for metric in metric_names}
  for scope, key in metrics.SCOPES.items():
    approximate = any(metrics.ANN_AGREEMENT in m for e in evaluations for p in e[scope].values() for m in p.values())
    out[key] = _policy_summaries(evaluations, scope, [*metric_names, *([metrics.ANN_AGREEMENT] if approximate else [])])
  out["reindexing_cost"] = reindexing_cost(evaluations)
  return out


def reindexing_cost(evaluations: Sequence[dict]) -> dict:
  """Per policy, what keeping its galleries searchable cost over the run (from each evaluation's ``cost``).

  ``gallery_items_encoded``: images + captions of every gallery the policy
  passes through an encoder (``reindex``: every seen gallery after every task;
  the others: each gallery once, when its task ends), ``gallery_encode_s``
  the seconds those passes took; ``fit_items_encoded`` / ``fit_s``: the drift
  maps' fit data encoded by ``S_t`` and every older snapshot after each task
  ``t > 0``, and the seconds of encoding and fitting (policies that apply a
  map only). Index building is not counted. Empty when an evaluation predates
  the cost record.
  """
  if not evaluations or any("cost" not in e for e in evaluations):
    return {}
  out = {}
  for name in evaluated_policies(evaluations):
    policy = policies.get(name)
    totals = dict.fromkeys(("gallery_items_encoded", "gallery_encode_s", "fit_items_encoded", "fit_s"), 0)
    for t, evaluation in enumerate(evaluations):
      cost = evaluation["cost"]
      for k in range(t + 1):
        if policy.encodes_gallery(k, t):
          totals["gallery_items_encoded"] += cost["items"][k]
          totals["gallery_encode_s"] += cost["embed_s"][k]
      if policy.maps_needed():
        totals["fit_items_encoded"] += cost["fit"]["items"]
        totals["fit_s"] += cost["fit"]["embed_s"] + cost["fit"]["solve_s"]
    totals["total_items_encoded"] = totals["gallery_items_encoded"] + totals["fit_items_encoded"]
    totals["total_s"] = totals["gallery_encode_s"] + totals["fit_s"]
    out[name] = {key: round(value, 3) for key, value in totals.items()}
  return out


def cost_section(results: dict) -> list[str]:
  """Report lines: the price of re-indexing beside each policy's final mean R@1."""
  lines = ["## The price of re-indexing", "",
           "| policy | gallery items encoded | gallery encoding s | fit items encoded | fit s | "
           "final mean R@1 task-aware | task-agnostic |", "|---|---:|---:|---:|---:|---:|---:|"]
  for policy, cost in results["reindexing_cost"].items():
    finals = [results.get(key, {}).get(policy, {}).get(metrics.HEADLINE, {}).get("final_average")
              for key in metrics.SCOPES.values()]
    lines.append(f"| {policy} | {cost['gallery_items_encoded']:.0f} | {cost['gallery_encode_s']:.2f} | "
                 f"{cost['fit_items_encoded']:.0f} | {cost['fit_s']:.2f} | {_fmt(finals[0])} | {_fmt(finals[1])} |")
  return lines + ["", "Encoder passes count images + captions; index building is not counted.", ""]


def summary_rows(results: dict, metric_names: Sequence[str]) -> list[tuple[str, str, str, float, float | None, float | None]]:
  rows = []
  for scope, key in metrics.SCOPES.items():
    for policy, per_metric in results[key].items():
      for metric in metric_names:
        m = per_metric[metric]
        rows.append((scope, policy, metric, m["final_average"], m["forgetting"], m["bwt"]))
  return rows


def _fmt(value) -> str:
  return "—" if value is None else f"{value:.2f}"


def summary_table(results: dict, metric_names: Sequence[str] = ("i2t_r1", "t2i_r1", "mean_r1")) -> str:
  """Markdown table: scope × policy × metric → final average, forgetting, BWT."""
  lines = ["| scope | policy | metric | final average | forgetting | BWT |", "|---|---|---|---:|---:|---:|"]
  for scope, policy, metric, final, forgetting, bwt in summary_rows(results, metric_names):
    lines.append(f"| {scope} | {policy} | {metric} | {_fmt(final)} | {_fmt(forgetting)} | {_fmt(bwt)} |")
  return "\n".join(lines)


def matrix_table(matrix: list[list[float | None]], task_names: Sequence[str],
                 row_labels: Sequence[str] | None = None) -> str:
  """Markdown table of ``R[t][k]``: a row per ``t`` (labelled ``t``, or by ``row_labels``), a column per task."""
  columns = len(matrix[0]) if matrix else 0
  header = "| after task \\ on task | " + " | ".join(f"{k}: {n}" for k, n in enumerate(task_names[:columns])) + " |"
  lines = [header, "|---" * (columns + 1) + "|"]
  for t, row in enumerate(matrix):
    lines.append(f"| {row_labels[t] if row_labels else t} | " + " | ".join(_fmt(v) for v in row) + " |")
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


def examples_section(examples: list[dict]) -> list[str]:
  """Report lines: for each fixed test query of task 0, its top-5 after task 0 and after the last task.

  A hit reads ``+ id`` when it is a ground-truth match, ``- id`` when not (id: the image, or the image the
  retrieved caption describes); ``plots/examples.png`` shows the same.
  """
  parts = ["## Examples: what forgetting does to a result list (task 0's test queries, task-aware)", ""]
  for entry in examples:
    query = entry["query"]
    what = f"caption {query['text']!r}" if query["direction"] == "t2i" else f"image {query['image_id']}"
    parts += [f"Query: {what} ({query['direction']}).", "", "| after task | policy | top 5 |", "|---|---|---|"]
    for row in entry["rows"]:
      hits = " ".join(("+" if h["correct"] else "-") + str(h["image_id"]) for h in row["hits"])
      parts.append(f"| {row['after_task']} | {row['policy']} | {hits} |")
    parts.append("")
  return parts


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
  if "zero_shot" in results:
    parts += ["## Zero-shot: the starting encoders on every task (task-aware, mean R@1)", "",
              matrix_table([results["zero_shot"][metrics.HEADLINE]], names, ["zero-shot"]),
              ""]
  for scope, key in metrics.SCOPES.items():
    for policy, per_metric in results[key].items():
      parts += [f"## {scope}, `{policy}`: mean R@1 matrix", "",
                matrix_table(per_metric[metrics.HEADLINE]["matrix"], names), "",
                f"rsum matrix ({scope}, {policy}):", "", matrix_table(per_metric["rsum"]["matrix"], names), ""]
  if results.get("reindexing_cost"):
    parts += cost_section(results)
  if "analysis_summary" in results:
    parts += analysis_section(results["analysis_summary"])
  if results.get("examples"):
    parts += examples_section(results["examples"])
  parts += ["## Plots", ""] + ([f"![{os.path.basename(p)}]({os.path.relpath(p, workdir)})" for p in plot_paths]
                               or [f"Not drawn: the run had {PLOTS_ENV_VAR}=0. Rerun the same command without it "
                                   "to draw them (nothing is trained or evaluated again)."])
  parts += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
  path = layout.report_path(workdir)
  files.atomic_write_text(path, "\n".join(parts) + "\n")
  return path


PLOTS_ENV_VAR = "CCMR_JAX_PLOTS"


def plots_enabled() -> bool:
  """Whether runs draw their PNG figures: ``$CCMR_JAX_PLOTS`` unset or ``1``, not ``0``.

  Drawing them takes about 7 s per run whatever its size (matplotlib lays out about
  200 axes); sweeps of many small runs, and the test suite, may skip it. ``results.json``
  and ``report.md`` hold every number either way.

  Raises:
    ValueError: any other value.
  """
  value = os.environ.get(PLOTS_ENV_VAR, "1").strip()
  if value not in ("0", "1"):
    raise ValueError(f"{PLOTS_ENV_VAR}={value!r}: set it to 1 (draw the plots, the default) or 0 (skip them)")
  return value == "1"


def _save_figure(fig, path: str) -> None:
  files.atomic_save_figure(fig, path)
  plt.close(fig)


def plot_results(results: dict, workdir: str, metric: str = metrics.HEADLINE) -> list[str]:
  """Recall-matrix heatmaps, per-task curves (rows are scopes, columns policies) and the price of re-indexing."""
  columns = [p for p in policies.POLICY_NAMES if p in results[metrics.SCOPES["task_aware"]]]
  scopes = [scope for scope, key in metrics.SCOPES.items() if key in results]
  names = [t["name"] for t in results["tasks"]]
  num = results["tasks_trained"]

  def matrix_of(scope, policy):
    rows = results[metrics.SCOPES[scope]][policy][metric]["matrix"]
    return np.array([[np.nan if v is None else v for v in row] for row in rows])

  fig, axes = plt.subplots(len(scopes), len(columns), figsize=(5.2 * len(columns), 4 * len(scopes)),
                           squeeze=False, layout="constrained")
  for row, scope in enumerate(scopes):
    for ax, policy in zip(axes[row], columns):
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
  matrix_path = os.path.join(layout.plots_dir(workdir), "recall_matrix.png")
  _save_figure(fig, matrix_path)

  fig, axes = plt.subplots(len(scopes), len(columns), figsize=(5.2 * len(columns), 3.6 * len(scopes)),
                           squeeze=False, sharey=True, layout="constrained")
  for row, scope in enumerate(scopes):
    for ax, policy in zip(axes[row], columns):
      matrix = matrix_of(scope, policy)
      for k in range(num):
        ts = list(range(k, num))
        line, = ax.plot(ts, [matrix[t, k] for t in ts], marker="o", label=f"task {k}: {names[k]}")
        if "zero_shot" in results:  # the starting encoders, drawn at t = -1
          ax.plot([-1, k], [results["zero_shot"][metric][k], matrix[k, k]], ls=":", marker="s", color=line.get_color())
      ax.set_title(f"{scope}, {policy}: {metric} of each task")
      ax.set_xlabel("after training task t (-1: zero-shot)" if "zero_shot" in results else "after training task t")
      ax.set_xticks(range(-1 if "zero_shot" in results else 0, num))
      ax.grid(alpha=0.3)
    axes[row][0].set_ylabel(metric)
  axes[0][-1].legend(fontsize=7, loc="best")
  curves_path = os.path.join(layout.plots_dir(workdir), "task_curves.png")
  _save_figure(fig, curves_path)
  paths = [matrix_path, curves_path]
  if results.get("reindexing_cost"):
    paths.append(plot_reindexing_cost(results, os.path.join(layout.plots_dir(workdir), "reindexing_cost.png"),
                                      metric))
  return paths


def plot_reindexing_cost(results: dict, path: str, metric: str = metrics.HEADLINE) -> str:
  """Final average ``metric`` against the encoder passes each policy spent (gallery + maps' fit), per scope."""
  fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
  for scope, key, marker in zip(metrics.SCOPES, metrics.SCOPES.values(), ("o", "s")):
    for n, (policy, cost) in enumerate(results["reindexing_cost"].items()):
      final = results.get(key, {}).get(policy, {}).get(metric, {}).get("final_average")
      if final is not None:
        ax.scatter(cost["total_items_encoded"], final, marker=marker, color=f"C{n}",
                   label=f"{policy}" if scope == "task_aware" else None)
  ax.set_xlabel("items passed through an encoder for galleries and maps over the run (images + captions)")
  ax.set_ylabel(f"final average {metric} (o task-aware, s task-agnostic)")
  ax.set_title("The price of re-indexing")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  _save_figure(fig, path)
  return path


def tensorboard_tag(name: str) -> str:
  """``name`` with every character outside ``[-/\\w.]`` as ``_`` and no leading ``/``: the tag TensorBoard would
  make of it, without its log line per renamed scalar (192 lines in a tiny run)."""
  return re.sub(r"[^-/\w.]", "_", name).lstrip("/")


class TensorBoard:
  """Scalars to ``workdir/tensorboard``, written by one process only (``enabled``).

  For a cloud workdir the event files are written locally and uploaded by
  :meth:`sync` (after every task, and at the end).
  """

  def __init__(self, target: str, enabled: bool = True):
    self.writer = None
    self.target = target
    if enabled:
      from tensorboardX import SummaryWriter
      self.local = tempfile.mkdtemp(prefix="ccmr_tensorboard_") if files.is_remote(target) else target
      self.writer = SummaryWriter(self.local)

  def scalars(self, step: int, values: dict, prefix: str) -> None:
    """Writes ``prefix/name`` for each value; characters a tag may not hold (``+`` of policy names) become ``_``."""
    if self.writer is not None:
      for name, value in values.items():
        self.writer.add_scalar(tensorboard_tag(f"{prefix}/{name}"), value, step)
      self.writer.flush()

  def sync(self) -> None:
    if self.writer is not None and self.local != self.target:
      for name in os.listdir(self.local):
        with open(os.path.join(self.local, name), "rb") as f:
          files.atomic_write_bytes(os.path.join(self.target, name), f.read())

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.sync()


def machine_info() -> dict:
  """The CPU (model, the vector ISAs floats depend on), cores and library versions: numbers are tied to them."""
  model, flags = platform.processor() or "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  import jax  # the report stage itself is jax-free; only this record names the backend

  return {"cpu": model, "isa": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
          "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "numpy": np.__version__, "backend": jax.default_backend()}
