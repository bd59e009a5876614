"""Scale benchmarks: streaming preprocessing of tens of millions of plays, FAISS IVF-PQ at 10M.

Subcommands (each prints a Markdown table and writes JSON to ``bench/out/``):

``generate``   a Parquet data set of ``--rows`` plays (default 30M: 1M listeners, 2M tracks with
               a Zipf popularity, string track ids), in files of 2M rows, row groups of 250k.
``synthetic``  the synthetic generator's plays (planted taste clusters, sessions, skips;
               ``--rows`` of them) sorted by user and time, in files of 1M rows, row groups of
               100k: the input of ``configs/streaming.yaml``.
``train-rss``  peak RSS and time of streaming *training* (``train.fit`` with
               ``configs/streaming.yaml``: the setup pass over every row, then
               ``--steps`` training batches) against ``chunk_rows``, hashed and exact
               vocabularies, each in a fresh process with one thread; the in-memory
               ``SessionDataModule`` on the same file for contrast.
``stream``     peak RSS and time of streaming preprocessing (exact vocabulary via
               :func:`stream_vocab`, hashed counts via :func:`stream_bucket_counts`) and of a
               full pass through ``ParquetStream`` + ``DataLoader`` (2 workers) with hashed ids
               and a training step of a hashed-embedding model, for several chunk sizes; each
               measurement runs in a fresh process; the in-memory pandas baseline for contrast.
``flops``      FLOPs per training example of the real model (torch's flop counter) and the
               CPU step time, for sizing training on GPUs.
``ivfpq``      FAISS IVF-PQ over ``--items`` (default 10M) synthetic 64-d vectors with planted
               clusters: train/add time, index bytes, RSS, recall@10 against exact search on
               ``--queries`` queries, single-query latency and batch throughput per nprobe.

Example (what the README's Scaling section quotes)::

    python bench/scale_bench.py generate --out /tmp/plays --rows 30000000
    python bench/scale_bench.py stream --data /tmp/plays
    python bench/scale_bench.py ivfpq --items 10000000
    python bench/scale_bench.py synthetic --out /tmp/plays-synth --rows 3000000
    python bench/scale_bench.py train-rss --data /tmp/plays-synth
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
GiB = 1 << 30
MiB = 1 << 20
TRAIN_ROWS = 3_000_000  # rows trained on by the "train" measurement


def peak_rss() -> int:
    """Peak resident memory of this process (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def children_peak_rss() -> int:
    """Largest peak RSS among finished child processes (bytes)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def save(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"scale_{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


# ---------------------------------------------------------------------------------- generate
def generate(out: Path, rows: int, users: int, tracks: int, seed: int) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = 2_000_000
    t0 = time.perf_counter()
    written = 0
    n_files = -(-rows // per_file)
    for i, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        track = (rng.zipf(1.2, n) - 1) % tracks  # heavy head, long tail
        lo, hi = users * i // n_files, max(users * (i + 1) // n_files, users * i // n_files + 1)
        table_ = pa.table(
            {  # each file holds a range of listeners, their plays together (as logs export)
                "user_id": pa.array(np.sort(rng.integers(lo, hi, n))),
                "track_id": pc.binary_join_element_wise(
                    "t", pc.cast(pa.array(track), pa.string()), ""
                ),
                "timestamp": pa.array(1_500_000_000 + np.sort(rng.integers(0, 10**8, n))),
            }
        )
        pq.write_table(table_, out / f"part-{i:04d}.parquet", row_group_size=250_000)
        written += n
    size = sum(f.stat().st_size for f in out.glob("*.parquet"))
    res = {
        "rows": written,
        "files": len(list(out.glob("*.parquet"))),
        "bytes_on_disk": size,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"wrote {written:,} plays to {out}: {size / MiB:.0f} MiB in {res['seconds']} s")
    return res


# ---------------------------------------------------------------------------------- streaming
def _one_stream(data: Path, mode: str, chunk: int, buckets: int) -> dict:
    """One measurement in this (fresh) process; returns time and peak RSS."""
    import torch  # noqa: F401  (imported by the streaming module anyway: counted in the baseline)

    from twotower.data.streaming import stream_bucket_counts, stream_vocab
    from twotower.ids import HashVocab

    base = _rss()
    t0 = time.perf_counter()
    out: dict = {"mode": mode, "chunk_rows": chunk, "rss_after_imports_mib": round(base / MiB)}
    if mode == "vocab":
        vocab = stream_vocab(data, "track_id", chunk_rows=chunk)
        out["distinct"] = len(vocab) - 2
    elif mode == "hash":
        counts = stream_bucket_counts(data, "track_id", HashVocab(buckets), chunk_rows=chunk)
        out["rows"] = int(counts.sum())
    elif mode == "pandas":
        import pandas as pd

        col = pd.read_parquet(data, columns=["track_id"])["track_id"]
        out["distinct"] = int(col.value_counts().shape[0])
    elif mode == "loader":
        out.update(_loader_pass(data, chunk, buckets, train=False))
    elif mode == "train":
        out.update(_loader_pass(data, chunk, buckets, train=True, max_rows=TRAIN_ROWS))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mib"] = round(peak_rss() / MiB)
    out["worker_peak_rss_mib"] = round(children_peak_rss() / MiB)
    return out


def _loader_pass(
    data: Path,
    chunk: int,
    buckets: int,
    train: bool,
    max_rows: int | None = None,
    dim: int = 32,
    batch: int = 1024,
) -> dict:
    """Rows through ParquetStream + DataLoader(2 workers), ids hashed, optionally trained on.

    ``train``: next-track prediction inside each chunk (previous play -> next play of the
    same listener, in file order), in-batch softmax, one hashed table of ``buckets`` rows
    (SparseAdam): memory is table + optimizer state + one chunk, whatever the data size.
    ``max_rows`` stops early (the full 30M-row pass of the model takes long on 2 cores).
    """
    import torch
    from torch.utils.data import DataLoader

    from twotower.data.streaming import ParquetStream
    from twotower.ids import HashVocab

    torch.manual_seed(0)
    vocab = HashVocab(buckets)

    def to_tensors(c: dict) -> dict:
        return {
            "users": torch.from_numpy(c["user_id"].astype(np.int64)),
            "items": torch.from_numpy(vocab.lookup(c["track_id"])),
        }

    stream = ParquetStream(data, ["user_id", "track_id"], chunk_rows=chunk, transform=to_tensors)
    loader = DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=2)
    emb = torch.nn.Embedding(len(vocab), dim, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
    rows = steps = 0
    rss_trace = []
    t0 = time.perf_counter()
    for i, c in enumerate(loader):
        users, items = c["users"], c["items"]
        rows += len(items)
        if i % 20 == 0:
            rss_trace.append(round(_rss() / MiB))
        if not train:
            continue
        same = users[1:] == users[:-1]  # consecutive plays of one listener
        q_ids, t_ids = items[:-1][same], items[1:][same]
        for s in range(0, len(q_ids), batch):
            q = emb(q_ids[s : s + batch])  # [b, d]
            t = emb(t_ids[s : s + batch])  # [b, d]
            scores = q @ t.T  # [b, b]
            loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(q)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        if max_rows is not None and rows >= max_rows:
            break
    return {
        "rows": rows,
        "train_steps": steps,
        "rows_per_s": round(rows / (time.perf_counter() - t0)),
        "rss_mib_trace_every_20_chunks": rss_trace,
    }


def _rss() -> int:
    from twotower.data.streaming import rss_bytes

    return rss_bytes()


def stream_bench(data: Path, chunks: list[int], buckets: int, loader_chunks: list[int]) -> dict:
    plan = [("pandas", 0)]
    plan += [(m, c) for c in chunks for m in ("vocab", "hash")]
    plan += [(m, c) for c in loader_chunks for m in ("loader", "train")]
    results = []
    for mode, chunk in plan:
        cmd = [sys.executable, __file__, "_stream_one", "--data", str(data), "--mode", mode]
        cmd += ["--chunk", str(chunk), "--buckets", str(buckets)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{mode} chunk {chunk} failed")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        results.append(row)
        print(json.dumps(row), flush=True)
    cols = [
        "mode",
        "chunk_rows",
        "seconds",
        "rss_after_imports_mib",
        "peak_rss_mib",
        "worker_peak_rss_mib",
        "rows_per_s",
    ]
    print(table(results, cols))
    return {"data": str(data), "buckets": buckets, "results": results}


# ---------------------------------------------------------------------------------- training
def write_synthetic(out: Path, rows: int, seed: int, per_file: int = 1_000_000) -> dict:
    """The synthetic generator's plays, sorted by user and time, as Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twotower.data.synthetic import generate, make_config

    t0 = time.perf_counter()
    inter, _, _ = generate(make_config("default", n_plays=rows, seed=seed))
    cols = ["user_id", "track_id", "timestamp", "skipped", "context_type"]
    inter = inter[cols]  # generated ordered by user, then time
    out.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, len(inter), per_file)):
        part = pa.Table.from_pandas(inter.iloc[start : start + per_file], preserve_index=False)
        pq.write_table(part, out / f"part-{i:04d}.parquet", row_group_size=100_000)
    size = sum(f.stat().st_size for f in out.glob("*.parquet"))
    res = {
        "rows": len(inter),
        "users": int(inter["user_id"].nunique()),
        "tracks": int(inter["track_id"].nunique()),
        "files": len(list(out.glob("*.parquet"))),
        "bytes_on_disk": size,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(res))
    return res


