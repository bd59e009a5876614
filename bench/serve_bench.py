"""Load benchmark of the HTTP service over loopback.

Starts ``twotower serve`` on 127.0.0.1 (a free port) as a child process, or drives one that
already runs on 127.0.0.1 (``--url``), with N concurrent clients (asyncio + httpx). Stops after
``--requests`` requests or ``--duration`` seconds, whichever comes first, then prints a Markdown
table of throughput and p50/p99 latency per endpoint.

    python bench/serve_bench.py --artifacts runs/default/artifacts --clients 8 --requests 4000

The client runs on the same machine and competes for the same cores, so the figures are a floor
for what the service does, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd

ENDPOINTS = ("recommend", "similar", "search", "healthz")
DEFAULT_MIX = "recommend=6,similar=2,search=1,healthz=1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload(artifacts: Path, seed: int) -> tuple[list[list[str]], list[str], list[str]]:
    """Histories, track ids and search strings drawn from the artifact."""
    rng = random.Random(seed)
    items = pd.read_parquet(artifacts / "items.parquet")
    ids = items["track_id"].astype(str).tolist()
    holdout = artifacts / "holdout.parquet"
    if holdout.is_file():
        histories = [[str(t) for t in h][-50:] for h in pd.read_parquet(holdout)["history"]]
        histories = [h for h in histories if h]
    else:
        histories = [rng.sample(ids, min(len(ids), rng.randint(5, 20))) for _ in range(500)]
    titles = items["title"].dropna().astype(str).tolist() if "title" in items else ids
    words = [w for t in titles for w in t.split() if len(w) >= 3] or ids
    queries = [rng.choice(words)[:6] for _ in range(500)]
    return histories, ids, queries


async def _client(
    http: httpx.AsyncClient,
    plan: list[str],
    next_job: list[int],
    deadline: float,
    work: tuple[list[list[str]], list[str], list[str]],
    rng: random.Random,
    out: dict[str, list[float]],
    errors: dict[str, int],
    k: int,
) -> None:
    histories, ids, queries = work
    while next_job[0] < len(plan) and time.perf_counter() < deadline:
        kind = plan[next_job[0]]
        next_job[0] += 1
        t0 = time.perf_counter()
        if kind == "recommend":
            req = http.post("/recommend", json={"history": rng.choice(histories), "k": k})
        elif kind == "similar":
            req = http.get(f"/similar/{rng.choice(ids)}", params={"k": k})
        elif kind == "search":
            req = http.get("/tracks/search", params={"q": rng.choice(queries), "limit": 20})
        else:
            req = http.get("/healthz")
        try:
            r = await req
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        dt = time.perf_counter() - t0
        if ok:
            out[kind].append(dt)
        else:
            errors[kind] += 1


async def _drive(url: str, args: argparse.Namespace, work) -> tuple[dict, dict, float]:
    weights = {kv.split("=")[0]: float(kv.split("=")[1]) for kv in args.mix.split(",") if kv}
    unknown = set(weights) - set(ENDPOINTS)
    if unknown:
        raise SystemExit(f"--mix: unknown endpoints {sorted(unknown)} (have {ENDPOINTS})")
    rng = random.Random(args.seed)
    kinds = list(weights)
    plan = rng.choices(kinds, weights=[weights[k] for k in kinds], k=args.requests)
    out: dict[str, list[float]] = {k: [] for k in kinds}
    errors = dict.fromkeys(kinds, 0)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as http:
        for _ in range(min(20, len(plan))):  # warm-up, not counted
            await http.post("/recommend", json={"history": work[0][0], "k": args.k})
        next_job = [0]
        deadline = time.perf_counter() + args.duration
        t0 = time.perf_counter()
        await asyncio.gather(
            *[
                _client(
                    http,
                    plan,
                    next_job,
                    deadline,
                    work,
                    random.Random(args.seed + i),
                    out,
                    errors,
                    args.k,
                )
                for i in range(args.clients)
            ]
        )
        wall = time.perf_counter() - t0
    return out, errors, wall


def _table(out: dict[str, list[float]], errors: dict[str, int], wall: float) -> str:
    lines = [
        "| endpoint | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = 0
    for kind, lat in out.items():
        total += len(lat)
        if lat:
            p50, p99 = np.percentile(np.asarray(lat) * 1000, [50, 99])
            lines.append(
                f"| {kind} | {len(lat)} | {errors[kind]} | {len(lat) / wall:.1f} "
                f"| {p50:.1f} | {p99:.1f} |"
            )
        else:
            lines.append(f"| {kind} | 0 | {errors[kind]} | 0 | - | - |")
    all_lat = np.concatenate([np.asarray(v) for v in out.values() if v] or [np.zeros(0)])
    if len(all_lat):
        p50, p99 = np.percentile(all_lat * 1000, [50, 99])
        lines.append(
            f"| **all** | {total} | {sum(errors.values())} | {total / wall:.1f} "
            f"| {p50:.1f} | {p99:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--artifacts", required=True, help="artifact folder (workload comes from it)")
    p.add_argument("--url", help="drive a running service on 127.0.0.1 instead of starting one")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=2000, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=30.0, help="... or after this many seconds")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"endpoint weights (default {DEFAULT_MIX})")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the raw figures as JSON")
    args = p.parse_args(argv)

    artifacts = Path(args.artifacts)
    work = _workload(artifacts, args.seed)
    server = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--url must be on loopback (127.0.0.1), got {host}")
        url = args.url.rstrip("/")
    else:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "twotower.cli",
            "serve",
            "--artifacts",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        server = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server is not None and server.poll() is not None:
                raise SystemExit(f"the service exited with {server.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit("the service did not answer /healthz within 120 s")
            time.sleep(0.2)
        health = httpx.get(url + "/healthz").json()
        out, errors, wall = asyncio.run(_drive(url, args, work))
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
    print(
        f"twotower serve, {health.get('catalogue_size')} tracks, index "
        f"{health.get('index', {}).get('factory')}; {args.clients} clients, "
        f"{sum(len(v) for v in out.values())} requests in {wall:.1f} s, k={args.k}\n"
    )
    print(_table(out, errors, wall))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "clients": args.clients,
                    "wall_s": wall,
                    "health": health,
                    "latency_ms": {k: [1000 * x for x in v] for k, v in out.items()},
                    "errors": errors,
                }
            )
        )
    return 0 if not any(errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
