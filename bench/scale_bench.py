"""Scale benchmarks: preparing and streaming tens of millions of plays, FAISS IVF-PQ at 10M.

Subcommands (each prints a Markdown table and writes JSON to ``bench/out/``):

``generate``   a Parquet data set of ``--rows`` plays (default 30M: 1M listeners, 2M tracks with
               a Zipf popularity, string track ids), in files of 2M rows, row groups of 250k.
``synthetic``  the synthetic generator's plays (planted taste clusters, sessions, skips;
               ``--rows`` of them) sorted by user and time, in files of 1M rows, row groups of
               100k: the input of ``configs/streaming.yaml``.
``prepare``    time and peak RSS of preparing a Parquet play-log folder (``prepare_data``:
               format ``parquet``, user sequences, leave-last-out, the training plays written
               as blocks of ``--block-rows``) into a prepared folder, then of loading it again
               from that cache (header, items and evaluation sets; the training plays stay on
               disk), each in a fresh process; rows, blocks and bytes of the folder.
``train-rss``  peak RSS and time of *training* (``train.fit`` with ``configs/streaming.yaml``,
               the model shrunk) from one prepared folder, made first in its own process (not
               counted), then one fresh single-threaded process per mode: ``streamed`` (the
               training plays read block by block: memory ~ ``--block-rows`` x
               ``--shuffle-blocks``), ``streamed-hashed`` (and ``--buckets`` hashed track ids;
               only when ``data.num_buckets`` exists) and ``in-memory`` (every training play
               loaded), for ``--steps`` batches (0: a full epoch).
``flops``      FLOPs per training example of the real model (torch's flop counter) and the
               CPU step time, for sizing training on GPUs.
``ivfpq``      FAISS IVF-PQ over ``--items`` (default 10M) synthetic 64-d vectors with planted
               clusters: train/add time, index bytes, RSS, recall@10 against exact search on
               ``--queries`` queries, single-query latency and batch throughput per nprobe.

Example (what the README's Scaling section quotes)::

    python bench/scale_bench.py generate --out /tmp/plays --rows 30000000
    python bench/scale_bench.py prepare --data /tmp/plays
    python bench/scale_bench.py ivfpq --items 10000000
    python bench/scale_bench.py synthetic --out /tmp/plays-synth --rows 3000000
    python bench/scale_bench.py train-rss --data /tmp/plays-synth
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[1]
STREAMING_CONFIG = REPO / "configs" / "streaming.yaml"
GiB = 1 << 30
MiB = 1 << 20
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def peak_rss() -> int:
    """Peak resident memory of this process (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    """Resident memory of this process now (bytes; the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


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


def _child(args: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run ``scale_bench.py ARGS`` in a fresh process; its last stdout line is a JSON row."""
    res = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {res.returncode})")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def _folder_bytes(folder: Path) -> tuple[int, int]:
    """Bytes and number of the files under ``folder``."""
    files = [f for f in folder.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


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


# ---------------------------------------------------------------------------------- prepare
def _prepare_one(data_args: dict, phase: str) -> dict:
    """``prepare_data`` in this (fresh) process; returns time, peak RSS and the folder's size.

    ``data_args``: either DataConfig fields (``{"fields": {...}}``) or a config file plus data
    overrides (``{"config": FILE, "overrides": {...}}``, read as ``train.py fit`` reads them,
    so the folder is the one that training then finds).
    """
    from twotower.data.pipeline import DataConfig, cache_path, prepare_data

    if "fields" in data_args:
        cfg = DataConfig(**data_args["fields"])
    else:  # the training CLI's parser (it imports Lightning: counted in the baseline)
        from twotower.config import load_data_config

        cfg = load_data_config([data_args["config"]], data_args["overrides"])
    folder = cache_path(cfg)
    assert folder is not None
    existed = folder.exists()
    base = _rss()
    t0 = time.perf_counter()
    prepared = prepare_data(cfg, log_report=False, in_memory=False)
    seconds = time.perf_counter() - t0
    size, files = _folder_bytes(folder)
    return {
        "phase": phase,
        "found_cached": existed,
        "seconds": round(seconds, 2),
        "rows_read": int(prepared.report.rows_read),
        "rows_kept": int(prepared.report.rows_kept),
        "training_plays": int(sum(b.rows for b in prepared.blocks)),
        "blocks": len(prepared.blocks),
        "block_rows": cfg.block_rows,
        "users": int(prepared.report.users),
        "tracks": int(prepared.num_items - 2),
        "folder_files": files,
        "folder_bytes": size,
        "folder_mib": round(size / MiB, 1),
        "folder": str(folder),
        "rss_after_imports_mib": round(base / MiB),
        "peak_rss_mib": round(peak_rss() / MiB),
    }


def prepare_bench(data: Path, block_rows: int, cache_dir: Path | None) -> dict:
    """Prepare ``data`` cold, then load the prepared folder cached; a fresh process each."""
    tmp = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="scale_prepare_")) if tmp else cache_dir
    fields = {
        "format": "parquet",
        "path": str(data),
        "sequence_by": "user",
        "cache_dir": str(cache),
        "block_rows": block_rows,
    }
    input_bytes, input_files = _folder_bytes(data) if data.is_dir() else (data.stat().st_size, 1)
    try:
        results = []
        for phase in ("prepare", "cached"):
            arg = json.dumps({"fields": fields})
            results.append(_child(["_prepare_one", "--data-args", arg, "--phase", phase], phase))
    finally:
        if tmp:
            shutil.rmtree(cache, ignore_errors=True)
    if results[0]["found_cached"] or not results[1]["found_cached"]:
        print("warning: the cold run found a cache, or the cached run did not", file=sys.stderr)
    cols = ["phase", "seconds", "rss_after_imports_mib", "peak_rss_mib", "rows_read"]
    cols += ["training_plays", "blocks", "tracks", "folder_files", "folder_mib"]
    print(f"input: {input_files} files, {input_bytes / MiB:.1f} MiB")
    print(table(results, cols))
    return {
        "data": str(data),
        "input_files": input_files,
        "input_bytes": input_bytes,
        "block_rows": block_rows,
        "load_average": os.getloadavg(),
        "results": results,
    }


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


