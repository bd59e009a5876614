"""Data pipeline benchmark: raw files -> cached split arrays. Prints a Markdown table.

Cases (each timed in a fresh subprocess; peak RSS per case from ``os.wait4``, and the running
maximum from ``getrusage(RUSAGE_CHILDREN)``):

1. A MovieLens-1M-sized ``ratings.dat`` (1,000,209 rows, 6,040 users, ~3,706 movies, ``::``
   layout, plus ``movies.dat``) generated into a temp dir: cold (goal < 10 s) and cached second
   load (goal < 1 s).
2. ML-100K from ``../shared/data`` (skipped when absent): cold (goal < 2 s).
3. 20M synthetic plays generated, sessionized and split (goal < 3 min, peak RSS < 6 GiB), in
   memory only, and again with the prepared folder written (``cache_dir``).

Usage::

    python bench/data_bench.py [--repeats 3] [--plays 20000000] [--skip-20m] [--skip-small]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ML1M_ROWS, ML1M_USERS, ML1M_ITEMS = 1_000_209, 6_040, 3_706


# ----------------------------------------------------------------------------- ML-1M-like file
def write_ml1m(folder: Path, seed: int = 0) -> Path:
    """A MovieLens-1M-sized ``ratings.dat`` + ``movies.dat`` (same layout and sizes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_movies = 3_952
    movie_ids = np.sort(rng.choice(np.arange(1, n_movies + 1), ML1M_ITEMS, replace=False))
    # ratings per user: >= 20 (as in ML-1M), heavy tail, summing to exactly 1,000,209
    w = rng.lognormal(0.0, 1.2, ML1M_USERS)
    extra = rng.multinomial(ML1M_ROWS - 20 * ML1M_USERS, w / w.sum())
    counts = np.minimum(20 + extra, ML1M_ITEMS)
    short = ML1M_ROWS - counts.sum()
    while short > 0:  # re-spread what the cap removed
        room = np.flatnonzero(counts < ML1M_ITEMS)
        add = rng.choice(room, short)
        np.add.at(counts, add, 1)
        counts = np.minimum(counts, ML1M_ITEMS)
        short = ML1M_ROWS - counts.sum()
    # items without replacement per user, popularity-weighted (Gumbel top-k), in user chunks
    logw = -0.9 * np.log(np.arange(1, ML1M_ITEMS + 1)) + 0.0
    logw = logw[rng.permutation(ML1M_ITEMS)]
    users, items = [], []
    for lo in range(0, ML1M_USERS, 500):
        hi = min(lo + 500, ML1M_USERS)
        keys = logw[None, :] + rng.gumbel(size=(hi - lo, ML1M_ITEMS))
        order = np.argsort(-keys, axis=1)
        take = np.arange(ML1M_ITEMS)[None, :] < counts[lo:hi, None]
        users.append(np.broadcast_to(np.arange(lo, hi)[:, None], take.shape)[take])
        items.append(order[take])
    u = np.concatenate(users) + 1
    it = movie_ids[np.concatenate(items)]
    n = len(u)
    rating = rng.choice([1, 2, 3, 4, 5], n, p=[0.06, 0.11, 0.26, 0.35, 0.22])
    start = rng.integers(956_703_932, 1_040_000_000, ML1M_USERS)
    ts = start[u - 1] + rng.integers(0, 6_000_000, n) // np.maximum(counts[u - 1] // 20, 1)
    lines = (
        pd.Series(u).astype(str)
        + "::"
        + pd.Series(it).astype(str)
        + "::"
        + pd.Series(rating).astype(str)
        + "::"
        + pd.Series(ts).astype(str)
    )
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    genres = np.array(["Action", "Comedy", "Drama", "Romance", "Thriller", "Children's"])
    g1 = genres[rng.integers(0, len(genres), n_movies)]
    g2 = genres[rng.integers(0, len(genres), n_movies)]
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        for m in range(1, n_movies + 1):
            g = g1[m - 1] if g1[m - 1] == g2[m - 1] else f"{g1[m - 1]}|{g2[m - 1]}"
            title = f"Café Movie {m}" if m % 97 == 0 else f"Movie {m}"
            f.write(f"{m}::{title} ({1930 + m % 70})::{g}\n")
    return folder


# ----------------------------------------------------------------------------- child process
def child(spec: dict) -> dict:
    """Run one case in this (fresh) process and return timings."""
    t_import = time.perf_counter()
    from twotower.data.pipeline import DataConfig, prepare_data

    t_import = time.perf_counter() - t_import
    phases: dict[str, float] = {}

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("prepared %s in"):
                phases["build_s"], phases["load_s"] = record.args[1], record.args[2]

    log = logging.getLogger("twotower")
    log.setLevel(logging.INFO)
    log.addHandler(Grab())
    cfg = DataConfig(**spec)
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    elapsed = time.perf_counter() - t0
    r = data.report
    return {
        "seconds": elapsed,
        "import_s": t_import,
        **phases,
        "rows": r.rows_kept,
        "users": r.users,
        "tracks": r.tracks,
        "sessions": r.sessions,
        "maxrss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_case(spec: dict) -> dict:
    """``spec`` in a fresh interpreter; adds wall time and the child's peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed with exit code {proc.returncode}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["wall_s"] = wall
    res["peak_rss_mib"] = usage.ru_maxrss / 1024
    res["children_max_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return res


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--write-ml1m", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plays", type=int, default=20_000_000)
    ap.add_argument("--skip-20m", action="store_true")
    ap.add_argument("--skip-small", action="store_true", help="only the 20M cases")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.write_ml1m:
        write_ml1m(Path(args.write_ml1m))
        return

    rows: list[tuple[str, str, str, str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="data_bench-"))
    try:
        if not args.skip_small:
            _small_cases(tmp, args.repeats, rows)
        if not args.skip_20m:
            _large_cases(tmp, args.plays, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("| case | time (median) | peak RSS | goal | runs |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nTimes are prepare_data() inside a fresh process (imports excluded); "
        f"machine: {os.cpu_count()} CPUs, shared with other work while measured."
    )


def _small_cases(tmp: Path, repeats: int, rows: list[tuple[str, str, str, str, str]]) -> None:
    """ML-1M-sized cold and cached, ML-100K cold."""
    t0 = time.perf_counter()
    # in a child, so this process stays small (a forked child's peak RSS counts the parent)
    ml1m = tmp / "ml-1m"
    subprocess.run([sys.executable, __file__, "--write-ml1m", str(ml1m)], check=True)
    print(f"wrote ML-1M-sized files in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    cache = tmp / "cache"
    spec = {"format": "movielens", "path": str(ml1m), "cache_dir": str(cache)}
    cold, warm = [], []
    for _ in range(repeats):
        shutil.rmtree(cache, ignore_errors=True)
        cold.append(run_case(spec))
        warm.append(run_case(spec))
    c0 = cold[0]
    rows.append(
        (
            f"ML-1M-sized ratings.dat ({c0['rows']:,} rows, {c0['users']:,} users, "
            f"{c0['tracks']:,} items), cold",
            f"{_median(cold, 'seconds'):.2f} s (load {_median(cold, 'load_s'):.2f} s)",
            f"{_median(cold, 'peak_rss_mib'):.0f} MiB",
            "< 10 s",
            f"{repeats}",
        )
    )
    rows.append(
        (
            "ML-1M-sized, cached second load",
            f"{_median(warm, 'seconds'):.3f} s",
            f"{_median(warm, 'peak_rss_mib'):.0f} MiB",
            "< 1 s",
            f"{repeats}",
        )
    )
    ml100k = SHARED / "ml-100k"
    if ml100k.is_dir():
        spec = {"format": "movielens", "path": str(ml100k), "cache_dir": None}
        runs = [run_case(spec) for _ in range(repeats)]
        rows.append(
            (
                "ML-100K (shared/data), cold",
                f"{_median(runs, 'seconds'):.2f} s (load {_median(runs, 'load_s'):.2f} s)",
                f"{_median(runs, 'peak_rss_mib'):.0f} MiB",
                "< 2 s",
                f"{repeats}",
            )
        )
    else:
        rows.append(("ML-100K", f"skipped: {ml100k} not found", "", "< 2 s", "0"))


def _large_cases(tmp: Path, plays: int, rows: list[tuple[str, str, str, str, str]]) -> None:
    """Synthetic plays generated and prepared: in memory only, and written to the folder."""
    for folder in (None, str(tmp / "cache-20m")):
        spec = {
            "format": "synthetic",
            "options": {"preset": "default", "n_plays": plays},
            "cache_dir": folder,
        }
        r = run_case(spec)
        what = "generate + sessionize + split" + (
            " + write the prepared folder" if folder else " (in memory)"
        )
        rows.append(
            (
                f"synthetic {r['rows'] / 1e6:.1f}M plays ({r['users']:,} users, "
                f"{r['sessions']:,} sessions): {what}",
                f"{r['seconds']:.1f} s (generate {r['load_s']:.1f} s)",
                f"{r['peak_rss_mib'] / 1024:.2f} GiB",
                "< 3 min, < 6 GiB",
                "1",
            )
        )


if __name__ == "__main__":
    main()
