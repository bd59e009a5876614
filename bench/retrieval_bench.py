"""Retrieval benchmark: export + load + Retriever.recommend end to end on synthetic catalogues.

    python bench/retrieval_bench.py                        # 100k and 1M tracks (~10 min)
    python bench/retrieval_bench.py --sizes 20000 --specs Flat HNSW32   # quick check

For every catalogue size (dim 64, clustered unit vectors: 1 cluster per 100 tracks) and index
spec it measures: artifact export time (index build + tuning + writing + checksums), index size,
artifact load time (checksums verified), single-query latency p50/p99 of
``Retriever.recommend(history, k=10)`` end to end (query tower + search + display lookup) and
its split into tower and search time (single queries run on one thread: a server scales with
concurrent requests, not with threads per request), batch throughput of ``recommend_batch``
(all threads), and recall@10 vs exact search on two query sets: held-out planted queries (noisy
copies of catalogue vectors, the way a trained model's queries land near their targets; the
index was tuned on a disjoint set of them) and the query tower's own outputs for random
in-cluster histories (a random-weight tower: a stress case with near-uniform scores).

The query tower has the default model's shape (transformer, 2 layers, 2 heads, id_dim 64, dim
64, max_len 50) with random weights; its id embedding holds the catalogue vectors. The
brute-force ceiling for Flat search is ``V * d * 4`` bytes per query divided by the memory
bandwidth measured in the same run.

Prints a Markdown table and writes JSON (``--json``). Other engineers share the machine's cores:
note the load average printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

from twotower.export import write_artifact
from twotower.index import ExactSearch, recall_at_k
from twotower.model.towers import QueryTower
from twotower.retrieve import Retriever

DIM = 64
HISTORY = 20


def clustered(v: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors ``[v, dim]`` around ``v // 100`` centres, the cluster of each, the centres."""
    rng = np.random.default_rng(seed)
    n_clusters = max(v // 100, 1)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = rng.integers(0, n_clusters, v)
    x = centres[cluster]
    x += rng.standard_normal((v, dim), dtype=np.float32) * np.float32(0.6 / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, cluster, centres


def planted_queries(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy copies of random catalogue vectors (unit norm)."""
    q = x[rng.integers(0, len(x), n)].copy()
    q += rng.standard_normal(q.shape, dtype=np.float32) * np.float32(0.3 / np.sqrt(x.shape[1]))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def histories(cluster: np.ndarray, n: int, rng: np.random.Generator) -> list[list[str]]:
    """Random histories of ``HISTORY`` tracks, each drawn from one cluster."""
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(cluster.max() + 2))
    out = []
    for c in rng.integers(0, cluster.max() + 1, n):
        members = order[starts[c] : starts[c + 1]]
        if len(members) == 0:
            members = order[:1]
        out.append([f"t{i}" for i in rng.choice(members, HISTORY)])
    return out


def default_tower(vectors: np.ndarray) -> QueryTower:
    tower = QueryTower(
        num_items=len(vectors) + 2,
        dim=DIM,
        id_dim=DIM,
        encoder="transformer",
        max_len=50,
        num_layers=2,
        num_heads=2,
        dropout=0.1,
    )
    with torch.no_grad():
        tower.item_embedding.weight[2:] = torch.from_numpy(vectors)
    return tower.eval()


def memory_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth (GB/s) of summing a float32 array of ``nbytes`` (best of a few)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    a.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, q))


def bench_one(
    v: int, spec: str, x: np.ndarray, cluster: np.ndarray, work: Path, args: argparse.Namespace
) -> dict:
    rng = np.random.default_rng(1)
    ids = [f"t{i}" for i in range(v)]
    items = pd.DataFrame(
        {
            "track_id": pd.Series(ids, dtype="string"),
            "title": pd.Series([f"Track {i}" for i in range(v)], dtype="string"),
            "artist": pd.Series([f"Artist {c}" for c in cluster], dtype="string"),
        }
    )
    tower = default_tower(x)
    tune_q = planted_queries(x, args.tune_queries, rng)
    out = work / f"art-{v}-{spec.replace(',', '_')}"
    t = time.perf_counter()
    write_artifact(
        out,
        query_tower=tower,
        item_emb=x,
        items=items,
        vocab={"tracks": ids, "users": [], "contexts": []},
        index=spec,
        tune_queries=tune_q,
        history_len=50,
    )
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    r = Retriever.load(out)
    load_s = time.perf_counter() - t
    m = r.manifest["index"]

    # recall@10 vs exact on held-out planted queries and on the tower's own queries
    exact = ExactSearch(x)
    test_q = planted_queries(x, args.recall_queries, rng)
    recall_planted = recall_at_k(r.index.search(test_q, 10)[1], exact.search(test_q, 10)[1])
    hist = histories(cluster, args.queries, rng)
    tower_q = r.query_embeddings(hist[: args.recall_queries])
    recall_tower = recall_at_k(r.index.search(tower_q, 10)[1], exact.search(tower_q, 10)[1])

    # single-query latency, end to end and split (one thread: parallelism comes from requests)
    threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(args.latency_threads)
    torch.set_num_threads(args.latency_threads)
    for h in hist[:20]:
        r.recommend(h, k=10)
    lat, tower_t, search_t = [], [], []
    for h in hist:
        t0 = time.perf_counter()
        r.recommend(h, k=10)
        lat.append(time.perf_counter() - t0)
    for h in hist[: min(200, len(hist))]:
        t0 = time.perf_counter()
        q = r.query_embeddings([h])
        t1 = time.perf_counter()
        r.index.search(q, 10)
        t2 = time.perf_counter()
        tower_t.append(t1 - t0)
        search_t.append(t2 - t1)

    faiss.omp_set_num_threads(threads[0])
    torch.set_num_threads(threads[1])

    # batch throughput (all threads)
    batch = histories(cluster, args.batch_queries, rng)
    r.recommend_batch(batch[:256], k=10)
    t0 = time.perf_counter()
    r.recommend_batch(batch, k=10, batch_size=1024)
    qps = len(batch) / (time.perf_counter() - t0)

    row = {
        "tracks": v,
        "index": m["factory"],
        "search_params": m["search_params"],
        "export_s": round(export_s, 2),
        "build_s": m["build_seconds"],
        "tune_s": m["tune_seconds"],
        "index_bytes": (out / "index.faiss").stat().st_size,
        "artifact_bytes": sum(f.stat().st_size for f in out.iterdir()),
        "load_s": round(load_s, 2),
        "p50_ms": round(percentile_ms(lat, 50), 3),
        "p99_ms": round(percentile_ms(lat, 99), 3),
        "tower_p50_ms": round(percentile_ms(tower_t, 50), 3),
        "search_p50_ms": round(percentile_ms(search_t, 50), 3),
        "batch_qps": round(qps, 1),
        "recall_tuning": round(m["ann_recall"], 4),
        "recall_planted": round(recall_planted, 4),
        "recall_tower": round(recall_tower, 4),
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--specs", nargs="+", default=["Flat", "HNSW32", "IVF-auto,Flat"])
    p.add_argument("--queries", type=int, default=1000, help="single queries timed")
    p.add_argument("--batch-queries", type=int, default=8192)
    p.add_argument("--tune-queries", type=int, default=2000)
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="faiss/torch threads (0 = default)")
    p.add_argument("--latency-threads", type=int, default=1, help="threads for single queries")
    p.add_argument("--workdir", default=None, help="where artifacts are written (temp)")
    p.add_argument("--json", default="bench/out/retrieval_bench.json")
    args = p.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth_gbs()
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch_threads": torch.get_num_threads(),
        "memory_bandwidth_gbs": round(bandwidth, 2),
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
    }
    print(f"environment: {env}", flush=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="retrieval-bench-", dir=args.workdir))
    try:
        for v in args.sizes:
            x, cluster, _ = clustered(v, DIM, seed=0)
            for spec in args.specs:
                if spec == "IVF-auto,Flat":
                    spec = f"IVF{1 << round(np.log2(4 * np.sqrt(v)))},Flat"
                row = bench_one(v, spec, x, cluster, work, args)
                row["ceiling_ms"] = round(v * DIM * 4 / (bandwidth * 1e9) * 1e3, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()
    cols = [
        "tracks", "index", "search_params", "export_s", "index_bytes", "load_s", "p50_ms",
        "p99_ms", "tower_p50_ms", "search_p50_ms", "batch_qps", "recall_planted",
        "recall_tower", "ceiling_ms",
    ]  # fmt: skip
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print(f"\nmemory bandwidth {bandwidth:.1f} GB/s; load average {env['loadavg_end']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