TRAIN_MODES = ("streamed", "streamed-hashed", "in-memory")


def _data_overrides(
    data: Path, cache: Path, mode: str, batch_size: int, block_rows: int, shuffle: int, buckets: int
) -> dict:
    """The ``data.*`` overrides of a training mode (all else from ``configs/streaming.yaml``)."""
    out = {
        "data.format": "parquet",
        "data.path": str(data),
        "data.cache_dir": str(cache),
        "data.window": 50,
        "data.batch_size": batch_size,
        "data.block_rows": block_rows,
        "data.shuffle_blocks": shuffle,
        "data.streaming": mode != "in-memory",
        "data.num_workers": 0,
    }
    if mode == "streamed-hashed":
        out["data.num_buckets"] = buckets
    return out


def _train_one(data_overrides: dict, mode: str, steps: int) -> dict:
    """One training run in this (fresh) process from the prepared folder: ``steps`` batches."""
    import torch

    torch.set_num_threads(1)
    import pytorch_lightning as pl

    from twotower.train import fit

    class RssProbe(pl.Callback):
        """Peak RSS when training starts, RSS every 50 batches, examples/s after batch 0."""

        def __init__(self) -> None:
            self.at_start = 0
            self.trace: list[int] = []
            self.examples = 0
            self.t0: float | None = None
            self.t1: float | None = None

        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.at_start = round(peak_rss() / MiB)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx % 50 == 0:
                self.trace.append(round(_rss() / MiB))
            now = time.perf_counter()
            if self.t0 is None:  # batch 0 (first reads, lazy set-up) is not timed
                self.t0 = now
            else:
                self.examples += int(getattr(module, "_examples", 0))
                self.t1 = now

    probe = RssProbe()
    base = _rss()
    root = tempfile.mkdtemp(prefix="scale_train_")
    overrides = {
        **data_overrides,
        "trainer.max_epochs": 1,
        "trainer.limit_train_batches": steps if steps > 0 else 1.0,
        "trainer.limit_val_batches": 0,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.default_root_dir": root,
        "model.dim": 32,
        "model.id_dim": 32,
        "model.num_layers": 1,
        "model.num_negatives": 256,
        "model.projector_items": 0,
    }
    t0 = time.perf_counter()
    try:
        trainer, _, dm = fit([STREAMING_CONFIG], overrides, callbacks=[probe])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - t0
    timed = probe.t1 - probe.t0 if probe.t0 is not None and probe.t1 is not None else 0.0
    return {
        "mode": mode,
        "streaming": bool(dm.streamed),
        "num_buckets": data_overrides.get("data.num_buckets", ""),
        "blocks": len(dm.data.blocks),
        "rows_read": int(dm.data.report.rows_read),
        "num_items": int(dm.num_items),
        "train_steps": int(trainer.global_step),
        "seconds": round(seconds, 1),
        "examples_per_s": round(probe.examples / timed) if timed > 0 else "",
        "rss_after_imports_mib": round(base / MiB),
        "peak_rss_before_training_mib": probe.at_start,
        "peak_rss_mib": round(peak_rss() / MiB),
        "rss_mib_every_50_batches": probe.trace,
    }


