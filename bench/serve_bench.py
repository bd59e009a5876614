"""Load benchmark of the HTTP service over loopback.

Starts ``twotower serve`` on 127.0.0.1 (a free port) as a child process, or drives one that
already runs on 127.0.0.1 (``--url``), with N concurrent clients (asyncio + httpx). Stops after
``--requests`` requests or ``--duration`` seconds, whichever comes first, then prints a Markdown
table of throughput and p50/p99 latency per endpoint.

    python bench/serve_bench.py --artifacts runs/default/artifacts --clients 8 --requests 4000

``--matrix`` compares service settings in one run: every setting of ``--setting`` (name and
server flags) is started once, side by side, and each (setting, client count) is measured in
``--rounds`` interleaved rounds, so a change in the machine's load hits all of them alike; the
table gives the median over rounds of throughput, p50 and p99, and the load average during
the measurements:

    python bench/serve_bench.py --artifacts /tmp/ml100k_art --mix recommend=1 --matrix \
        --clients-list 1,16 --rounds 3 --duration 10 \
        --setting "before=--max-batch 1" \
        --setting "after=--batch-window-ms 2 --max-batch 64 --workers 2"

``--client raw`` (the default of ``--matrix``) is a minimal keep-alive HTTP/1.1 client on
asyncio streams, far cheaper per request than httpx; the client runs on the same machine and
competes for the same cores either way, so the figures are a floor for what the service does,
not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
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


class RawClient:
    """One keep-alive HTTP/1.1 connection: POST JSON, read status and body (Content-Length).

    Args:
        host: Loopback address.
        port: Port.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> int:
        """Send one request and return its status (reconnecting when the server closed)."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n"
        ).encode()
        self.writer.write(head + data)
        assert self.reader is not None
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
                self.writer.close()
        await self.reader.readexactly(length)
        return status

    async def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()


async def _drive_raw(url: str, args: argparse.Namespace, work) -> tuple[dict, dict, float]:
    """POST /recommend only, over ``args.clients`` raw keep-alive connections."""
    parsed = urlparse(url)
    histories = work[0]
    clients = [RawClient(parsed.hostname, parsed.port) for _ in range(args.clients)]
    for c in clients:  # warm-up, not counted: every connection opened and used once
        await c.post("/recommend", {"history": histories[0], "k": args.k})
    out: dict[str, list[float]] = {"recommend": []}
    errors = {"recommend": 0}
    budget = [args.requests]
    deadline = time.perf_counter() + args.duration

    async def loop(c: RawClient, rng: random.Random) -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            body = {"history": rng.choice(histories), "k": args.k}
            t0 = time.perf_counter()
            try:
                ok = await c.post("/recommend", body) == 200
            except (OSError, asyncio.IncompleteReadError, ValueError):
                ok = False
                c.writer = None
            if ok:
                out["recommend"].append(time.perf_counter() - t0)
            else:
                errors["recommend"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(c, random.Random(args.seed + i)) for i, c in enumerate(clients)))
    wall = time.perf_counter() - t0
    for c in clients:
        await c.close()
    return out, errors, wall


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


def _start_server(artifacts: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    """``twotower serve`` with extra flags on a free loopback port; waits for /healthz."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "twotower.cli", "serve", "--artifacts", str(artifacts)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(url, server)
    except BaseException:
        _stop(server)
        raise
    return server, url