def _train_one(data: Path, mode: str, chunk: int, batch_rows: int, steps: int, buckets: int):
    """One training run in this (fresh) process: the data pass, then ``steps`` batches."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    import pytorch_lightning as pl

    from twotower.train import fit

    class RssProbe(pl.Callback):
        """Peak RSS when training starts (the data pass) and RSS every 50 batches."""

        def __init__(self) -> None:
            self.at_start = 0
            self.trace: list[int] = []

        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.at_start = round(peak_rss() / MiB)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx % 50 == 0:
                self.trace.append(round(_rss() / MiB))

    probe = RssProbe()
    repo = Path(__file__).resolve().parents[1]
    base = _rss()
    common = {
        "trainer.max_epochs": 1,
        "trainer.limit_train_batches": steps if steps > 0 else 1.0,
        "trainer.limit_val_batches": 0,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.default_root_dir": tempfile.mkdtemp(),
        "model.dim": 32,
        "model.id_dim": 32,
        "model.num_layers": 1,
        "model.num_negatives": 256,
        "model.projector_items": 0,
    }
    t0 = time.perf_counter()
    if mode == "in-memory":
        overrides = {
            **common,
            "data.format": "parquet",
            "data.path": str(data),
            "data.cache_dir": None,
            "data.window": 50,
            "data.batch_size": max(batch_rows // 50, 1),
        }
        trainer, _, dm = fit([], overrides, callbacks=[probe])
        rows = int(dm.data.report.rows_read)
    else:
        overrides = {
            **common,
            "data.path": str(data),
            "data.chunk_rows": chunk,
            "data.batch_rows": batch_rows,
            "data.num_buckets": buckets if mode == "hashed" else None,
        }
        trainer, _, dm = fit([repo / "configs" / "streaming.yaml"], overrides, callbacks=[probe])
        rows = int(dm.data.stats["rows"])
    return {
        "mode": mode,
        "chunk_rows": chunk if mode != "in-memory" else "all",
        "batch_rows": batch_rows,
        "rows_read": rows,
        "num_items": int(dm.num_items),
        "train_steps": int(trainer.global_step),
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_after_imports_mib": round(base / MiB),
        "peak_rss_before_training_mib": probe.at_start,
        "peak_rss_mib": round(peak_rss() / MiB),
        "rss_mib_every_50_batches": probe.trace,
    }


def train_rss_bench(
    data: Path, chunks: list[int], batch_rows: int, steps: int, buckets: int, baseline: bool
) -> dict:
    plan = [("hashed", c, steps) for c in chunks] + [("exact", chunks[len(chunks) // 2], steps)]
    plan.append(("hashed", chunks[len(chunks) // 2], 0))  # one full epoch
    if baseline:
        plan.append(("in-memory", 0, steps))
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for mode, chunk, n_steps in plan:
        cmd = [sys.executable, __file__, "_train_one", "--data", str(data), "--mode", mode]
        cmd += ["--chunk", str(chunk), "--batch-rows", str(batch_rows), "--steps", str(n_steps)]
        cmd += ["--buckets", str(buckets)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode} chunk {chunk} failed")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        results.append(row)
        print(json.dumps(row), flush=True)
    cols = ["mode", "chunk_rows", "train_steps", "seconds", "rss_after_imports_mib"]
    cols += ["peak_rss_before_training_mib", "peak_rss_mib"]
    print(table(results, cols))
    return {
        "data": str(data),
        "buckets": buckets,
        "batch_rows": batch_rows,
        "steps": steps,
        "load_average": os.getloadavg(),
        "results": results,
    }


# ---------------------------------------------------------------------------------- IVF-PQ
def synthetic_vectors(n: int, dim: int, clusters: int, seed: int, block: int = 1_000_000):
    """L2-normalised vectors around ``clusters`` random centres (a planted structure)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, block):
        b = min(block, n - s)
        c = rng.integers(0, clusters, b)
        v = centres[c] + rng.normal(scale=0.6 / np.sqrt(dim), size=(b, dim)).astype(np.float32)
        x[s : s + b] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x, centres


