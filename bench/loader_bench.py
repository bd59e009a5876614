"""Training-data loader benchmark: pyarrow row groups (what training uses) against litdata.

The issue asked to choose, by measurement, how streamed training reads the prepared plays:
Lightning's own streaming library (``litdata.StreamingDataset`` / ``StreamingDataLoader``) or
pyarrow row groups. Training uses pyarrow row groups; this script is the measurement behind that
choice, on one synthetic log prepared once:

1. **Prepare** (``--plays N``, default 3,000,000): synthetic plays (``format="synthetic"``,
   preset ``default`` with ``n_plays=N``) prepared with ``block_rows=65536`` into
   ``--out/cache/<fingerprint>`` (:func:`twotower.data.pipeline.prepare_data`, reused when the
   folder is already there). ``plays/*.parquet`` hold the training plays, one block of whole
   sequences per row group.
2. **Measure**, every case in a fresh subprocess (the parent imports neither torch nor twotower,
   so it stays small: a child's ``ru_maxrss`` starts from the parent's RSS at spawn):

   ``pyarrow-blocks``
       One epoch of what training reads:
       ``TwoTowerDataModule(prepared=..., streaming=True, batch_size=128, window=50,
       shuffle_blocks=4).train_batches()`` through ``TrainLoader(ds, num_workers=W)``: row
       group -> ``Sequences`` -> ``build_windows`` -> shuffled, length-bucketed batches.
       Rows/s counts the plays of the blocks read, windows/s the training windows; the JSON
       also has the non-pad items of the windows (``window_plays``).
   ``pyarrow-rows``
       The raw read below it: every block read with
       ``pq.ParquetFile(f).read_row_group(g, columns=PLAY_COLUMNS)`` and converted to numpy.
   ``litdata-rows``
       The same ``plays/*.parquet`` read directly by litdata: linked (hard links, no copy)
       into ``--out/litdata/plays-wW``, because litdata keeps its ``index.json`` in the folder
       it streams and the prepared folder is left as it is; indexed with
       ``litdata.index_parquet_dataset`` (footers only), then
       ``StreamingDataset(dir, item_loader=ParquetLoader(columns=...))`` iterated once by
       ``StreamingDataLoader(batch_size=4096, num_workers=W)``. litdata reads Parquet in place
       (no ``litdata.optimize`` conversion, no second copy; a file is a litdata *chunk*) but
       hands out one row at a time: each row group becomes a list of Python dicts
       (``Table.to_pylist``), one dict per play, collated back into tensors per batch. It has no
       notion of a sequence or a block, so training windows would still have to be rebuilt from
       the rows. With workers, litdata requires the ``spawn`` start method for its
       ``ParquetLoader`` (fork deadlocks polars), so its workers start as fresh interpreters.
       Skipped with a message when litdata (or polars, which its ``ParquetLoader`` requires) is
       not installed.

   Each case reports the wall time of one pass (setup, e.g. loading the header or indexing, is
   timed apart), rows/s, windows/s where it applies, the peak RSS of the measuring process
   (``getrusage(RUSAGE_SELF).ru_maxrss``) and of its largest loader worker
   (``RUSAGE_CHILDREN``; forked workers start from the main process's size), and
   the extra disk bytes a case writes (litdata's index and cache).

A Markdown table (with the load average at start and end, and the litdata, pyarrow and torch
versions) is printed and the results are written as JSON (``--json``). Run it on an idle machine:
the load average is there to show when it was not.

Usage::

    # only for the litdata case; a plain `pip install litdata` lets pip swap a CPU torch for
    # the newest (CUDA) build to satisfy its torchvision requirement, hence --no-deps
    # (torchvision is only imported for image and video data)
    pip install --no-deps litdata obstore tifffile polars polars-runtime-32
    python bench/loader_bench.py                               # 3M plays, workers 0 and 2
    python bench/loader_bench.py --plays 200000 --workers 0    # a quick check
    python bench/loader_bench.py --out /tmp/loader_bench --json bench/out/loader_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BLOCK_ROWS = 65_536
BATCH_SIZE = 128
WINDOW = 50
SHUFFLE_BLOCKS = 4
LITDATA_BATCH = 4096
# the columns of plays/*.parquet (twotower.data.prepared.PLAY_COLUMNS, checked in prepare());
# repeated here so that the raw-read child imports only pyarrow and numpy
PLAY_COLUMNS = ("seq", "user", "item", "hour", "context", "positive", "timestamp")
CASES = ("pyarrow-blocks", "pyarrow-rows", "litdata-rows")
Result = dict[str, Any]


# ----------------------------------------------------------------------------- helpers
def _mib(kib: int) -> float:
    """``ru_maxrss`` (KiB on Linux) in MiB."""
    return round(kib / 1024, 1)


def _peaks() -> dict[str, float]:
    """Peak RSS of this process and of its largest waited-for child (loader workers), in MiB."""
    return {
        "peak_rss_mib": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "worker_peak_rss_mib": _mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
    }


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- step 1
def prepare(plays: int, out: Path) -> Path:
    """Prepare ``plays`` synthetic plays under ``out/cache`` (once) and return the folder."""
    from twotower.data.pipeline import DataConfig, cache_path, prepare_data
    from twotower.data.prepared import PLAY_COLUMNS as REPO_COLUMNS

    if tuple(REPO_COLUMNS) != PLAY_COLUMNS:
        raise SystemExit(f"PLAY_COLUMNS changed: {REPO_COLUMNS}; update bench/loader_bench.py")
    cfg = DataConfig(
        format="synthetic",
        options={"preset": "default", "n_plays": plays},
        cache_dir=str(out / "cache"),
        block_rows=BLOCK_ROWS,
    )
    t0 = time.perf_counter()
    prepare_data(cfg, log_report=False, in_memory=False)
    folder = cache_path(cfg)
    assert folder is not None
    print(f"prepared {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return folder


def _prepare_child(args: argparse.Namespace) -> Result:
    folder = prepare(args.plays, args.out)
    import pyarrow.parquet as pq

    files = sorted((folder / "plays").glob("*.parquet"))
    metas = [pq.ParquetFile(f).metadata for f in files]
    return {
        "folder": str(folder),
        "files": len(files),
        "blocks": sum(m.num_row_groups for m in metas),
        "rows": sum(m.num_rows for m in metas),
        "plays_bytes": sum(f.stat().st_size for f in files),
    }


# ----------------------------------------------------------------------------- step 2: cases
def case_pyarrow_blocks(folder: Path, workers: int) -> Result:
    """One training epoch streamed from the row groups (what ``streaming: true`` trains on)."""
    from twotower.data.datamodule import TwoTowerDataModule
    from twotower.data.train_batches import TrainLoader

    t0 = time.perf_counter()
    dm = TwoTowerDataModule(
        prepared=str(folder),
        streaming=True,
        batch_size=BATCH_SIZE,
        window=WINDOW,
        shuffle_blocks=SHUFFLE_BLOCKS,
        pin_memory=False,
    )
    ds = dm.train_batches()
    loader = TrainLoader(ds, num_workers=workers)
    setup_s = time.perf_counter() - t0
    windows = window_plays = batches = 0
    t0 = time.perf_counter()
    for batch in loader:
        items = batch["items"]
        batches += 1
        windows += int(items.shape[0])
        window_plays += int((items != 0).sum())
    seconds = time.perf_counter() - t0
    return {
        "setup_s": round(setup_s, 3),
        "seconds": seconds,
        "rows": int(sum(b.rows for b in ds.blocks)),
        "blocks": len(ds.blocks),
        "batches": batches,
        "windows": windows,
        "window_plays": window_plays,
    }


def case_pyarrow_rows(folder: Path, workers: int) -> Result:
    """Every row group read with pyarrow and converted to numpy (the raw read, one process)."""
    import pyarrow.parquet as pq

    if workers:
        raise ValueError("pyarrow-rows runs in one process (workers 0)")
    # setup: open the files (footers) and read one column once; pyarrow's first read in a
    # process costs a fixed ~0.3 s, which pyarrow-blocks pays in its setup too (block_windows)
    t0 = time.perf_counter()
    files = sorted((folder / "plays").glob("*.parquet"))
    pfs = [pq.ParquetFile(f) for f in files]
    pfs[0].read_row_group(0, columns=["seq"]).column("seq").to_numpy()
    setup_s = time.perf_counter() - t0
    rows = blocks = 0
    t0 = time.perf_counter()
    for pf in pfs:
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g, columns=list(PLAY_COLUMNS))
            cols = {name: t.column(name).to_numpy() for name in PLAY_COLUMNS}
            rows += len(cols["seq"])
            blocks += 1
    seconds = time.perf_counter() - t0
    return {"setup_s": round(setup_s, 3), "seconds": seconds, "rows": rows, "blocks": blocks}


def _link_plays(plays: Path, dest: Path) -> str:
    """``dest``: links to the ``plays/*.parquet`` files (litdata writes its index beside them).

    Hard links (no second copy of the data) where the file system allows, else symbolic links.
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    how = "hard links"
    for f in sorted(plays.glob("*.parquet")):
        try:
            os.link(f, dest / f.name)
        except OSError:
            os.symlink(f, dest / f.name)
            how = "symbolic links"
    return how


def case_litdata_rows(folder: Path, workers: int, work: Path) -> Result:
    """The same Parquet files indexed and streamed by litdata, row by row, once."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # no PyPI request while timed
    from litdata import StreamingDataLoader, StreamingDataset, index_parquet_dataset
    from litdata.streaming.item_loader import ParquetLoader

    # litdata copies index.json into the folder it streams: keep the prepared folder untouched
    data_dir = work / f"plays-w{workers}"
    links = _link_plays(folder / "plays", data_dir)
    cache_dir = work / f"cache-w{workers}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    index_parquet_dataset(str(data_dir))
    index_s = time.perf_counter() - t0
    ds = StreamingDataset(
        str(data_dir),
        cache_dir=str(cache_dir),
        item_loader=ParquetLoader(columns=list(PLAY_COLUMNS)),
        shuffle=False,
    )
    # litdata refuses fork with its ParquetLoader (polars' thread pool deadlocks after fork):
    # its workers are spawned, and start inside the timed pass like the forked ones above
    context = {"multiprocessing_context": "spawn"} if workers else {}
    loader = StreamingDataLoader(ds, batch_size=LITDATA_BATCH, num_workers=workers, **context)
    setup_s = time.perf_counter() - t0
    rows = batches = 0
    first: dict[str, str] = {}
    t0 = time.perf_counter()
    for batch in loader:
        if not first:
            first = {k: f"{type(v).__name__}{list(v.shape)}" for k, v in batch.items()}
        rows += len(batch["seq"])
        batches += 1
    seconds = time.perf_counter() - t0
    written = [f for f in data_dir.iterdir() if f.suffix != ".parquet"]
    return {
        "setup_s": round(setup_s, 3),
        "index_s": round(index_s, 3),
        "seconds": seconds,
        "rows": rows,
        "batches": batches,
        "dataset_len": len(ds),
        "first_batch": first,
        "parquet_linked_as": links,
        "litdata_files": sorted(f.name for f in written)
        + [str(f.relative_to(cache_dir)) for f in cache_dir.rglob("*") if f.is_file()],
        "extra_disk_bytes": sum(f.stat().st_size for f in written) + _tree_bytes(cache_dir),
    }


def _case_child(args: argparse.Namespace) -> Result:
    folder, w, work = Path(args.folder), args.child_workers, args.out / "litdata"
    runners: dict[str, Callable[[], Result]] = {
        "pyarrow-blocks": lambda: case_pyarrow_blocks(folder, w),
        "pyarrow-rows": lambda: case_pyarrow_rows(folder, w),
        "litdata-rows": lambda: case_litdata_rows(folder, w, work),
    }
    out = runners[args.child]()
    out.update(_peaks())
    return out


def _litdata_missing() -> str | None:
    """Why the litdata case cannot run here (None when it can)."""
    missing = [name for name in ("litdata", "polars") if _version(name) is None]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not installed: `pip install litdata polars` to measure "
        "litdata (its ParquetLoader needs polars)"
    )


# ----------------------------------------------------------------------------- the parent
def _run_child(extra: list[str], args: argparse.Namespace) -> Result:
    """Run this script with ``extra`` in a fresh interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), *extra]
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}", "stderr": proc.stderr[-4000:]}
    try:
        out: Result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"no JSON on the last stdout line: {lines[-1][:200]!r}"}
    out["process_s"] = round(wall, 2)
    return out


def _finish(case: str, workers: int, r: Result) -> Result:
    r = {"case": case, "workers": workers, **r}
    if "error" in r or "seconds" not in r:
        return r
    s = max(r["seconds"], 1e-9)
    r["seconds"] = round(s, 3)
    r["rows_per_s"] = round(r["rows"] / s)
    if "windows" in r:
        r["windows_per_s"] = round(r["windows"] / s)
        r["window_plays_per_s"] = round(r["window_plays"] / s)
    r.setdefault("extra_disk_bytes", 0)
    return r


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and digits:
        return f"{x:,.{digits}f}"
    if isinstance(x, (int, float)):
        return f"{x:,.0f}"
    return str(x)


def table(results: list[Result]) -> str:
    """The Markdown table of the results."""
    head = (
        "| case | workers | seconds | rows/s | windows/s | peak RSS MiB | worker peak MiB "
        "| extra disk bytes | setup s |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in results:
        if "error" in r or "skipped" in r:
            why = str(r.get("error") or r.get("skipped")).replace("|", "/")
            lines.append(f"| {r['case']} | {r['workers']} | {why} |" + " |" * 6)
            continue
        lines.append(
            f"| {r['case']} | {r['workers']} | {_fmt(r['seconds'], 2)} | {_fmt(r['rows_per_s'])} "
            f"| {_fmt(r.get('windows_per_s'))} | {_fmt(r['peak_rss_mib'], 1)} "
            f"| {_fmt(r['worker_peak_rss_mib'] if r['workers'] else None, 1)} "
            f"| {_fmt(r['extra_disk_bytes'])} | {_fmt(r.get('setup_s'), 2)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Prepare the data, measure every case in its own process, print and save the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plays", type=int, default=3_000_000, help="synthetic plays to prepare")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "loader_bench")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader workers")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "loader_bench.json")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()

    if args.prepare_only or args.child:  # inside a measuring subprocess
        out = _prepare_child(args) if args.prepare_only else _case_child(args)
        print(json.dumps(out), flush=True)
        return

    load_start = _loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    prep = _run_child(["--prepare-only", "--plays", str(args.plays)], args)
    if "error" in prep:
        raise SystemExit(f"preparing the data failed: {prep['error']}")
    print(
        f"prepared folder {prep['folder']}: {prep['rows']:,} training plays in "
        f"{prep['blocks']} blocks ({prep['plays_bytes']:,} bytes of plays/*.parquet)",
        file=sys.stderr,
    )
    litdata_missing = _litdata_missing()
    results: list[Result] = []
    for case in args.cases:
        for w in [0] if case == "pyarrow-rows" else args.workers:
            if case == "litdata-rows" and litdata_missing:
                print(f"litdata-rows skipped: {litdata_missing}", file=sys.stderr)
                results.append({"case": case, "workers": w, "skipped": litdata_missing})
                continue
            extra = ["--child", case, "--child-workers", str(w), "--folder", prep["folder"]]
            r = _finish(case, w, _run_child(extra, args))
            print(f"{case} workers={w}: {r.get('error') or r['seconds']}", file=sys.stderr)
            results.append(r)
    load_end = _loadavg()

    versions = {n: _version(n) for n in ("litdata", "pyarrow", "torch", "polars", "numpy")}
    report = {
        "plays_requested": args.plays,
        "prepared": prep,
        "settings": {
            "block_rows": BLOCK_ROWS,
            "batch_size": BATCH_SIZE,
            "window": WINDOW,
            "shuffle_blocks": SHUFFLE_BLOCKS,
            "litdata_batch_size": LITDATA_BATCH,
        },
        "load_average_start": load_start,
        "load_average_end": load_end,
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "versions": versions,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"\n{prep['rows']:,} training plays, {prep['blocks']} blocks of <= {BLOCK_ROWS:,} rows; "
        f"batch {BATCH_SIZE}, window {WINDOW}, shuffle_blocks {SHUFFLE_BLOCKS}; "
        f"litdata batch {LITDATA_BATCH}\n"
    )
    print(table(results))
    print(
        f"\nload average (1, 5, 15 min) start {load_start}, end {load_end}; "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
        + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items())
    )
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
