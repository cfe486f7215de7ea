"""Gallery search: ScaNN (the project's searcher) against exact search and faiss, as recall–QPS frontiers.

  python -m benchmarks.search --plot=docs/figures/search_frontier.png   # 600,000 x 256, 5,000 queries
  python -m benchmarks.search --quick

Data that look like real embeddings: unit vectors around a few thousand
cluster centres of uneven size and spread, in an anisotropic space (the
variance of coordinate ``i`` falls as ``1/(i+1)``, as in learned embeddings
whose spectrum decays); queries are new draws from the same clusters, and
1,000 more draws are the tuning queries of the recall-target build.
Ground truth: exact top-10 by inner product (:func:`ccmr_jax.exact.top_k`).

Contenders, every one reported with recall@10 against the exact top-10:

* exact search: the project's (:func:`ccmr_jax.exact.top_k`), which also
  gives the ground truth;
* ScaNN as the project builds it (:func:`ccmr_jax.index.build_searcher`,
  ``approximate``, tuned to ``--target_recall`` on the tuning queries): its
  tuned setting, and a sweep of leaves searched × candidates reordered;
* ScaNN variants, the same sweep: 1 dimension per 4-bit AH block (the
  build has 2), int8 reordering (the build reorders in float32), and
  ScaNN's own ``autopilot()`` at its defaults;
* faiss-cpu: ``IVF{4/3·√N},Flat`` (nprobe swept), ``IVF…,PQ{d/2}x4fs,RFlat``
  (4-bit fast-scan PQ, ScaNN's cousin, with exact re-ranking; nprobe and
  re-rank factor swept) and ``HNSW32,Flat`` (efSearch swept).

Every swept setting is timed on one thread (ScaNN ``search_batched``, faiss
with one OpenMP thread) and on every core (ScaNN ``search_batched_parallel``,
faiss with every OpenMP thread), one pass over ``--sweep_queries`` queries:
those points are the frontier plot. Each method's operating point is then
its fastest swept setting (on every core) with recall@10 ≥
``--target_recall``, timed in alternating turns over all the queries, with
exact search on every core (XLA threads). The ScaNN sweep's one-thread
query times are split by least squares into a fixed part (partition
scoring, overhead), a part per AH-scored item and a part per reordered
candidate, whose ratio is ``ccmr_jax.index.REORDER_COST``. Builds use
every core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from typing import Any, Callable

import numpy as np

from benchmarks import common
from ccmr_jax import exact, index

K = 10


def clustered_embeddings(num_items: int, num_queries: int, dim: int, num_clusters: int,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(gallery [N, dim], queries [Q, dim])``: float32 unit vectors from the same clusters.

  ``x = normalize(c + s·ε)`` with ``c`` a cluster centre, ``s`` the cluster's
  spread (uniform in [0.5, 1.0]) and ``ε`` anisotropic noise of unit expected
  norm; centres and noise share the decaying spectrum; cluster sizes are
  log-normal.
  """
  rng = np.random.default_rng(seed)
  spectrum = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
  spectrum /= np.linalg.norm(spectrum)
  centres = rng.standard_normal((num_clusters, dim), dtype=np.float32) * spectrum
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  spread = rng.uniform(0.5, 1.0, num_clusters).astype(np.float32)
  weights = rng.lognormal(0.0, 1.0, num_clusters)
  weights /= weights.sum()

  def draw(count: int) -> np.ndarray:
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
      stop = min(start + 100_000, count)
      cluster = rng.choice(num_clusters, stop - start, p=weights)
      noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * spectrum
      x = centres[cluster] + spread[cluster, None] * noise
      out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out

  return draw(num_items), draw(num_queries)


def recall(rows: np.ndarray, truth: np.ndarray) -> float:
  return index.agreement(np.asarray(rows)[:, :K], truth)


def qps(search, queries: np.ndarray) -> float:
  return len(queries) / common.timed(lambda: search(queries))


@dataclasses.dataclass
class Method:
  """An approximate index: how to build it, the settings to sweep, and its search at a setting.

  ``searcher(setting, threads)`` returns ``search(queries) -> rows``;
  ``threads`` is 1 or every core.
  """

  name: str
  build: Callable[[], Any]
  settings: list[dict]
  searcher: Callable[[Any, dict, int], Callable]


