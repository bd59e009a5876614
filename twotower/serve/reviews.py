"""Side-by-side review storage (SQLite) and the WTF report.

A reviewer sees a held-out listener's history and two recommendation lists, "A" and "B". Which
model sits behind which list is drawn at random per item (seeded by the item and the model pair,
so it is reproducible) and stored in the ``assignments`` table the first time the item is shown;
the reviewer never sees it. Each recommendation is marked ``good``, ``okay`` or ``wtf``.

Storage is one SQLite file in WAL mode. ``ratings`` holds one row per (reviewer, item, list,
position): rating again replaces the row (an upsert), it never adds a second one. Every thread
gets its own connection, and writers wait on a busy timeout instead of failing, so several
threads or processes may write at once without lost or duplicated ratings.

This module imports only the standard library (and numpy for the bootstrap), so the report runs
without torch, FAISS or FastAPI.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import sqlite3
import threading
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RATINGS = ("good", "okay", "wtf")
LISTS = ("A", "B")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS assignments (
    pair     TEXT NOT NULL,
    item     TEXT NOT NULL,
    list_a   TEXT NOT NULL,
    list_b   TEXT NOT NULL,
    seed     INTEGER NOT NULL,
    created  TEXT NOT NULL,
    PRIMARY KEY (pair, item)
);
CREATE TABLE IF NOT EXISTS ratings (
    reviewer TEXT NOT NULL,
    item     TEXT NOT NULL,
    list     TEXT NOT NULL CHECK (list IN ('A', 'B')),
    position INTEGER NOT NULL CHECK (position >= 0),
    track_id TEXT NOT NULL,
    model    TEXT NOT NULL,
    rating   TEXT NOT NULL CHECK (rating IN ('good', 'okay', 'wtf')),
    time     TEXT NOT NULL,
    PRIMARY KEY (reviewer, item, list, position)
);
"""

_UPSERT = """
INSERT INTO ratings (reviewer, item, list, position, track_id, model, rating, time)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (reviewer, item, list, position) DO UPDATE SET
    track_id = excluded.track_id,
    model = excluded.model,
    rating = excluded.rating,
    time = excluded.time
"""


@dataclass(frozen=True)
class Rating:
    """One stored rating (the ``model`` column is hidden from reviewers)."""

    reviewer: str
    item: str
    list: str
    position: int
    track_id: str
    model: str
    rating: str
    time: str


def check_reviewer(name: str) -> str:
    """A reviewer name, stripped; refused when it is empty or cannot be stored and shown safely.

    Control characters (NUL, newlines, tabs, escape, C1 controls) and lone UTF-16 surrogates
    (not valid Unicode: SQLite and every UTF-8 output would fail on them) are refused.

    Args:
        name: The name as received.

    Returns:
        The name without surrounding whitespace.

    Raises:
        ValueError: Empty, or naming the first refused character and its position.
    """
    for i, ch in enumerate(name):
        cat = unicodedata.category(ch)
        if cat == "Cs":
            raise ValueError(
                f"reviewer name has a lone surrogate U+{ord(ch):04X} at position {i} "
                "(not valid Unicode)"
            )
        if cat == "Cc":
            raise ValueError(
                f"reviewer name has a control character U+{ord(ch):04X} at position {i}"
            )
    name = name.strip()
    if not name:
        raise ValueError("reviewer name must not be empty")
    return name