def hashing_supported() -> bool:
    """Whether ``data.num_buckets`` (hashed track ids) exists in this checkout."""
    code = (
        "import inspect; from twotower.data.pipeline import DataConfig; DataConfig(num_buckets=8);"
        "from twotower.data.datamodule import TwoTowerDataModule as M;"
        "assert 'num_buckets' in inspect.signature(M.__init__).parameters"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO)
    return res.returncode == 0


def train_rss_bench(
    data: Path,
    steps: int,
    batch_size: int,
    block_rows: int,
    shuffle_blocks: int,
    buckets: int,
    modes: list[str],
    cache_dir: Path | None,
) -> dict:
    """Prepare once (not counted), then train each mode in a fresh single-threaded process."""
    if "streamed-hashed" in modes and not hashing_supported():
        print("data.num_buckets is not available here: skipping streamed-hashed", file=sys.stderr)
        modes = [m for m in modes if m != "streamed-hashed"]
    tmp = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="scale_train_rss_")) if tmp else cache_dir
    prepared, results = [], []
    try:
        for mode in modes:
            over = _data_overrides(
                data, cache, mode, batch_size, block_rows, shuffle_blocks, buckets
            )
            # the folder training reads (parsed from the same config and overrides, so the same
            # fingerprint); a mode whose data options give the same folder finds it prepared
            arg = json.dumps({"config": str(STREAMING_CONFIG), "overrides": over})
            row = _child(["_prepare_one", "--data-args", arg, "--phase", mode], f"prepare {mode}")
            prepared.append(row)
            before = {p: p.stat().st_mtime_ns for p in cache.glob("*/header.json")}
            arg = json.dumps(over)
            row = _child(
                ["_train_one", "--data-overrides", arg, "--mode", mode, "--steps", str(steps)],
                f"train {mode}",
                env=ONE_THREAD,
            )
            after = {p: p.stat().st_mtime_ns for p in cache.glob("*/header.json")}
            if after != before:
                raise SystemExit(f"{mode}: training prepared the data again (cache miss)")
            results.append(row)
    finally:
        if tmp:
            shutil.rmtree(cache, ignore_errors=True)
    cols = ["phase", "found_cached", "seconds", "peak_rss_mib", "rows_read", "training_plays"]
    cols += ["blocks", "folder_mib"]
    print("preparation (not part of the training runs):")
    print(table(prepared, cols))
    cols = ["mode", "train_steps", "seconds", "examples_per_s", "rss_after_imports_mib"]
    cols += ["peak_rss_before_training_mib", "peak_rss_mib", "rss_mib_every_50_batches"]
    print(table(results, cols))
    return {
        "data": str(data),
        "steps": steps,
        "batch_size": batch_size,
        "window": 50,
        "block_rows": block_rows,
        "shuffle_blocks": shuffle_blocks,
        "buckets": buckets,
        "load_average": os.getloadavg(),
        "prepared": prepared,
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

    from twotower.index import build_index, recall_at_k, set_search_param

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rss0 = _rss()
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
    rss_vectors = _rss()

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
    rss_index = _rss()

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
    zeros = torch.zeros(batch, window + 1, dtype=torch.long)
    windows = {  # a training batch of full windows, hour and context unknown
        "items": torch.randint(2, n_items, (batch, window + 1)),  # [B, L+1]
        "hours": zeros - 1,  # [B, L+1]
        "contexts": zeros,  # [B, L+1]
        "users": torch.zeros(batch, dtype=torch.long),  # [B]
    }

    def step() -> int:
        loss, examples = module.sequence_loss(windows)  # the training step's loss
        loss.backward()
        return examples

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
    shown = "{generate,synthetic,prepare,train-rss,ivfpq,flops}"
    sub = p.add_subparsers(dest="cmd", required=True, metavar=shown)
    g = sub.add_parser("generate", help="a Zipf-popular Parquet play log")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--rows", type=int, default=30_000_000)
    g.add_argument("--users", type=int, default=1_000_000)
    g.add_argument("--tracks", type=int, default=2_000_000)
    g.add_argument("--seed", type=int, default=0)
    y = sub.add_parser("synthetic", help="the synthetic generator's plays as Parquet")
    y.add_argument("--out", type=Path, required=True)
    y.add_argument("--rows", type=int, default=3_000_000)
    y.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("prepare", help="prepare a Parquet play log, then load it cached")
    r.add_argument("--data", type=Path, required=True, help="Parquet play-log file or folder")
    r.add_argument("--block-rows", type=int, default=262_144)
    r.add_argument("--cache-dir", type=Path, default=None, help="kept (default: a temp folder)")
    r1 = sub.add_parser("_prepare_one")
    r1.add_argument("--data-args", required=True)
    r1.add_argument("--phase", required=True)
    t = sub.add_parser("train-rss", help="training memory: streamed vs in memory")
    t.add_argument("--data", type=Path, required=True, help="Parquet play-log file or folder")
    t.add_argument("--steps", type=int, default=200, help="batches per mode (0: a full epoch)")
    t.add_argument("--batch-size", type=int, default=128, help="training windows per batch")
    t.add_argument("--block-rows", type=int, default=65_536)
    t.add_argument("--shuffle-blocks", type=int, default=4)
    t.add_argument("--buckets", type=int, default=1 << 16, help="streamed-hashed: num_buckets")
    t.add_argument("--modes", default=",".join(TRAIN_MODES))
    t.add_argument("--cache-dir", type=Path, default=None, help="kept (default: a temp folder)")
    t1 = sub.add_parser("_train_one")
    t1.add_argument("--data-overrides", required=True)
    t1.add_argument("--mode", required=True)
    t1.add_argument("--steps", type=int, required=True)
    v = sub.add_parser("ivfpq", help="FAISS IVF-PQ at 10M items")
    v.add_argument("--items", type=int, default=10_000_000)
    v.add_argument("--dim", type=int, default=64)
    v.add_argument("--spec", default="IVF4096,PQ32")
    v.add_argument("--queries", type=int, default=1000)
    v.add_argument("--clusters", type=int, default=20_000)
    f = sub.add_parser("flops", help="FLOPs per training example")
    f.add_argument("--batch", type=int, default=256)
    f.add_argument("--window", type=int, default=50)
    f.add_argument("--negatives", type=int, default=8192)
    f.add_argument("--dim", type=int, default=64)
    f.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    if a.cmd == "generate":
        save("generate", generate(a.out, a.rows, a.users, a.tracks, a.seed))
    elif a.cmd == "synthetic":
        save("synthetic", write_synthetic(a.out, a.rows, a.seed))
    elif a.cmd == "prepare":
        save("prepare", prepare_bench(a.data, a.block_rows, a.cache_dir))
    elif a.cmd == "_prepare_one":
        print(json.dumps(_prepare_one(json.loads(a.data_args), a.phase)))
    elif a.cmd == "train-rss":
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        unknown = sorted(set(modes) - set(TRAIN_MODES))
        if unknown:
            p.error(f"--modes: unknown {unknown}, expected some of {list(TRAIN_MODES)}")
        save(
            "train_rss",
            train_rss_bench(
                a.data,
                a.steps,
                a.batch_size,
                a.block_rows,
                a.shuffle_blocks,
                a.buckets,
                modes,
                a.cache_dir,
            ),
        )
    elif a.cmd == "_train_one":
        print(json.dumps(_train_one(json.loads(a.data_overrides), a.mode, a.steps)))
    elif a.cmd == "flops":
        save("flops", flops_bench(a.batch, a.window, a.negatives, a.dim, a.steps))
    elif a.cmd == "ivfpq":
        save("ivfpq", ivfpq_bench(a.items, a.dim, a.spec, a.queries, a.clusters))


if __name__ == "__main__":
    main()