def scann_sweep(num_leaves: int) -> list[dict]:
  """Leaves searched (1%–20% of ``num_leaves``) × candidates reordered."""
  leaves = sorted({max(1, round(num_leaves * f)) for f in (0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)})
  return [{"leaves_to_search": n, "pre_reorder_num_neighbors": r} for n in leaves for r in (20, 50, 100, 200)]


def scann_searcher(built, setting: dict, threads: int) -> Callable:
  search = built.search_batched_parallel if threads > 1 else built.search_batched
  return lambda q: search(q, final_num_neighbors=K, **setting)[0]


def scann_methods(gallery: np.ndarray, tuning: np.ndarray,
                  target: float) -> tuple[list[Method], index.Searcher, float]:
  """ScaNN as the project builds it (tuned to ``target``), its variants and autopilot; the tuned searcher and
  the seconds its build and tuning took."""
  scann_ops_pybind = index.scann_ops_pybind  # imported by the project's index, without TensorFlow
  start = time.perf_counter()
  tuned = index.build_searcher(gallery, K, mode="approximate", recall_target=target, tuning_queries=tuning)
  tuned_seconds = time.perf_counter() - start
  settings = tuned.settings
  sweep = scann_sweep(settings["num_leaves"])
  if tuned.mode == "approximate":
    sweep.append({name: settings[name] for name in ("leaves_to_search", "pre_reorder_num_neighbors")})

  def variant(dims_per_block: int, reorder_type) -> Callable:
    return lambda: (scann_ops_pybind.builder(gallery, K, "dot_product")
                    .tree(num_leaves=settings["num_leaves"], num_leaves_to_search=settings["num_leaves_to_search"],
                          training_sample_size=settings["training_sample_size"], spherical=True,
                          random_init=False)
                    .score_ah(dims_per_block, anisotropic_quantization_threshold=0.2)
                    .reorder(settings["reorder"], quantize=reorder_type).build())

  reorder = scann_ops_pybind.scann_builder.ReorderType
  methods = [
      Method("scann as built (ccmr_jax.index)", lambda: tuned.scann, sweep,
             scann_searcher),
      Method("scann, 1 dim per AH block", variant(1, reorder.FLOAT32), scann_sweep(settings["num_leaves"]),
             scann_searcher),
      Method("scann, int8 reordering", variant(2, reorder.INT8), scann_sweep(settings["num_leaves"]), scann_searcher),
      Method("scann autopilot()", lambda: scann_ops_pybind.builder(gallery, K, "dot_product").autopilot().build(),
             [{}], scann_searcher),
  ]
  return methods, tuned, tuned_seconds


def time_split(sweep_rows: list[list], size: int, num_leaves: int) -> dict:
  """Least-squares ``s/query = fixed + a · items AH-scored + b · candidates reordered`` over one-thread sweep rows."""
  design, seconds = [], []
  for setting, qps_1 in ((row[1], row[3]) for row in sweep_rows):
    design.append([1.0, setting["leaves_to_search"] / num_leaves * size, setting["pre_reorder_num_neighbors"]])
    seconds.append(1.0 / qps_1)
  (fixed, per_item, per_candidate), *_ = np.linalg.lstsq(np.array(design), np.array(seconds), rcond=None)
  return {"fixed_us": fixed * 1e6, "per_ah_item_ns": per_item * 1e9, "per_reordered_ns": per_candidate * 1e9,
          "reorder_cost": per_candidate / per_item}