def pair_key(model_a: str, model_b: str) -> str:
    """Order-free name of a model pair (the assignments table is keyed by it)."""
    return "|".join(sorted((model_a, model_b)))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ReviewStore:
    """Ratings and hidden list assignments in one SQLite file.

    Args:
        path: The SQLite file (created with its folder when missing).
        timeout: Seconds a writer waits for a lock held by another connection.
    """

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        con = self._con()
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        with con:
            con.executescript(_SCHEMA)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
            with self._lock:
                self._all.append(con)
        return con

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._lock:
            for con in self._all:
                con.close()
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- assignments ---------------------------------------------------------------------------

    def assign(self, items: list[str], model_a: str, model_b: str, seed: int) -> None:
        """Draw and store which model is list "A" for every item not yet assigned.

        The draw depends only on ``seed``, the model pair and the item, and an existing
        assignment is never changed, so restarting the service keeps what reviewers saw.

        Args:
            items: Item ids (held-out listener ids).
            model_a: Label of one model.
            model_b: Label of the other model.
            seed: Seed of the draw.
        """
        if model_a == model_b:
            raise ValueError(f"the two models must have different labels, both are {model_a!r}")
        pair = pair_key(model_a, model_b)
        first, second = sorted((model_a, model_b))
        rows = []
        for item in items:
            swap = random.Random(f"{seed}|{pair}|{item}").random() < 0.5
            la, lb = (second, first) if swap else (first, second)
            rows.append((pair, str(item), la, lb, int(seed), _now()))
        con = self._con()
        with con:
            con.executemany(
                "INSERT OR IGNORE INTO assignments VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def assignment(self, item: str, model_a: str, model_b: str) -> dict[str, str]:
        """Which model is behind each list for ``item``: ``{"A": label, "B": label}``.

        Raises:
            KeyError: The item was never assigned for this model pair.
        """
        row = (
            self._con()
            .execute(
                "SELECT list_a, list_b FROM assignments WHERE pair = ? AND item = ?",
                (pair_key(model_a, model_b), str(item)),
            )
            .fetchone()
        )
        if row is None:
            raise KeyError(item)
        return {"A": row[0], "B": row[1]}

    # -- ratings -------------------------------------------------------------------------------

    def rate(
        self,
        reviewer: str,
        item: str,
        list_name: str,
        position: int,
        track_id: str,
        model: str,
        rating: str,
    ) -> None:
        """Store (or replace) one rating.

        Args:
            reviewer: Reviewer name (see :func:`check_reviewer`).
            item: Reviewed item (held-out listener id).
            list_name: ``"A"`` or ``"B"``.
            position: 0-based rank within the list.
            track_id: The recommended track shown there.
            model: Label of the model behind the list (hidden from the reviewer).
            rating: ``good``, ``okay`` or ``wtf``.
        """
        reviewer = check_reviewer(reviewer)
        if list_name not in LISTS:
            raise ValueError(f"list must be one of {LISTS}, got {list_name!r}")
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {RATINGS}, got {rating!r}")
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        con = self._con()
        with con:
            con.execute(
                _UPSERT,
                (
                    reviewer,
                    str(item),
                    list_name,
                    int(position),
                    track_id,
                    model,
                    rating,
                    _now(),
                ),
            )

    def ratings(self, reviewer: str | None = None, item: str | None = None) -> list[Rating]:
        """Stored ratings, optionally of one reviewer and/or item, in key order."""
        sql = "SELECT reviewer, item, list, position, track_id, model, rating, time FROM ratings"
        where, args = [], []
        if reviewer is not None:
            where.append("reviewer = ?")
            args.append(reviewer)
        if item is not None:
            where.append("item = ?")
            args.append(str(item))
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY reviewer, item, list, position"
        return [Rating(*row) for row in self._con().execute(sql, args).fetchall()]


# -- statistics --------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95% by default).

    Returns ``(nan, nan)`` when ``n == 0``.
    """
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class ModelSummary:
    """Rating counts of one model and its WTF share with a Wilson 95% interval."""

    model: str
    n: int
    good: int
    okay: int
    wtf: int
    wtf_share: float
    wtf_low: float
    wtf_high: float


@dataclass
class PairedDifference:
    """WTF share of ``model_b`` minus ``model_a`` over (reviewer, item) units that rated both.

    Each unit contributes the difference of its two WTF shares; the interval is a percentile
    bootstrap over units (which keeps ratings of one list together, unlike a per-rating test).
    """

    model_a: str
    model_b: str
    units: int
    mean_diff: float
    low: float
    high: float


@dataclass
class ReviewReport:
    """Per-model WTF shares and paired differences."""

    models: list[ModelSummary]
    paired: list[PairedDifference]
    reviewers: int
    items: int
    ratings: int
    bootstrap: int = 2000
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form (NaN becomes ``None``)."""

        def clean(x: object) -> object:
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean(asdict(self))  # type: ignore[return-value]

    def to_csv(self) -> str:
        """One row per model and one per paired difference."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            [
                "kind",
                "model",
                "versus",
                "n",
                "good",
                "okay",
                "wtf",
                "wtf_share",
                "ci_low",
                "ci_high",
            ]
        )
        for m in self.models:
            w.writerow(
                [
                    "model",
                    m.model,
                    "",
                    m.n,
                    m.good,
                    m.okay,
                    m.wtf,
                    _f(m.wtf_share),
                    _f(m.wtf_low),
                    _f(m.wtf_high),
                ]
            )
        for d in self.paired:
            w.writerow(
                [
                    "paired_diff",
                    d.model_b,
                    d.model_a,
                    d.units,
                    "",
                    "",
                    "",
                    _f(d.mean_diff),
                    _f(d.low),
                    _f(d.high),
                ]
            )
        return buf.getvalue()

    def format(self) -> str:
        """Markdown tables for the terminal."""
        lines = [
            f"{self.ratings} ratings by {self.reviewers} reviewer(s) on {self.items} item(s)",
            "",
            "| model | n | good | okay | WTF | WTF share | 95% CI (Wilson) |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for m in self.models:
            lines.append(
                f"| {m.model} | {m.n} | {m.good} | {m.okay} | {m.wtf} | {_pct(m.wtf_share)} "
                f"| {_pct(m.wtf_low)} - {_pct(m.wtf_high)} |"
            )
        if self.paired:
            lines += [
                "",
                f"| WTF share difference | units | mean | 95% CI (bootstrap, {self.bootstrap}) |",
                "|---|---:|---:|---|",
            ]
            for d in self.paired:
                lines.append(
                    f"| {d.model_b} minus {d.model_a} | {d.units} | {_pct(d.mean_diff, True)} "
                    f"| {_pct(d.low, True)} - {_pct(d.high, True)} |"
                )
        lines += [f"\n{n}" for n in self.notes]
        return "\n".join(lines)


def _f(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6f}"


def _pct(x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def build_report(ratings: list[Rating], bootstrap: int = 2000, seed: int = 0) -> ReviewReport:
    """Summarise ratings per model and per model pair.

    Args:
        ratings: Stored ratings (see :meth:`ReviewStore.ratings`).
        bootstrap: Resamples for the paired-difference interval.
        seed: Seed of the bootstrap.
    """
    models: dict[str, dict[str, int]] = {}
    units: dict[tuple[str, str], dict[str, list[int]]] = {}
    for r in ratings:
        counts = models.setdefault(r.model, dict.fromkeys(RATINGS, 0))
        counts[r.rating] += 1
        per_model = units.setdefault((r.reviewer, r.item), {})
        per_model.setdefault(r.model, []).append(int(r.rating == "wtf"))
    summaries = []
    for name in sorted(models):
        c = models[name]
        n = sum(c.values())
        low, high = wilson_interval(c["wtf"], n)
        summaries.append(
            ModelSummary(name, n, c["good"], c["okay"], c["wtf"], c["wtf"] / n, low, high)
        )
    diffs: dict[tuple[str, str], list[float]] = {}
    for per_model in units.values():
        if len(per_model) != 2:
            continue
        a, b = sorted(per_model)
        share = {m: sum(v) / len(v) for m, v in per_model.items()}
        diffs.setdefault((a, b), []).append(share[b] - share[a])
    rng = np.random.default_rng(seed)
    paired = []
    for (a, b), d in sorted(diffs.items()):
        arr = np.asarray(d, dtype=np.float64)  # [U]
        if bootstrap > 0 and len(arr) > 1:
            idx = rng.integers(0, len(arr), size=(bootstrap, len(arr)))  # [R, U]
            means = arr[idx].mean(axis=1)  # [R]
            low, high = (float(x) for x in np.quantile(means, [0.025, 0.975]))
        else:
            low = high = math.nan
        paired.append(PairedDifference(a, b, len(arr), float(arr.mean()), low, high))
    notes = [
        "Wilson intervals treat ratings as independent; ratings of one list are correlated, so "
        "the paired bootstrap over (reviewer, item) is the honest comparison."
    ]
    return ReviewReport(
        models=summaries,
        paired=paired,
        reviewers=len({r.reviewer for r in ratings}),
        items=len({r.item for r in ratings}),
        ratings=len(ratings),
        bootstrap=bootstrap,
        notes=notes,
    )


def ratings_csv(ratings: list[Rating]) -> str:
    """Every rating as CSV, the hidden model included."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["reviewer", "item", "list", "position", "track_id", "model", "rating", "time"])
    for r in ratings:
        w.writerow([r.reviewer, r.item, r.list, r.position, r.track_id, r.model, r.rating, r.time])
    return buf.getvalue()


def report_main(args: argparse.Namespace) -> int:
    """``twotower review-report``: print the report, optionally write CSV / JSON."""
    path = Path(args.reviews)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such review file (written by `twotower serve`)")
    with ReviewStore(path) as store:
        ratings = store.ratings()
    report = build_report(ratings, bootstrap=args.bootstrap, seed=args.seed)
    print(report.format())
    if args.csv:
        Path(args.csv).write_text(report.to_csv())
    if args.ratings_csv:
        Path(args.ratings_csv).write_text(ratings_csv(ratings))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0
