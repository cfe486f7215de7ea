"""Gallery search: ScaNN (the project's searcher) against exact search and faiss, at matched recall.

  python -m benchmarks.search                    # 600,000 x 256 gallery, 5,000 queries
  python -m benchmarks.search --quick

Data that look like real embeddings: unit vectors around a few thousand
cluster centres of uneven size and spread, in an anisotropic space (the
variance of coordinate ``i`` falls as ``1/(i+1)``, as in learned embeddings
whose spectrum decays); queries are new draws from the same clusters.
Ground truth: exact top-10 by inner product (:func:`ccmr_jax.exact.top_k`).

Contenders, every one reported with recall@10 against the exact top-10:

* exact search: the project's (:func:`ccmr_jax.exact.top_k`, jitted matmul +
  ``lax.top_k`` in bucketed shapes), which also gives the ground truth;
* ScaNN as the project builds it (:func:`ccmr_jax.index.build_searcher`,
  ``approximate``: spherical k-means tree of √N leaves + anisotropic AH, 2
  dimensions per 4-bit block + exact reordering), and the same with a plain
  (non-spherical) k-means tree, the project's build until tuning found the
  spherical one; leaves searched and candidates reordered are swept at query
  time;
* faiss-cpu: ``IVF{4/3·√N},Flat`` (nprobe swept), ``IVF…,PQ{d/2}x4fs,RFlat``
  (4-bit fast-scan PQ, ScaNN's cousin, with exact re-ranking; nprobe and
  re-rank factor swept) and ``HNSW32,Flat`` (efSearch swept).

Each method's operating point is its fastest swept setting (one thread)
with recall@10 ≥ ``--target_recall``; those points are then timed in
turns, each on one thread (ScaNN ``search_batched``, faiss with one OpenMP
thread) and on every core (ScaNN ``search_batched_parallel``, faiss with
every OpenMP thread); exact search uses every core (BLAS / XLA threads).
Builds use every core.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def scann_methods(gallery: np.ndarray) -> list[Method]:
  """ScaNN as the project builds it (spherical tree), and with a plain k-means tree for comparison."""
  from scann.scann_ops.py import scann_ops_pybind
  settings = index.approximate_settings(len(gallery), K)
  leaves = settings["num_leaves"]
  sweep_settings = [{"leaves_to_search": n, "reorder": r}
                    for n in sorted({max(1, round(leaves * f)) for f in (0.02, 0.03, 0.04, 0.05, 0.08, 0.12)})
                    for r in (50, 100, 200)]

  def searcher(built, setting, threads):
    search = built.search_batched_parallel if threads > 1 else built.search_batched
    return lambda q: search(q, final_num_neighbors=K, pre_reorder_num_neighbors=setting["reorder"],
                            leaves_to_search=setting["leaves_to_search"])[0]

  def plain_tree():
    return (scann_ops_pybind.builder(gallery, K, "dot_product")
            .tree(num_leaves=leaves, num_leaves_to_search=settings["num_leaves_to_search"],
                  training_sample_size=settings["training_sample_size"], spherical=False)
            .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(settings["reorder"]).build())

  return [Method("scann (ccmr_jax.index approximate)",
                 lambda: index.build_searcher(gallery, K, mode="approximate").scann, sweep_settings, searcher),
          Method("scann, plain k-means tree", plain_tree, sweep_settings, searcher)]


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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_items", type=int, default=600_000)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--num_queries", type=int, default=5_000)
  parser.add_argument("--num_clusters", type=int, default=3_000)
  parser.add_argument("--exact_queries", type=int, default=500, help="queries per timed turn of exact search")
  parser.add_argument("--target_recall", type=float, default=0.95)
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.num_items, args.dim, args.num_queries, args.num_clusters, args.exact_queries, args.rounds = (
        2000, 32, 100, 20, 50, 1)
  common.print_header("Search: ScaNN vs exact vs faiss at matched recall@10", argv)
  cores = common.available_cores()
  start = time.perf_counter()
  gallery, queries = clustered_embeddings(args.num_items, args.num_queries, args.dim, args.num_clusters)
  print(f"gallery {gallery.shape}, {args.num_queries} queries, {args.num_clusters} clusters "
        f"(made in {time.perf_counter() - start:.1f}s)")
  exact_jax = lambda q: exact.top_k(gallery, q, K)  # noqa: E731
  exact_jax(queries[:256])  # compiles
  start = time.perf_counter()
  truth = exact_jax(queries)
  print(f"exact top-{K} of every query: {time.perf_counter() - start:.1f}s")

  methods = scann_methods(gallery)
  if common.module_available("faiss"):
    methods += faiss_methods(gallery, cores)
  else:
    print("faiss not importable (pip install -e '.[bench]'): no faiss contender")
  builds, sweeps, operating_points = [], [], []
  for method in methods:
    start = time.perf_counter()
    built = method.build()
    builds.append([method.name, time.perf_counter() - start])
    best = None
    for setting in method.settings:
      search = method.searcher(built, setting, 1)
      start = time.perf_counter()
      rows = search(queries)
      seconds = time.perf_counter() - start
      found = recall(rows, truth)
      sweeps.append([method.name, setting, found, len(queries) / seconds])
      if found >= args.target_recall and (best is None or seconds < best[1]):
        best = (setting, seconds, found)
    if best is None:
      print(f"{method.name}: no swept setting reaches recall@{K} >= {args.target_recall}")
      continue
    for threads in (1, cores):
      operating_points.append((f"{method.name} {best[0]} ({threads} thread{'s' if threads > 1 else ''})",
                               method.searcher(built, best[0], threads), best[2]))

  print("\nbuild (all threads)")
  print(common.markdown_table(["index", "build s"], builds))
  print(f"\nsweep (one pass over the {args.num_queries} queries, one thread)")
  print(common.markdown_table(["method", "setting", f"recall@{K}", "QPS"], sweeps))

  exact_queries = queries[:args.exact_queries]
  contenders = {f"exact jax, matmul + top_k, ccmr_jax.exact.top_k ({cores} threads)":
                lambda: qps(exact_jax, exact_queries)}
  recalls = dict.fromkeys(contenders, 1.0)
  for name, search, found in operating_points:
    contenders[name] = lambda search=search: qps(search, queries)
    recalls[name] = found
  values = common.alternate(contenders, args.rounds)
  exact_qps = common.median(values[f"exact jax, matmul + top_k, ccmr_jax.exact.top_k ({cores} threads)"])
  rows = [[name, recalls[name], common.median(v), common.median(v) / exact_qps] for name, v in values.items()]
  print(f"\noperating points: each method's fastest swept setting with recall@{K} >= {args.target_recall}, "
        f"timed in {args.rounds} alternating turns ({args.num_queries} queries per turn, {args.exact_queries} "
        f"for exact search); {cores} cores")
  print(common.markdown_table(["method", f"recall@{K}", "QPS (median)", "÷ exact jax QPS"], rows))


if __name__ == "__main__":
  main()
