"""The preprocessing pipeline: load -> sessionize -> filter -> split -> vocabularies -> features.

:func:`prepare_data` turns a :class:`DataConfig` into :class:`~twotower.data.prepared.PreparedData`
and caches the result under ``cache_dir/<fingerprint[:16]>``; the fingerprint hashes the input
files' contents, the parameters and the cache format, so a changed file or option gives a new
key, and a damaged cache folder is rebuilt (never trusted).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from twotower import __version__
from twotower.data import splits as sp
from twotower.data.features import build_item_features
from twotower.data.prepared import (
    CACHE_FORMAT,
    DEFAULT_BLOCK_ROWS,
    PreparedData,
    list_blocks,
    memory_blocks,
)
from twotower.data.report import DataReport
from twotower.data.schema import DataError
from twotower.data.sessions import (
    Events,
    dedupe_consecutive,
    events_from_frame,
    sessionize_events,
)
from twotower.data.sources import load_source
from twotower.ids import OOV, PAD, BucketIds, HashVocab, Vocab

log = logging.getLogger("twotower")

# Bump when the preprocessing (or the synthetic generator) produces different arrays for the
# same input: it is part of the cache key, so old caches are not reused.
PIPELINE_VERSION = 4  # 3: k-core counts training rows only; 4: next_in_session, protocol
SKIPPED_REASON = "skipped play (kept as signal, not a positive)"
LISTENING_LOG_FORMATS = ("mssd", "lastfm", "synthetic")
COLD_TARGET_REASON = "cold target (not in training): counts as a miss"
RANDOM_HOLDOUT_NOTE = "random per-user holdout: no play order"
_CHOICES = {
    "sequence_by": ("auto", "user", "session"),
    "split": sp.SPLITS,
    "filter_seen": ("auto", "on", "off"),
}
_BOOL_WORDS = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}
_FRACTION = re.compile(r"\s*[+-]?(\d+\.\d*|\.\d+|[01])\s*")  # "0.8", ".8", "0", "1"
NO_USERS_MESSAGE = (
    "data.split=next_in_session follows each listener across sessions, so every row needs a "
    "'user_id', and {what}; use data.split=time with data.sequence_by=session (the next track "
    "given the same session's earlier plays) or data.split=leave_last_out"
)


@dataclass
class DataConfig:
    """The ``data`` section of a config (each field is ``--data.<name>`` on the training CLI).

    Attributes:
        format: Loader name (see :data:`twotower.data.sources.FORMATS`).
        path: Input file or folder (None for ``synthetic``).
        columns: Canonical column -> column name in the file (generic formats).
        options: Passed to the loader, e.g. ``{"preset": "tiny"}`` or ``{"min_rating": 4}``.
        session_gap_minutes: Inactivity (strictly more than this) that starts a new session.
        sequence_by: ``user`` | ``session`` | ``auto`` (user when every row has a user id).
        split: ``leave_last_out`` | ``time`` | ``next_in_session``. ``next_in_session``
            (listening logs with user ids; user sequences): one case per validation / test
            session, the next track of the session at a seeded-random position after its first
            positive, given every earlier play of the listener (earlier sessions included);
            a session belongs to the period in which it starts
            (:func:`~twotower.data.splits.next_in_session`).
        val_cutoff: Start of validation (``time`` and ``next_in_session``): an ISO date/time
            (UTC unless an offset is given), or a fraction in (0, 1): that quantile of the kept
            plays' timestamps, resolved once during preparation (``params["resolved_cutoffs"]``
            and the data report give the dates).
        test_cutoff: Start of test, likewise (both dates or both fractions).
        dedupe_consecutive: Remove consecutive repeats of a track inside a session.
        kcore: Iteratively drop users and tracks with fewer training rows than this (0 off;
            see :func:`~twotower.data.splits.split_events`).
        max_history: Events kept in each evaluation history (the most recent).
        filter_seen: ``auto`` | ``on`` | ``off``: drop already-seen items from evaluation
            rankings. Auto is on for explicit ratings (MovieLens) and for other non-log data
            whose sequences never repeat an item (HetRec pairs); off for listening logs (MSSD,
            Last.fm-1K, synthetic, data with repeats), where re-listening is normal. Resolved
            into ``params["filter_seen"]`` (bool).
        cache_dir: Cache folder (None disables caching).
        seed: Seed of everything random in preprocessing (random holdout order).
        block_rows: Training plays per block (a row group of whole sequences on disk): the
            unit that training reads, shuffles and shards by rank and worker.
        num_buckets: Hash track ids into this many embedding rows (None: one row per
            training track). Ids that share a bucket share a vector; a track first played
            after training still has one (its bucket's). Side features and display metadata
            of a bucket are its most played training track's.
    """

    format: str = "synthetic"
    path: str | None = None
    columns: dict[str, str] | None = None
    options: dict[str, Any] | None = None
    session_gap_minutes: float = 30.0
    sequence_by: str = "auto"
    split: str = "leave_last_out"
    val_cutoff: str | float | None = None
    test_cutoff: str | float | None = None
    dedupe_consecutive: bool = False
    kcore: int = 0
    max_history: int = 200
    filter_seen: str = "auto"
    cache_dir: str | None = ".cache/twotower"
    seed: int = 0
    block_rows: int = DEFAULT_BLOCK_ROWS
    num_buckets: int | None = None

    def __post_init__(self) -> None:
        self.filter_seen = _normalise_switch(self.filter_seen)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise DataError(
                    f"data.{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.block_rows < 1:
            raise DataError(f"data.block_rows must be >= 1, got {self.block_rows}")
        if self.num_buckets is not None and self.num_buckets < 1:
            raise DataError(f"data.num_buckets must be >= 1 or null, got {self.num_buckets}")
        if self.split in ("time", "next_in_session"):
            self._check_cutoffs()
        if self.split == "next_in_session" and self.sequence_by == "session":
            raise DataError(
                "data.split=next_in_session gives each case the listener's whole earlier history "
                "(earlier sessions included): use data.sequence_by=user or auto, or "
                "data.split=time for session sequences"
            )
        if self.max_history < 1:
            raise DataError("data.max_history must be >= 1")
        if self.session_gap_minutes <= 0:
            raise DataError("data.session_gap_minutes must be > 0")

    def _check_cutoffs(self) -> None:
        """Both cut-offs given, of one kind (dates or fractions in (0, 1)), validation first.

        Fractions given as text are stored as floats (one cache key per value).
        """
        if self.val_cutoff in (None, "") or self.test_cutoff in (None, ""):
            raise DataError(
                f"data.split={self.split} needs data.val_cutoff and data.test_cutoff (ISO dates, "
                "or fractions in (0, 1) such as 0.8 and 0.9: quantiles of the play times)"
            )
        val, test = cutoff_fraction(self.val_cutoff), cutoff_fraction(self.test_cutoff)
        if (val is None) != (test is None):
            raise DataError(
                "data.val_cutoff and data.test_cutoff: give two dates or two fractions, got "
                f"{self.val_cutoff!r} and {self.test_cutoff!r}"
            )
        if val is not None and test is not None:
            self.val_cutoff, self.test_cutoff = val, test
            if val >= test:
                raise DataError(
                    f"data.val_cutoff ({val}) must be earlier than data.test_cutoff ({test})"
                )
        elif parse_cutoff(self.val_cutoff) >= parse_cutoff(self.test_cutoff):
            raise DataError("data.val_cutoff must be earlier than data.test_cutoff")


def cutoff_fraction(value: str | float | dt.date) -> float | None:
    """The fraction of a relative cut-off (``0.8``, ``"0.8"``), None for a date.

    A float, or text that is a decimal number (or ``0`` / ``1``), is a fraction; an int other
    than 0 and 1 or other text (``2009``, ``2009-05-01``) is a date.

    Raises:
        DataError: A fraction outside the open interval (0, 1).
    """
    if isinstance(value, bool):
        raise DataError(f"cut-off {value!r}: expected an ISO date or a fraction in (0, 1)")
    if isinstance(value, float) or (isinstance(value, int) and value in (0, 1)):
        q = float(value)
    elif isinstance(value, str) and _FRACTION.fullmatch(value):
        q = float(value)
    else:
        return None
    if not 0.0 < q < 1.0:
        raise DataError(
            f"cut-off {value!r}: a relative cut-off must be a fraction strictly between 0 and 1 "
            "(the quantile of the play times), e.g. 0.8"
        )
    return q


def resolve_cutoffs(
    val_cutoff: str | float, test_cutoff: str | float, timestamps: np.ndarray
) -> tuple[int, int]:
    """Unix seconds of the two cut-offs; a fraction is that quantile of ``timestamps``.

    The quantile (linear interpolation) is rounded up to the second, so e.g. 0.8 puts about
    80% of the plays before the validation cut-off.

    Args:
        val_cutoff: ISO date or fraction in (0, 1).
        test_cutoff: ISO date or fraction in (0, 1).
        timestamps: Unix seconds of the kept plays, ``[N]`` (all known).

    Raises:
        DataError: Fractions that resolve to the same second (play times too concentrated).
    """
    out = []
    for value in (val_cutoff, test_cutoff):
        q = cutoff_fraction(value)
        if q is None:
            out.append(parse_cutoff(str(value)))
        else:
            out.append(int(np.ceil(np.quantile(timestamps, q))))
    if out[0] >= out[1]:
        raise DataError(
            f"cut-offs {val_cutoff!r} and {test_cutoff!r} resolve to {iso_utc(out[0])} and "
            f"{iso_utc(out[1])}: the validation period is empty (play times too concentrated; "
            "give dates or fractions further apart)"
        )
    return out[0], out[1]


def iso_utc(ts: int) -> str:
    """Unix seconds -> ISO date-time in UTC (what :func:`parse_cutoff` reads back)."""
    return pd.Timestamp(int(ts), unit="s", tz="UTC").isoformat()


def _normalise_switch(value: Any) -> str:
    """``True``/``"yes"``/``"on"`` -> ``"on"``, likewise off; other values unchanged."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _BOOL_WORDS.get(str(value).lower(), str(value).lower())


def parse_cutoff(value: str | dt.date) -> int:
    """ISO date or date-time -> unix seconds (UTC unless the string has an offset).

    Raises:
        DataError: Not an ISO date.
    """
    try:
        ts = pd.Timestamp(str(value))
    except (ValueError, TypeError) as e:
        raise DataError(f"cut-off {value!r}: expected an ISO date such as 2020-01-31") from e
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return int(ts.timestamp())


# ----------------------------------------------------------------------------- fingerprint
def _input_files(cfg: DataConfig) -> list[Path]:
    """Files that can influence the load: ``path`` (recursively) and ``*path`` options."""
    roots = [cfg.path] if cfg.path else []
    for key, value in sorted((cfg.options or {}).items()):
        if key.endswith("path") and isinstance(value, str) and os.path.exists(value):
            roots.append(value)
    files: list[Path] = []
    for root in roots:
        p = Path(root)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
    return files


def _params(cfg: DataConfig) -> dict[str, Any]:
    """The parameters that define the output (everything but the cache location)."""
    d = asdict(cfg)
    d.pop("cache_dir")
    return d


def fingerprint(cfg: DataConfig) -> str:
    """sha256 over the input files' contents and names, the parameters and the cache format.

    Raises:
        FileNotFoundError: ``cfg.path`` is set but does not exist.
    """
    if cfg.path and not os.path.exists(cfg.path):
        raise FileNotFoundError(f"data.path {cfg.path!r} does not exist")
    h = hashlib.sha256()
    versions = {"cache_format": CACHE_FORMAT, "version": __version__, "pipeline": PIPELINE_VERSION}
    h.update(json.dumps(versions).encode())
    h.update(json.dumps(_params(cfg), sort_keys=True, default=str).encode())
    for f in _input_files(cfg):
        h.update(f"\0{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- statistics
def _quantiles(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    q = np.quantile(lengths, [0.1, 0.5, 0.9])
    return {"p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]), "max": float(lengths.max())}


def popularity_stats(counts: np.ndarray) -> dict[str, float]:
    """Share of plays on the top 1% of tracks, Gini coefficient, tracks with one play.

    Args:
        counts: Plays per track (tracks with zero plays are ignored).
    """
    x = np.sort(counts[counts > 0]).astype(np.float64)
    n = len(x)
    if n == 0:
        return {}
    top = max(1, int(np.ceil(0.01 * n)))
    gini = float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * x.sum()) - (n + 1.0) / n)
    return {
        "top1pct_share": float(x[-top:].sum() / x.sum()),
        "gini": gini,
        "tracks_1_play": float((x == 1).sum()),
    }


def _vocab_from_codes(codes: np.ndarray, raw: np.ndarray) -> tuple[Vocab, np.ndarray]:
    """Vocabulary of the codes present (most frequent first, ties by id) and code -> index.

    Returns:
        The vocabulary, and an ``[len(raw) + 1]`` lookup where entry ``c + 1`` is the index of
        code ``c`` (OOV for codes absent from ``codes``) and entry 0 (code -1) is PAD.
    """
    counts = np.bincount(codes[codes >= 0], minlength=len(raw))
    present = np.flatnonzero(counts)
    order = pd.DataFrame({"id": raw[present].astype(str), "n": counts[present], "c": present})
    order = order.sort_values(["n", "id"], ascending=[False, True], kind="stable")
    lookup = np.full(len(raw) + 1, OOV, dtype=np.int32 if len(raw) < 2**31 - 3 else np.int64)
    lookup[0] = PAD
    lookup[order["c"].to_numpy() + 1] = np.arange(len(order)) + 2
    return Vocab(order["id"].tolist()), lookup


# ----------------------------------------------------------------------------- the pipeline
def _hashed_items(
    num_buckets: int, ev: Events, train: np.ndarray
) -> tuple[BucketIds, np.ndarray, pd.DataFrame, Vocab]:
    """Hashed track ids: the vocabulary, code -> index lookup, catalogue and bucket names.

    Returns:
        The :class:`BucketIds`; an ``[len(track_ids) + 1]`` lookup (entry ``c + 1`` is the
        bucket index of code ``c``, entry 0 PAD); the catalogue of raw training tracks
        (``track_id``, ``index``, ``plays``; most played first within a bucket); and a
        :class:`Vocab` naming bucket ``i`` by its most played training track (``bucket#i``
        when none hashed into it), for side features and display.
    """
    vocab = BucketIds(HashVocab(num_buckets))
    raw = ev.track_ids.astype(str)
    lookup = np.concatenate([[PAD], vocab.lookup(raw)]).astype(np.int64)
    codes = ev.track[train & ev.positive]
    plays = np.bincount(codes[codes >= 0], minlength=len(raw))
    seen = np.unique(ev.track[train])
    cat = pd.DataFrame({"track_id": raw[seen], "index": lookup[seen + 1], "plays": plays[seen]})
    cat = cat.sort_values(["index", "plays", "track_id"], ascending=[True, False, True])
    cat = cat.reset_index(drop=True)
    names = list(vocab.ids)
    for idx, tid in cat.drop_duplicates("index")[["index", "track_id"]].itertuples(False):
        names[idx - 2] = tid
    return vocab, lookup, cat, Vocab(names)


def _resolve_sequence_by(cfg: DataConfig, ev: Events) -> str:
    has_users = bool(len(ev)) and bool((ev.user >= 0).all())
    if cfg.split == "next_in_session" and not has_users:
        n = int((ev.user < 0).sum())
        what = "this data has none" if n == len(ev) else f"{n:,} rows of this data have none"
        raise DataError(NO_USERS_MESSAGE.format(what=what))
    if cfg.sequence_by == "auto":
        return "user" if has_users else "session"
    if cfg.sequence_by == "user" and not has_users:
        raise DataError("data.sequence_by=user, but some rows have no 'user_id'")
    return cfg.sequence_by


def _resolve_filter_seen(
    cfg: DataConfig, source: str, seq: np.ndarray, ev: Events, roles: np.ndarray
) -> tuple[bool, str]:
    """Resolve ``filter_seen``; returns the choice and the reason for the report.

    Auto is on for explicit ratings (MovieLens) and for other non-log sources whose sequences
    never repeat an item (e.g. HetRec user-artist pairs); off for listening logs (MSSD,
    Last.fm-1K, synthetic, or any data with repeats), where re-listening is normal.
    """
    if cfg.filter_seen != "auto":
        return cfg.filter_seen == "on", f"filter_seen {cfg.filter_seen} (set in the config)"
    rows = np.flatnonzero((roles == sp.TRAIN) & ev.positive)
    pairs = seq[rows].astype(np.int64) * (len(ev.track_ids) + 1) + ev.track[rows]
    repeats = len(pairs) - len(sp.sorted_unique(pairs))
    if "movielens" in source.lower() or cfg.format == "movielens":
        on, why = True, "explicit ratings"
    elif cfg.format in LISTENING_LOG_FORMATS:
        on, why = False, "listening log: re-listening is normal"
    else:
        on = repeats == 0
        why = f"{repeats:,} training plays repeat an earlier item of their sequence"
    return on, f"filter_seen auto -> {'on' if on else 'off'} ({why})"


def _build(cfg: DataConfig, fp: str) -> PreparedData:
    t0 = time.perf_counter()
    res = load_source(cfg.format, cfg.path, cfg.columns, **(cfg.options or {}))
    report = res.report
    report.source = report.source or res.source or cfg.format
    report.files = report.files or list(res.files)
    if not report.rows_read:
        report.rows_read = len(res.interactions) + report.rows_dropped
    t_load = time.perf_counter() - t0
    if len(res.interactions) == 0:
        raise DataError(f"{cfg.path or cfg.format}: no interactions left after loading")

    ev = events_from_frame(res.interactions)
    res.interactions = res.interactions.iloc[:0]  # free the table: only the arrays go on
    pa.default_memory_pool().release_unused()
    if not any("skipped" in k for k in report.counted):
        report.count(SKIPPED_REASON, int((~ev.positive).sum()))
    if not res.ordered:
        if cfg.split != "leave_last_out":
            raise DataError(
                f"{report.source}: data.split={cfg.split} needs play times; use leave_last_out"
            )
        report.notes.append(RANDOM_HOLDOUT_NOTE)
    ev = sessionize_events(ev, cfg.session_gap_minutes, random_order=not res.ordered, seed=cfg.seed)
    if cfg.dedupe_consecutive:
        ev = dedupe_consecutive(ev, report)
    sequence_by = _resolve_sequence_by(cfg, ev)
    cutoffs = None
    if cfg.split != "leave_last_out":
        if (ev.timestamp < 0).any():
            raise DataError(f"data.split={cfg.split}: some rows have no timestamp")
        # relative cut-offs: quantiles of the kept plays, resolved once here
        cutoffs = resolve_cutoffs(cfg.val_cutoff or "", cfg.test_cutoff or "", ev.timestamp)
    # k-core after the roles, counting training rows only (no leak from later plays)
    ev, seq, roles = sp.split_events(
        ev, sequence_by, cutoffs, cfg.kcore, report, split=cfg.split, seed=cfg.seed
    )
    if len(ev) == 0 or (cfg.kcore > 1 and not (roles == sp.TRAIN).any()):
        why = (
            f"the k-core filter (data.kcore={cfg.kcore}) keeps only listeners and tracks with "
            f"{cfg.kcore}+ training plays; lower it (--data.kcore 2, or 0 for off, e.g. for one "
            "listener's file) or use more data"
            if cfg.kcore > 1
            else "check the cut-offs (data.val_cutoff, data.test_cutoff) and the input"
        )
        raise DataError(f"{report.source}: no training plays left after filtering: {why}")

    # Vocabularies from the training rows only: later tracks/users/contexts map to OOV.
    train = roles == sp.TRAIN
    catalogue = None
    if cfg.num_buckets:
        item_vocab, item_lut, catalogue, rep_vocab = _hashed_items(cfg.num_buckets, ev, train)
    else:
        item_vocab, item_lut = _vocab_from_codes(ev.track[train], ev.track_ids)
        rep_vocab = item_vocab
    user_vocab, user_lut = _vocab_from_codes(ev.user[train], ev.user_ids)
    ctx_vocab, ctx_lut = _vocab_from_codes(ev.context[train], ev.context_ids)
    items = item_lut[ev.track + 1]
    users = user_lut[ev.user + 1]
    contexts = ctx_lut[ev.context + 1]

    train_rows = np.flatnonzero(train)
    sequences = sp.build_sequences(
        train_rows, seq, items, users, ev.hour, contexts, ev.positive, ev.timestamp
    )
    evals = {}
    for name, role in (("valid", sp.VALID), ("test", sp.TEST)):
        rows = np.flatnonzero(roles == role)
        report.count(COLD_TARGET_REASON, int((items[rows] == OOV).sum()))
        evals[name] = sp.build_eval_set(
            rows, seq, ev.positive, items, users, ev.hour, contexts, cfg.max_history, ev.timestamp
        )
    item_counts = np.bincount(
        items[train_rows[ev.positive[train_rows]]], minlength=len(item_vocab)
    ).astype(np.int64)
    # hashed: the features and display row of a bucket are its most played training track's
    features, display = build_item_features(
        res.tracks, rep_vocab, report if catalogue is None else None
    )
    filter_seen, why = _resolve_filter_seen(cfg, report.source, seq, ev, roles)
    report.notes.append(why)

    # The report.
    report.rows_kept = len(ev)
    report.users = int(np.count_nonzero(np.bincount(ev.user[ev.user >= 0])))
    report.tracks = int(np.count_nonzero(np.bincount(ev.track)))
    report.sessions = int(ev.session[-1]) + 1
    known = ev.timestamp[ev.timestamp >= 0]
    report.time_min = int(known.min()) if len(known) else None
    report.time_max = int(known.max()) if len(known) else None
    report.session_length = _quantiles(np.bincount(ev.session))
    report.popularity = popularity_stats(np.bincount(ev.track))
    report.split = {
        "train_events": int(len(train_rows)),
        "train_positives": int(ev.positive[train_rows].sum()),
        "train_sequences": len(sequences),
        "valid": len(evals["valid"]),
        "test": len(evals["test"]),
        "held_out_events": int((roles == sp.HELD_OUT).sum()),
    }
    report.protocol = _protocol(cfg, sequence_by, cutoffs)
    params = {
        **_params(cfg),
        "sequence_by": sequence_by,
        "filter_seen": filter_seen,
        "source": report.source,
        "ordered": bool(res.ordered),
    }
    if cutoffs is not None:
        params["resolved_cutoffs"] = {
            "val_cutoff": iso_utc(cutoffs[0]),
            "test_cutoff": iso_utc(cutoffs[1]),
        }
    log.info("prepared %s in %.2f s (load %.2f s)", report.source, time.perf_counter() - t0, t_load)
    return PreparedData(
        item_vocab=item_vocab,
        user_vocab=user_vocab,
        context_vocab=ctx_vocab,
        train_sequences=sequences,
        valid=evals["valid"],
        test_set=evals["test"],
        item_counts=item_counts,
        features=features,
        tracks=display,
        report=report,
        fingerprint=fp,
        params=params,
        blocks=memory_blocks(sequences, cfg.block_rows),
        catalogue=catalogue,
    )


def _protocol(cfg: DataConfig, sequence_by: str, cutoffs: tuple[int, int] | None) -> dict[str, str]:
    """The evaluation protocol for the data report: split kind, description, cut-offs."""
    unit = "listener" if sequence_by == "user" else "session"
    if cfg.split == "leave_last_out":
        text = (
            f"per {unit}: last positive -> test, second-to-last -> validation, "
            "given the positives before it"
        )
    elif cfg.split == "time" and sequence_by == "user":
        text = (
            "per listener: first positive of the validation (test) period, given every earlier "
            "positive; forward in time"
        )
    elif cfg.split == "time":
        text = (
            "per session starting in the validation (test) period: its last positive, given "
            "the session's earlier positives; forward in time"
        )
    else:
        text = (
            "one case per validation (test) session: the next track at a seeded-random "
            f"position after the session's first positive (seed {cfg.seed}), given every "
            "earlier play of the listener (earlier sessions included, boundaries marked by the "
            "play gaps); a session belongs to the period in which it starts; forward in time"
        )
    out = {"split": cfg.split, "sequence_by": sequence_by, "description": text}
    if cutoffs is not None:
        out["val_cutoff"] = iso_utc(cutoffs[0])
        out["test_cutoff"] = iso_utc(cutoffs[1])
        fractions = [cutoff_fraction(c) for c in (cfg.val_cutoff or "", cfg.test_cutoff or "")]
        out["cutoffs_from"] = (
            f"quantiles {fractions[0]:g} / {fractions[1]:g} of the kept plays' timestamps"
            if fractions[0] is not None and fractions[1] is not None
            else "dates in the config"
        )
    return out


def cache_path(cfg: DataConfig, fp: str | None = None) -> Path | None:
    """Folder of the cached result of ``cfg`` (None when caching is off)."""
    if cfg.cache_dir is None:
        return None
    return Path(cfg.cache_dir) / (fp or fingerprint(cfg))[:16]


def prepare_data(cfg: DataConfig, log_report: bool = True, in_memory: bool = True) -> PreparedData:
    """Load, sessionize, filter, split and encode the data of ``cfg`` once, into a folder.

    The prepared folder (``cache_dir/<fingerprint[:16]>``, see
    :mod:`twotower.data.prepared`) is the cache: a folder whose fingerprint matches is read
    instead of preparing again; a truncated or corrupt one is logged as a warning and rebuilt.

    Args:
        cfg: The data options.
        log_report: Log the data report when the data is built (a caller that prints the
            report itself passes False, so it is not shown twice).
        in_memory: Hold the training plays in memory (False: they stay on disk and training
            streams them block by block; needs ``cache_dir``).

    Raises:
        DataError: Bad input or impossible settings (the message names the file/column/option).
    """
    fp = fingerprint(cfg)
    folder = cache_path(cfg, fp)
    if folder is None and not in_memory:
        raise DataError("streamed training reads the prepared folder: set data.cache_dir")
    if folder is not None and folder.exists():
        try:
            t0 = time.perf_counter()
            data = PreparedData.load(folder, train=in_memory)
            if data.fingerprint != fp:
                raise ValueError(f"{folder}: fingerprint mismatch")
            log.info("prepared data found: %s (%.2f s)", folder, time.perf_counter() - t0)
            return data
        except ValueError as e:
            log.warning("prepared data at %s is unusable, rebuilding: %s", folder, e)
    elif folder is not None:
        log.info("preparing the data into %s", folder)
    data = _build(cfg, fp)
    if log_report:
        log.info("%s", data.report.format())
    if folder is not None:
        data.save(folder, cfg.block_rows)
        if not in_memory:  # the plays are on disk now: leave them there
            data.train_sequences, data.blocks = None, list_blocks(folder)
            data.folder = folder
    return data


def data_report(cfg: DataConfig) -> DataReport:
    """The report of :func:`prepare_data` (what ``twotower data-report`` prints; not logged)."""
    return prepare_data(cfg, log_report=False).report


def replace_config(cfg: DataConfig, **changes: Any) -> DataConfig:
    """A copy of ``cfg`` with fields changed (validated again)."""
    return dataclasses.replace(cfg, **changes)