def faiss_methods(gallery: np.ndarray, cores: int) -> list[Method]:
  """faiss-cpu IVF-Flat, IVF with 4-bit fast-scan PQ + exact re-ranking, and HNSW."""
  import faiss
  dim = gallery.shape[1]
  nlist = max(4, round(4 / 3 * math.sqrt(len(gallery))))
  train = gallery[np.random.default_rng(1).choice(len(gallery), min(len(gallery), 64 * nlist), replace=False)]
  probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= nlist]

  def build(factory):
    def run():
      faiss.omp_set_num_threads(cores)
      built = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
      if not built.is_trained:
        built.train(train)
      built.add(gallery)
      return built
    return run

  def searcher(built, setting, threads):
    if "ef_search" in setting:
      params = faiss.SearchParametersHNSW(efSearch=setting["ef_search"])
    else:
      params = faiss.SearchParametersIVF(nprobe=setting["nprobe"])
      if "k_factor" in setting:
        params = faiss.IndexRefineSearchParameters(k_factor=setting["k_factor"], base_index_params=params)

    def search(q):
      faiss.omp_set_num_threads(threads)
      return built.search(q, K, params=params)[1]
    return search

  return [
      Method(f"faiss IVF{nlist},Flat", build(f"IVF{nlist},Flat"), [{"nprobe": p} for p in probes], searcher),
      Method(f"faiss IVF{nlist},PQ{dim // 2}x4fs,RFlat", build(f"IVF{nlist},PQ{dim // 2}x4fs,RFlat"),
             [{"nprobe": p, "k_factor": f} for p in probes if p >= 8 for f in (5, 10, 20, 40)], searcher),
      Method("faiss HNSW32,Flat", build("HNSW32,Flat"),
             [{"ef_search": e} for e in (16, 32, 64, 128, 256, 512)], searcher),
  ]


def sweep_method(method: Method, queries: np.ndarray, truth: np.ndarray, cores: int) -> tuple[Any, list, float]:
  """Builds ``method`` and times each setting once on 1 thread and on ``cores``; ``(built, rows, build s)``."""
  start = time.perf_counter()
  built = method.build()
  build_seconds = time.perf_counter() - start
  rows = []
  for setting in method.settings:
    found = recall(method.searcher(built, setting, 1)(queries), truth)
    speeds = [qps(method.searcher(built, setting, threads), queries) for threads in (1, cores)]
    rows.append([method.name, setting, found, *speeds])
  return built, rows, build_seconds


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The ``(recall, qps)`` points that no other point beats on both, by recall."""
  frontier, best_qps = [], -1.0
  for point in sorted(points, key=lambda p: (-p[0], -p[1])):
    if point[1] > best_qps:
      frontier.append(point)
      best_qps = point[1]
  return frontier[::-1]


def plot_frontier(sweeps: list[list], exact_qps: float, cores: int, title: str, path: str) -> None:
  """recall@K (x) against QPS (y, log), one panel for 1 thread and one for ``cores``: every swept setting
  as a faint dot, each method's Pareto frontier as a line."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(12, 5), layout="constrained")
  FigureCanvasAgg(figure)
  names = list(dict.fromkeys(row[0] for row in sweeps))
  for column, threads in enumerate((1, cores)):
    axes = figure.add_subplot(1, 2, column + 1)
    for name in names:
      points = [(row[2], row[3 + column]) for row in sweeps if row[0] == name]
      dots = axes.plot(*zip(*points), marker="o", markersize=3, linestyle="", alpha=0.35)[0]
      axes.plot(*zip(*pareto(points)), marker="o", markersize=4, linewidth=1.2, color=dots.get_color(), label=name)
    if threads == cores:
      axes.plot([1.0], [exact_qps], marker="*", markersize=10, color="black", linestyle="", label="exact (jax)")
    axes.set(xlabel=f"recall@{K}", ylabel="queries / s", yscale="log", xlim=(0.7, 1.005),
             title=f"{threads} thread{'s' if threads > 1 else ''}")
    axes.grid(True, which="both", alpha=0.3)
  figure.axes[0].legend(fontsize=7)
  figure.suptitle(title, fontsize=9)
  figure.savefig(path, dpi=110)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_items", type=int, default=600_000)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--num_queries", type=int, default=5_000)
  parser.add_argument("--sweep_queries", type=int, default=2_000, help="queries per timed pass of a swept setting")
  parser.add_argument("--num_clusters", type=int, default=3_000)
  parser.add_argument("--exact_queries", type=int, default=500, help="queries per timed turn of exact search")
  parser.add_argument("--target_recall", type=float, default=0.95)
  parser.add_argument("--plot", default=None, help="where to write the frontier plot (PNG)")
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.num_items, args.dim, args.num_queries, args.sweep_queries, args.num_clusters, args.exact_queries = (
        3000, 32, 200, 200, 20, 50)
    args.rounds = 1
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  info = common.print_header("Search: ScaNN vs exact vs faiss, recall@10-QPS frontiers", argv)
  cores = common.available_cores()
  gallery, queries = clustered_embeddings(args.num_items, args.num_queries + 1000, args.dim, args.num_clusters)
  queries, tuning = queries[:args.num_queries], queries[args.num_queries:]
  print(f"gallery {gallery.shape}, {args.num_queries} queries (+1000 tuning queries), {args.num_clusters} clusters")
  exact_jax = lambda q: exact.top_k(gallery, q, K)  # noqa: E731
  truth = exact_jax(queries)
  methods, tuned, tuned_seconds = scann_methods(gallery, tuning, args.target_recall)
  print(f"recall-target build: {tuned.mode}, {json.dumps(tuned.settings)}")
  if common.module_available("faiss"):
    methods += faiss_methods(gallery, cores)
  else:
    print("faiss not importable (pip install -e '.[bench]'): no faiss contender")
  sweep_queries, sweep_truth = queries[:args.sweep_queries], truth[:args.sweep_queries]
  builds, sweeps, operating_points = [], [], []
  for method in methods:
    built, rows, build_seconds = sweep_method(method, sweep_queries, sweep_truth, cores)
    builds.append([method.name + (", with its tuning" if method is methods[0] else ""),
                   tuned_seconds if method is methods[0] else build_seconds])
    sweeps += rows
    reaching = [row for row in rows if row[2] >= args.target_recall]
    if not reaching:
      print(f"{method.name}: no swept setting reaches recall@{K} >= {args.target_recall}")
    else:
      operating_points.append((method, built, max(reaching, key=lambda row: row[4])[1]))
  if tuned.mode == "approximate":
    setting = {name: tuned.settings[name] for name in ("leaves_to_search", "pre_reorder_num_neighbors")}
    operating_points.insert(0, (dataclasses.replace(methods[0], name="scann recall-target build"), tuned.scann,
                                setting))
  print("\nbuild (all threads)")
  print(common.markdown_table(["index", "build s"], builds))
  print(f"\nsweep (one pass over {args.sweep_queries} queries per setting and thread count)")
  print(common.markdown_table(["method", "setting", f"recall@{K}", "QPS 1 thread", f"QPS {cores} threads"], sweeps))
  split = time_split([row for row in sweeps if row[0] == methods[0].name], len(gallery), tuned.settings["num_leaves"])
  print("\nScaNN one-thread query time, least squares: " + ", ".join(f"{k}={v:.3g}" for k, v in split.items()))
  exact_qps = time_operating_points(operating_points, queries, truth, exact_jax, cores, args)
  if args.plot:
    title = (f"{args.num_items:,} x {args.dim}, {info['cpu']} ({info['isa']}), {cores} cores, "
             f"load {info['load_average_1m']}, {info['date']}")
    plot_frontier(sweeps, exact_qps, cores, title, args.plot)
    print(f"frontier plot: {args.plot}")