def _wait_healthy(url: str, server: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the service exited with {server.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit("the service did not answer /healthz within 120 s")
        time.sleep(0.2)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()


def _measure(url: str, args: argparse.Namespace, work) -> dict:
    """One load run: throughput, p50, p99 (all endpoints together), errors, load average."""
    drive = _drive_raw if args.client == "raw" else _drive
    load0 = os.getloadavg()[0]
    out, errors, wall = asyncio.run(drive(url, args, work))
    lat = np.concatenate([np.asarray(v) for v in out.values() if v] or [np.zeros(0)]) * 1000
    p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (np.nan, np.nan)
    return {
        "requests": int(len(lat)),
        "errors": int(sum(errors.values())),
        "rps": len(lat) / wall,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "load": (load0 + os.getloadavg()[0]) / 2,
    }


def _matrix(args: argparse.Namespace, work) -> int:
    """Every (setting, clients) in interleaved rounds; a table of medians over rounds."""
    settings = []
    for spec in args.setting or ["default="]:
        name, _, flags = spec.partition("=")
        settings.append((name.strip(), shlex.split(flags)))
    clients_list = [int(c) for c in args.clients_list.split(",") if c]
    servers = {}
    runs: dict[tuple[str, int], list[dict]] = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    uptime_before = _uptime()
    try:
        for name, flags in settings:
            servers[name] = _start_server(Path(args.artifacts), flags)
        health = httpx.get(servers[settings[0][0]][1] + "/healthz").json()
        for r in range(args.rounds):
            for name, _ in settings:
                for clients in clients_list:
                    args.clients = clients
                    res = _measure(servers[name][1], args, work)
                    runs.setdefault((name, clients), []).append(res)
                    print(
                        f"round {r + 1}/{args.rounds} {name} {clients} clients: "
                        f"{res['rps']:.0f} req/s, p50 {res['p50_ms']:.2f} ms, "
                        f"p99 {res['p99_ms']:.2f} ms, errors {res['errors']}, "
                        f"load {res['load']:.1f}",
                        file=sys.stderr,
                    )
    finally:
        for proc, _ in servers.values():
            _stop(proc)
    uptime_after = _uptime()
    print(
        f"twotower serve, {health.get('catalogue_size')} tracks, index "
        f"{health.get('index', {}).get('factory')}, k={args.k}, mix {args.mix}, client "
        f"{args.client}; {args.rounds} rounds of {args.duration:g} s (or {args.requests} "
        f"requests) per cell, medians over rounds; started {started}\n"
        f"uptime before: {uptime_before}\nuptime after:  {uptime_after}\n"
    )
    lines = [
        "| setting | server flags | clients | req/s | p50 ms | p99 ms | errors | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, flags in settings:
        for clients in clients_list:
            rs = runs[(name, clients)]
            med = {k: float(np.median([x[k] for x in rs])) for k in ("rps", "p50_ms", "p99_ms")}
            lines.append(
                f"| {name} | `{' '.join(flags) or '(defaults)'}` | {clients} | {med['rps']:.0f} "
                f"| {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | {sum(x['errors'] for x in rs)} "
                f"| {np.median([x['load'] for x in rs]):.1f} |"
            )
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": {n: f for n, f in settings},
                    "runs": {f"{n}|{c}": v for (n, c), v in runs.items()},
                    "uptime": [uptime_before, uptime_after],
                    "health": health,
                },
                indent=1,
            )
        )
    return 0 if not any(x["errors"] for v in runs.values() for x in v) else 1


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
    p.add_argument(
        "--server-flags", default="", help="extra `twotower serve` flags, e.g. '--max-batch 1'"
    )
    p.add_argument(
        "--client",
        choices=["httpx", "raw"],
        help="load generator: httpx (any mix; default) or raw (recommend only; --matrix default)",
    )
    p.add_argument("--matrix", action="store_true", help="compare --setting's side by side")
    p.add_argument(
        "--setting",
        action="append",
        metavar="NAME=FLAGS",
        help="with --matrix: a name and its `twotower serve` flags (repeatable)",
    )
    p.add_argument("--clients-list", default="1,16", help="with --matrix: client counts")
    p.add_argument("--rounds", type=int, default=3, help="with --matrix: interleaved rounds")
    args = p.parse_args(argv)
    args.client = args.client or ("raw" if args.matrix else "httpx")
    if args.client == "raw" and set(kv.split("=")[0] for kv in args.mix.split(",") if kv) != {
        "recommend"
    }:
        raise SystemExit("--client raw drives POST /recommend only: use --mix recommend=1")

    artifacts = Path(args.artifacts)
    work = _workload(artifacts, args.seed)
    if args.matrix:
        return _matrix(args, work)
    server = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--url must be on loopback (127.0.0.1), got {host}")
        url = args.url.rstrip("/")
        _wait_healthy(url, None)
    else:
        server, url = _start_server(artifacts, shlex.split(args.server_flags))
    try:
        health = httpx.get(url + "/healthz").json()
        drive = _drive_raw if args.client == "raw" else _drive
        out, errors, wall = asyncio.run(drive(url, args, work))
    finally:
        if server is not None:
            _stop(server)
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