def ivfpq_bench(n: int, dim: int, spec: str, queries: int, clusters: int) -> dict:
    import faiss

    from twotower.data.streaming import rss_bytes
    from twotower.index import build_index, recall_at_k, set_search_param

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    x, _ = synthetic_vectors(n, dim, clusters, seed=0)
    gen_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    q = x[rng.choice(n, queries, replace=False)].copy()
    q += rng.normal(scale=0.3 / np.sqrt(dim), size=q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)  # near an item, not an item: realistic

    t0 = time.perf_counter()
    _, exact = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    exact_s = time.perf_counter() - t0
    rss_vectors = rss_bytes()

    t0 = time.perf_counter()
    index = build_index(x, spec, "ip")
    build_s = time.perf_counter() - t0
    path = OUT / "ivfpq.faiss"
    OUT.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    index_bytes = path.stat().st_size
    path.unlink()
    # serving holds the index in RAM and the raw vectors memory-mapped (item_embeddings.npy)
    raw = Path(os.environ.get("TMPDIR", "/tmp")) / "scale_bench_vectors.npy"
    np.save(raw, x, allow_pickle=False)
    del x
    x = np.load(raw, mmap_mode="r", allow_pickle=False)
    rss_index = rss_bytes()

    rows = []
    for nprobe in (1, 4, 8, 16, 32, 64):
        set_search_param(index, "nprobe", nprobe)
        t0 = time.perf_counter()
        _, ids = index.search(q, 10)
        batch_s = time.perf_counter() - t0
        lat = []
        for i in range(min(200, queries)):
            t1 = time.perf_counter()
            index.search(q[i : i + 1], 10)
            lat.append(time.perf_counter() - t1)
        lat_ms = np.array(lat) * 1000
        rows.append(
            {
                "nprobe": nprobe,
                "recall@10": round(recall_at_k(ids, exact, 10), 3),
                "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
                "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
                "batch_qps": round(queries / batch_s),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    rerank = []
    for nprobe in (8, 16, 32):
        for fetch in (50, 100):
            set_search_param(index, "nprobe", nprobe)
            t0 = time.perf_counter()
            _, cand = index.search(q, fetch)  # [Q, fetch] PQ candidates
            vecs = np.asarray(x[np.sort(np.unique(cand[cand >= 0]))])  # page in what is needed
            lookup = {int(r): i for i, r in enumerate(np.sort(np.unique(cand[cand >= 0])))}
            pos = np.vectorize(lookup.get)(cand)
            scores = np.einsum("qd,qkd->qk", q, vecs[pos])  # exact scores of the candidates
            ids = np.take_along_axis(cand, np.argsort(-scores, axis=1)[:, :10], axis=1)
            batch_s = time.perf_counter() - t0
            rerank.append(
                {
                    "nprobe": nprobe,
                    "candidates": fetch,
                    "recall@10": round(recall_at_k(ids, exact, 10), 3),
                    "batch_qps": round(queries / batch_s),
                }
            )
            print(json.dumps(rerank[-1]), flush=True)
    raw.unlink()
    res = {
        "items": n,
        "dim": dim,
        "spec": spec,
        "clusters": clusters,
        "queries": queries,
        "threads": faiss.omp_get_max_threads(),
        "generate_s": round(gen_s, 1),
        "exact_knn_s": round(exact_s, 1),
        "build_s": round(build_s, 1),
        "index_bytes": index_bytes,
        "index_mib": round(index_bytes / MiB),
        "raw_vectors_mib": round(n * dim * 4 / MiB),
        "rss_start_mib": round(rss0 / MiB),
        "rss_with_vectors_mib": round(rss_vectors / MiB),
        "rss_index_only_mib": round(rss_index / MiB),
        "peak_rss_mib": round(peak_rss() / MiB),
        "sweep": rows,
        "rerank_exact_from_mmap": rerank,
    }
    print(
        f"{spec} over {n:,} x {dim}: build {build_s:.0f} s, index {index_bytes / MiB:.0f} MiB "
        f"(raw vectors {n * dim * 4 / MiB:.0f} MiB), peak RSS {peak_rss() / MiB:.0f} MiB"
    )
    print(table(rows, ["nprobe", "recall@10", "p50_ms", "p99_ms", "batch_qps"]))
    print(table(rerank, ["nprobe", "candidates", "recall@10", "batch_qps"]))
    return res


# ---------------------------------------------------------------------------------- FLOPs
def flops_bench(batch: int, window: int, negatives: int, dim: int, steps: int) -> dict:
    """FLOPs of one training step of the real model (forward + backward), per example.

    ``torch.utils.flop_counter`` counts the matmuls of the query tower (2-layer causal
    transformer over ``window`` positions), the item tower and the sampled softmax over the
    in-batch positives plus ``negatives`` shared candidates (what DDP's gathered negatives
    amount to). Catalogue size does not change the FLOPs (only embedding-table memory).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from twotower.model.module import TwoTowerModule

    torch.manual_seed(0)
    n_items = 100_002
    module = TwoTowerModule(
        dim=dim,
        id_dim=dim,
        encoder="transformer",
        num_layers=2,
        num_heads=2,
        max_len=window,
        num_negatives=negatives,
        num_items=n_items,
        dropout=0.1,
    )
    module.loss_fn.set_counts(np.ones(n_items))
    items = torch.randint(2, n_items, (batch, window + 1))  # [B, L+1] full windows
    zeros = torch.zeros(batch, window + 1, dtype=torch.long)

    def step() -> int:
        inputs, targets = items[:, :-1], items[:, 1:]
        queries = module.query_tower.forward_sequence(inputs, None, zeros[:, 1:] - 1, zeros[:, 1:])
        valid = (inputs != 0) & (targets > 1)  # [B, L]
        neg = module.loss_fn.sample_negatives()
        loss = module.loss_fn(queries[valid], targets[valid], module.item_tower, neg)
        loss.backward()
        return int(valid.sum())

    with FlopCounterMode(display=False) as counter:
        examples = step()
    flops = counter.get_total_flops()
    t0 = time.perf_counter()
    for _ in range(steps):
        module.zero_grad()
        step()
    cpu_s = (time.perf_counter() - t0) / steps
    res = {
        "batch_windows": batch,
        "window": window,
        "examples_per_step": examples,
        "negatives": negatives,
        "dim": dim,
        "flops_per_step": flops,
        "flops_per_example": round(flops / examples),
        "cpu_threads": torch.get_num_threads(),
        "cpu_seconds_per_step": round(cpu_s, 3),
        "cpu_examples_per_s": round(examples / cpu_s),
    }
    print(json.dumps(res))
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--rows", type=int, default=30_000_000)
    g.add_argument("--users", type=int, default=1_000_000)
    g.add_argument("--tracks", type=int, default=2_000_000)
    g.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("stream")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--chunks", default="16384,262144,1048576")
    s.add_argument("--loader-chunks", default="65536,1048576")
    s.add_argument("--buckets", type=int, default=1 << 20)
    one = sub.add_parser("_stream_one")
    one.add_argument("--data", type=Path, required=True)
    one.add_argument("--mode", required=True)
    one.add_argument("--chunk", type=int, required=True)
    one.add_argument("--buckets", type=int, required=True)
    y = sub.add_parser("synthetic")
    y.add_argument("--out", type=Path, required=True)
    y.add_argument("--rows", type=int, default=3_000_000)
    y.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train-rss")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--chunks", default="16384,65536,262144")
    t.add_argument("--batch-rows", type=int, default=4096)
    t.add_argument("--steps", type=int, default=200)  # 0 = a full epoch
    t.add_argument("--buckets", type=int, default=1 << 16)
    t.add_argument("--no-baseline", action="store_true")
    t1 = sub.add_parser("_train_one")
    t1.add_argument("--data", type=Path, required=True)
    t1.add_argument("--mode", required=True)
    t1.add_argument("--chunk", type=int, required=True)
    t1.add_argument("--batch-rows", type=int, required=True)
    t1.add_argument("--steps", type=int, required=True)
    t1.add_argument("--buckets", type=int, required=True)
    v = sub.add_parser("ivfpq")
    v.add_argument("--items", type=int, default=10_000_000)
    v.add_argument("--dim", type=int, default=64)
    v.add_argument("--spec", default="IVF4096,PQ32")
    v.add_argument("--queries", type=int, default=1000)
    v.add_argument("--clusters", type=int, default=20_000)
    f = sub.add_parser("flops")
    f.add_argument("--batch", type=int, default=256)
    f.add_argument("--window", type=int, default=50)
    f.add_argument("--negatives", type=int, default=8192)
    f.add_argument("--dim", type=int, default=64)
    f.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    if a.cmd == "generate":
        save("generate", generate(a.out, a.rows, a.users, a.tracks, a.seed))
    elif a.cmd == "stream":
        chunks = [int(c) for c in a.chunks.split(",")]
        loader_chunks = [int(c) for c in a.loader_chunks.split(",") if c]
        save("stream", stream_bench(a.data, chunks, a.buckets, loader_chunks))
    elif a.cmd == "_stream_one":
        print(json.dumps(_one_stream(a.data, a.mode, a.chunk, a.buckets)))
    elif a.cmd == "synthetic":
        save("synthetic", write_synthetic(a.out, a.rows, a.seed))
    elif a.cmd == "train-rss":
        chunks = [int(c) for c in a.chunks.split(",")]
        save(
            "train_rss",
            train_rss_bench(a.data, chunks, a.batch_rows, a.steps, a.buckets, not a.no_baseline),
        )
    elif a.cmd == "_train_one":
        row = _train_one(a.data, a.mode, a.chunk, a.batch_rows, a.steps, a.buckets)
        print(json.dumps(row))
    elif a.cmd == "flops":
        save("flops", flops_bench(a.batch, a.window, a.negatives, a.dim, a.steps))
    elif a.cmd == "ivfpq":
        save("ivfpq", ivfpq_bench(a.items, a.dim, a.spec, a.queries, a.clusters))


if __name__ == "__main__":
    main()