def time_operating_points(points: list, queries: np.ndarray, truth: np.ndarray, exact_jax: Callable, cores: int,
                          args) -> float:
  """Times each operating point on 1 thread and on ``cores`` in alternating turns; returns exact QPS."""
  exact_name = f"exact jax, ccmr_jax.exact.top_k ({cores} threads)"
  exact_queries = queries[:args.exact_queries]
  contenders = {exact_name: lambda: qps(exact_jax, exact_queries)}
  recalls = {exact_name: 1.0}
  for method, built, setting in points:
    recalls[f"{method.name} {setting}"] = recall(method.searcher(built, setting, 1)(queries), truth)
    for threads in (1, cores):
      search = method.searcher(built, setting, threads)
      contenders[f"{method.name} {setting} ({threads} thread{'s' if threads > 1 else ''})"] = (
          lambda search=search: qps(search, queries))
  values = common.alternate(contenders, args.rounds)
  exact_qps = common.median(values[exact_name])
  rows = [[name, recalls[name.rsplit(" (", 1)[0]] if name != exact_name else 1.0, common.median(v),
           common.median(v) / exact_qps] for name, v in values.items()]
  print(f"\noperating points: the fastest setting on {cores} threads with recall@{K} >= {args.target_recall} "
        f"(recall over all {len(queries)} queries), timed in {args.rounds} alternating turns")
  print(common.markdown_table(["method", f"recall@{K}", "QPS (median)", "÷ exact jax QPS"], rows))
  return exact_qps


if __name__ == "__main__":
  main()
