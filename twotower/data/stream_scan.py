"""Streaming training, part 1: decoding chunks of a play log and the setup pass.

The input contract and the whole design are described in :mod:`twotower.data.stream_module`.
Here: the held-out listener draw (:func:`holdout_roles`), column layout and decoding of one
chunk (:class:`Layout`, :class:`Rows`, :func:`decode`), sequence boundaries, the order checks
with located errors, the deterministic setup pass (:func:`scan`: vocabulary, counts, bounded
evaluation sample) and :func:`track_catalogue` (raw ids per hashed bucket, for export).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from twotower.data.prepared import EvalSet
from twotower.data.schema import DataError
from twotower.data.streaming import (
    DEFAULT_CHUNK_ROWS,
    ROW_KEY,
    CountAccumulator,
    Fragment,
    ParquetStream,
    list_fragments,
    vocab_from_counts,
)
from twotower.ids import HashVocab, Vocab, hash_buckets

REQUIRED = ("user_id", "track_id")
OPTIONAL = ("timestamp", "skipped", "hour", "context_type")
TRAIN, VALID, TEST = 0, 1, 2
HOLDOUT_SEED = 0x5EED  # hash function of the held-out listener draw (independent of buckets)
HOLDOUT_RESOLUTION = 1 << 30
LOOKBACK_ROWS = 1024


def holdout_roles(user_ids: Any, val_fraction: float, test_fraction: float) -> np.ndarray:
    """``TRAIN`` (0), ``VALID`` (1) or ``TEST`` (2) per row, from a stable hash of the user id.

    ``u = (fmix64(fnv1a64(user_id)) mod 2^30) / 2^30`` is uniform on [0, 1): ``u <
    val_fraction`` is validation, ``u < val_fraction + test_fraction`` test, else training.
    """
    if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: need both >= 0 "
            "and a sum < 1"
        )
    ids = np.asarray(user_ids, dtype=object)
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int8)
    # rows come grouped by listener: hash each run of equal ids once, then repeat
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    per_run = hash_buckets(ids[starts], HOLDOUT_RESOLUTION, seed=HOLDOUT_SEED)
    u = np.repeat(per_run, np.diff(np.r_[starts, len(ids)])) / HOLDOUT_RESOLUTION
    roles = np.zeros(len(u), dtype=np.int8)
    roles[u < val_fraction + test_fraction] = TEST
    roles[u < val_fraction] = VALID
    return roles


# ------------------------------------------------------------------------------ rows of a chunk
@dataclass(frozen=True)
class Layout:
    """How to read the file: canonical column -> file column, and the sequence rule.

    Attributes:
        columns: Canonical name -> file column, for the columns present.
        sequence_by: ``"user"`` or ``"session"``.
        gap_seconds: Inactivity that starts a new session (``"session"`` only).
        val_fraction: Held-out share of listeners for validation (0 with ``val_path``).
        test_fraction: Held-out share of listeners for test (0 with ``val_path``).
    """

    columns: dict[str, str]
    sequence_by: str
    gap_seconds: float
    val_fraction: float
    test_fraction: float

    @property
    def file_columns(self) -> list[str]:
        """The file columns to read."""
        return list(self.columns.values())


@dataclass
class Rows:
    """Canonical arrays of consecutive rows (one chunk or block), ``[n]`` each.

    Attributes:
        row: Global row number.
        key: User id (the sequence key), as read.
        ts: Unix seconds, -1 unknown.
        positive: False for skipped plays.
        track: Raw track ids.
        hour: Hour of day, -1 unknown.
        context: Raw context types (None when absent).
        role: ``TRAIN`` / ``VALID`` / ``TEST`` per row.
    """

    row: np.ndarray
    key: np.ndarray
    ts: np.ndarray
    positive: np.ndarray
    track: np.ndarray
    hour: np.ndarray
    context: np.ndarray | None
    role: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def take(self, idx: np.ndarray | slice) -> Rows:
        """The rows at ``idx``."""
        ctx = self.context[idx] if self.context is not None else None
        return Rows(
            self.row[idx],
            self.key[idx],
            self.ts[idx],
            self.positive[idx],
            self.track[idx],
            self.hour[idx],
            ctx,
            self.role[idx],
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        """Rows of ``parts`` one after the other."""
        if len(parts) == 1:
            return parts[0]
        ctx = np.concatenate([p.context for p in parts]) if parts[0].context is not None else None
        cat = np.concatenate
        return Rows(
            cat([p.row for p in parts]),
            cat([p.key for p in parts]),
            cat([p.ts for p in parts]),
            cat([p.positive for p in parts]),
            cat([p.track for p in parts]),
            cat([p.hour for p in parts]),
            ctx,
            cat([p.role for p in parts]),
        )


def _int_column(values: np.ndarray, fill: int) -> np.ndarray:
    s = pd.Series(values)
    return s.fillna(fill).to_numpy(dtype=np.int64) if s.isna().any() else s.to_numpy(np.int64)


def decode(chunk: dict[str, np.ndarray], layout: Layout, where: Callable[[int], str]) -> Rows:
    """Canonical :class:`Rows` of a chunk read from the file (with ``"_row"``).

    Args:
        chunk: File column -> values, plus the global row numbers.
        layout: Column mapping and hold-out fractions.
        where: Global row -> ``"<file>: row <n>"`` for error messages.

    Raises:
        DataError: A missing user or track id, or a non-integer timestamp (located).
    """
    c = layout.columns
    rows = np.asarray(chunk[ROW_KEY], dtype=np.int64)
    n = len(rows)
    key = chunk[c["user_id"]]
    track = chunk[c["track_id"]]
    for name, arr in (("user_id", key), ("track_id", track)):
        missing = pd.isna(arr)
        if missing.any():
            r = int(rows[np.flatnonzero(missing)[0]])
            raise DataError(f"{where(r)}: column {c[name]!r} is empty (a play needs one)")
    if "timestamp" in c:
        raw_ts = chunk[c["timestamp"]]
        try:
            ts = _int_column(raw_ts, -1)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"{where(int(rows[0]))}: column {c['timestamp']!r} must hold integer unix "
                f"seconds ({e})"
            ) from e
    else:
        ts = np.full(n, -1, dtype=np.int64)
    if "skipped" in c:
        positive = ~pd.Series(chunk[c["skipped"]]).fillna(False).to_numpy(dtype=bool)
    else:
        positive = np.ones(n, dtype=bool)
    hour = np.full(n, -1, dtype=np.int64)
    if "hour" in c:
        hour = _int_column(chunk[c["hour"]], -1)
    derive = (hour < 0) & (ts >= 0)
    hour[derive] = (ts[derive] // 3600) % 24
    context = chunk[c["context_type"]] if "context_type" in c else None
    if layout.val_fraction > 0 or layout.test_fraction > 0:
        role = holdout_roles(key, layout.val_fraction, layout.test_fraction)
    else:
        role = np.zeros(n, dtype=np.int8)
    return Rows(rows, key, ts, positive, track, hour, context, role)


def sequence_starts(
    rows: Rows, layout: Layout, prev_key: Any = None, prev_ts: int = -1, known: bool = False
) -> np.ndarray:
    """``[n]`` bool: the row starts a new sequence (new listener, or a session gap).

    Args:
        rows: Consecutive rows.
        layout: The sequence rule.
        prev_key: User id of the row before ``rows`` (when ``known``).
        prev_ts: Its timestamp.
        known: Whether the previous row is known; if not, the first row starts a sequence.
    """
    n = len(rows)
    new = np.ones(n, dtype=bool)
    if n == 0:
        return new
    key, ts = rows.key, rows.ts
    new[1:] = key[1:] != key[:-1]
    if known:
        new[0] = bool(key[0] != prev_key)
    if layout.sequence_by == "session":
        gap = layout.gap_seconds
        both = (ts[1:] >= 0) & (ts[:-1] >= 0)
        new[1:] |= both & (ts[1:] - ts[:-1] > gap)
        if known and ts[0] >= 0 and prev_ts >= 0:
            new[0] |= bool(ts[0] - prev_ts > gap)
    return new


# ------------------------------------------------------------------------------ the setup pass
@dataclass
class ScanResult:
    """What the setup pass learned (see :func:`scan`).

    Attributes:
        item_vocab: Exact vocabulary of the training rows, or the hashed one.
        item_counts: Training positives per item index ``[V]`` int64.
        context_vocab: Context types of the training rows.
        user_vocab: Hashed user vocabulary, or None (no user ids).
        valid: Validation queries.
        test: Test queries.
        stats: Counts: ``rows``, ``train_rows``, ``train_positives``, ``train_targets``,
            ``train_sequences``, ``held_out_rows``, ``held_out_sequences``.
    """

    item_vocab: Vocab | HashVocab
    item_counts: np.ndarray
    context_vocab: Vocab
    user_vocab: HashVocab | None
    valid: EvalSet
    test: EvalSet
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class _Query:
    """An evaluation sequence under construction: its last ``keep`` positive plays (raw)."""

    user: Any
    tracks: list[Any] = field(default_factory=list)
    hours: list[int] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)


class _Reservoir:
    """A seeded uniform sample of at most ``size`` finished evaluation sequences."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.items: list[_Query] = []
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def offer(self, q: _Query) -> None:
        if len(q.tracks) < 2:
            return
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(q)
            return
        j = int(self.rng.integers(self.seen))
        if j < self.size:
            self.items[j] = q


class _EvalCollector:
    """Collects held-out sequences (roles ``VALID``/``TEST``) row by row, bounded memory."""

    def __init__(self, keep: int, max_queries: int, seed: int) -> None:
        self.keep = keep
        self.res = {VALID: _Reservoir(max_queries, seed), TEST: _Reservoir(max_queries, seed + 1)}
        self.open: _Query | None = None
        self.open_role = TRAIN

    def feed(self, rows: Rows, new: np.ndarray) -> None:
        """Add the held-out rows of ``rows`` (``new``: sequence starts of every row).

        An open sequence ends at the first sequence start after its last row (possibly in a
        later chunk).
        """
        starts = np.flatnonzero(new)
        ctx = rows.context
        last = -1  # the open sequence's last row in this chunk (-1: before the chunk)
        for i in np.flatnonzero(rows.role != TRAIN).tolist():
            if self.open is not None and _any_between(starts, last, i):
                self.close()
            if self.open is None:
                self.open = _Query(rows.key[i])
                self.open_role = int(rows.role[i])
            last = i
            if rows.positive[i]:
                q = self.open
                q.tracks.append(rows.track[i])
                q.hours.append(int(rows.hour[i]))
                q.contexts.append(ctx[i] if ctx is not None else None)
                if len(q.tracks) > self.keep:
                    del q.tracks[0], q.hours[0], q.contexts[0]
        if self.open is not None and _any_between(starts, last, len(rows) - 1):
            self.close()

    def close(self) -> None:
        if self.open is not None:
            self.res[self.open_role].offer(self.open)
        self.open = None

    def eval_set(
        self,
        role: int,
        item_vocab: Vocab | HashVocab,
        context_vocab: Vocab,
        user_vocab: HashVocab | None,
    ) -> EvalSet:
        """The collected queries of ``role`` as an :class:`EvalSet` (history = earlier items)."""
        qs = self.res[role].items
        hist = [q.tracks[:-1] for q in qs]
        lens = np.array([len(h) for h in hist], dtype=np.int64)
        offsets = np.zeros(len(qs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = [t for h in hist for t in h]
        history = item_vocab.lookup(np.array(flat, dtype=object)) if flat else np.zeros(0, np.int64)
        targets = item_vocab.lookup(np.array([q.tracks[-1] for q in qs], dtype=object))
        users = (
            user_vocab.lookup(np.array([q.user for q in qs], dtype=object))
            if user_vocab is not None and qs
            else np.zeros(len(qs), dtype=np.int64)
        )
        ctx_raw = [q.contexts[-1] for q in qs]
        contexts = (
            context_vocab.lookup(pd.Series(ctx_raw, dtype=object))
            if qs
            else np.zeros(0, dtype=np.int64)
        )
        return EvalSet(
            history=history.astype(np.int64),
            offsets=offsets,
            targets=np.asarray(targets, dtype=np.int64),
            users=np.asarray(users, dtype=np.int64),
            hours=np.array([q.hours[-1] for q in qs], dtype=np.int8),
            contexts=np.asarray(contexts, dtype=np.int64),
            seen=np.zeros(0, dtype=np.int64),
            seen_offsets=np.zeros(len(qs) + 1, dtype=np.int64),
        )


def _any_between(starts: np.ndarray, a: int, b: int) -> bool:
    """Whether a sorted ``starts`` holds a value in ``(a, b]``."""
    return bool(np.searchsorted(starts, b, side="right") > np.searchsorted(starts, a, side="right"))


def _where_fn(fragments: list[Fragment]) -> Callable[[int], str]:
    """Global row -> ``"<file>: row <row within the file>"``."""
    first: dict[str, int] = {}
    for f in fragments:
        first.setdefault(f.path, f.start)
    starts = np.array([f.start for f in fragments], dtype=np.int64)

    def where(row: int) -> str:
        f = fragments[int(np.searchsorted(starts, row, side="right")) - 1]
        return f"{f.path}: row {row - first[f.path]}"

    return where


def resolve_layout(
    path: str | Path,
    columns: dict[str, str] | None,
    sequence_by: str,
    session_gap_minutes: float,
    val_fraction: float,
    test_fraction: float,
) -> tuple[Layout, list[Fragment]]:
    """The column mapping (required + present optional columns) and the fragments of ``path``.

    Raises:
        DataError: A required column is missing from a file, an unknown canonical name is
            mapped, ``sequence_by="session"`` without timestamps, or an unknown rule.
    """
    if sequence_by not in ("user", "session"):
        raise DataError(f"sequence_by must be 'user' or 'session', got {sequence_by!r}")
    mapping = dict(columns or {})
    unknown = sorted(set(mapping) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise DataError(f"columns: unknown name(s) {unknown}; known: {REQUIRED + OPTIONAL}")
    cols = {name: mapping.get(name, name) for name in REQUIRED}
    fragments = list_fragments(path, list(cols.values()))
    if not fragments:
        raise DataError(f"{path}: the Parquet data set has no rows")
    names = set(pq.ParquetFile(fragments[0].path).schema_arrow.names)
    for name in OPTIONAL:
        if mapping.get(name, name) in names:
            cols[name] = mapping.get(name, name)
        elif name in mapping:
            raise DataError(f"{fragments[0].path}: no column {mapping[name]!r} (for {name!r})")
    fragments = list_fragments(path, list(cols.values()))  # every file has them all
    if sequence_by == "session" and "timestamp" not in cols:
        raise DataError(f"{path}: sequence_by='session' needs a 'timestamp' column")
    layout = Layout(cols, sequence_by, session_gap_minutes * 60.0, val_fraction, test_fraction)
    return layout, fragments


def scan(
    path: str | Path,
    layout: Layout,
    window: int,
    num_buckets: int | None = None,
    min_count: int = 1,
    user_buckets: int | None = None,
    max_eval_queries: int = 2000,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    seed: int = 0,
    eval_only: bool = False,
    vocabs: tuple[Any, Vocab, HashVocab | None] | None = None,
) -> ScanResult:
    """One streaming pass: vocabularies, logQ counts, evaluation sample, order checks.

    Args:
        path: The Parquet data set.
        layout: From :func:`resolve_layout`.
        window: History length of evaluation queries.
        num_buckets: Hash the track ids into this many buckets (None: exact vocabulary).
        min_count: Exact vocabulary: tracks with fewer training plays map to OOV.
        user_buckets: Hash user ids into this many buckets (None: no user ids).
        max_eval_queries: Largest validation (and test) sample.
        chunk_rows: Rows decoded at a time.
        seed: Seed of the reservoir samples.
        eval_only: Every row is an evaluation row (a separate ``val_path`` file): collect
            queries only, with the vocabularies given in ``vocabs``.
        vocabs: ``(item_vocab, context_vocab, user_vocab)`` for ``eval_only``.

    Raises:
        DataError: Rows out of order (see the module docstring), located by file and row.
    """
    fragments = list_fragments(path, layout.file_columns)
    where = _where_fn(fragments)
    stream = ParquetStream(
        path, layout.file_columns, chunk_rows=chunk_rows, rank=0, world_size=1, row_index=True
    )
    hashed = HashVocab(num_buckets) if num_buckets else None
    track_counts = CountAccumulator(chunk_rows)
    pos_counts = CountAccumulator(chunk_rows)
    bucket_counts = np.zeros(len(hashed), dtype=np.int64) if hashed is not None else None
    ctx_counts = CountAccumulator(chunk_rows)
    collector = _EvalCollector(window + 1, max_eval_queries, seed)
    stats = dict.fromkeys(
        (
            "rows",
            "train_rows",
            "train_positives",
            "train_targets",
            "train_sequences",
            "held_out_rows",
            "held_out_sequences",
        ),
        0,
    )
    prev_key: Any = None
    prev_ts = -1
    known = False
    open_has_positive = False  # the open training sequence has had a positive already
    for chunk in stream.iter_chunks((0, 1)):
        rows = decode(chunk, layout, where)
        if eval_only:
            rows.role[:] = VALID
        new = sequence_starts(rows, layout, prev_key, prev_ts, known)
        _check_order(rows, new, layout, prev_key, prev_ts, known, where)
        train = rows.role == TRAIN
        stats["rows"] += len(rows)
        stats["train_rows"] += int(train.sum())
        stats["held_out_rows"] += int((~train).sum())
        stats["train_sequences"] += int((new & train).sum())
        stats["held_out_sequences"] += int((new & ~train).sum())
        # targets: training positives after the first positive of their sequence
        seg = np.cumsum(new)
        tp = np.flatnonzero(train & rows.positive)
        if len(tp):
            first_of_seg = np.ones(len(tp), dtype=bool)
            first_of_seg[1:] = seg[tp[1:]] != seg[tp[:-1]]
            if seg[tp[0]] == 0 and open_has_positive:
                first_of_seg[0] = False  # continues a sequence with a positive already
            stats["train_targets"] += int(len(tp) - first_of_seg.sum())
            stats["train_positives"] += len(tp)
        last_seg = seg[-1]
        if last_seg > 0:
            open_has_positive = bool(len(tp) and seg[tp[-1]] == last_seg)
        else:
            open_has_positive = open_has_positive or bool(len(tp))
        collector.feed(rows, new)
        if not eval_only:
            tr = rows.take(np.flatnonzero(train))
            trp = rows.take(tp)
            if hashed is not None:
                bucket_counts += np.bincount(hashed.lookup(trp.track), minlength=len(hashed))
            else:
                track_counts.add(_strings(tr.track))
                pos_counts.add(_strings(trp.track))
            if tr.context is not None:
                ctx_counts.add(_strings(tr.context))
        prev_key, prev_ts, known = rows.key[-1], int(rows.ts[-1]), True
    collector.close()
    if eval_only:
        assert vocabs is not None
        item_vocab, context_vocab, user_vocab = vocabs
        item_counts = np.zeros(len(item_vocab), dtype=np.int64)
    else:
        user_vocab = HashVocab(user_buckets, seed=1) if user_buckets else None
        context_vocab = vocab_from_counts(ctx_counts.table())
        if hashed is not None:
            item_vocab = hashed
            item_counts = bucket_counts
        else:
            item_vocab = vocab_from_counts(track_counts.table(), min_count)
            item_counts = np.zeros(len(item_vocab), dtype=np.int64)
            pc_table = pos_counts.table()
            idx = item_vocab.lookup(pc_table["value"].to_numpy(zero_copy_only=False))
            np.add.at(item_counts, idx, pc_table["n"].to_numpy())
        item_counts[:2] = 0  # pad / OOV are never candidates
    return ScanResult(
        item_vocab=item_vocab,
        item_counts=item_counts,
        context_vocab=context_vocab,
        user_vocab=user_vocab,
        valid=collector.eval_set(VALID, item_vocab, context_vocab, user_vocab),
        test=collector.eval_set(TEST, item_vocab, context_vocab, user_vocab),
        stats=stats,
    )


def track_catalogue(
    path: str | Path,
    layout: Layout,
    item_vocab: HashVocab,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> pd.DataFrame:
    """The raw track ids of the training rows per bucket of a hashed vocabulary (one pass).

    Memory: one row per distinct training track (Arrow counts), at export time only; the
    training itself never builds this table.

    Args:
        path: The Parquet data set.
        layout: From :func:`resolve_layout` (the same hold-out fractions as training).
        item_vocab: The hashed vocabulary the model was trained with.
        chunk_rows: Rows decoded at a time.

    Returns:
        ``index`` (item index ``2..num_buckets+1``), ``track_id`` (raw), ``plays`` (training
        positives), ``rows`` (training rows); sorted by index, then plays descending, then id.
    """
    fragments = list_fragments(path, layout.file_columns)
    where = _where_fn(fragments)
    stream = ParquetStream(
        path, layout.file_columns, chunk_rows=chunk_rows, rank=0, world_size=1, row_index=True
    )
    all_counts = CountAccumulator(chunk_rows)
    pos_counts = CountAccumulator(chunk_rows)
    for chunk in stream.iter_chunks((0, 1)):
        rows = decode(chunk, layout, where)
        train = rows.role == TRAIN
        all_counts.add(_strings(rows.track[train]))
        pos_counts.add(_strings(rows.track[train & rows.positive]))
    table = all_counts.table().to_pandas()
    plays = pos_counts.table().to_pandas().set_index("value")["n"]
    ids = table["value"].astype(str)
    out = pd.DataFrame(
        {
            "index": item_vocab.lookup(ids.to_numpy(dtype=object)),
            "track_id": ids.to_numpy(dtype=object),
            "plays": plays.reindex(ids).fillna(0).to_numpy(dtype=np.int64),
            "rows": table["n"].to_numpy(dtype=np.int64),
        }
    )
    out = out.sort_values(
        ["index", "plays", "track_id"], ascending=[True, False, True], kind="stable"
    )
    return out.reset_index(drop=True)


def _strings(values: np.ndarray) -> pa.Array:
    arr = pa.array(values, from_pandas=True)
    return (
        arr
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
        else arr.cast(pa.large_string())
    )


def _check_order(
    rows: Rows,
    new: np.ndarray,
    layout: Layout,
    prev_key: Any,
    prev_ts: int,
    known: bool,
    where: Callable[[int], str],
) -> None:
    """Raise DataError on a time reversal inside a listener or a listener seen twice here."""
    key, ts = rows.key, rows.ts
    same = np.zeros(len(rows), dtype=bool)
    same[1:] = key[1:] == key[:-1]
    back = np.zeros(len(rows), dtype=bool)
    back[1:] = same[1:] & (ts[1:] >= 0) & (ts[:-1] >= 0) & (ts[1:] < ts[:-1])
    if known and key[0] == prev_key and ts[0] >= 0 and prev_ts >= 0 and ts[0] < prev_ts:
        back[0] = True
    if back.any():
        i = int(np.flatnonzero(back)[0])
        before = int(ts[i - 1]) if i > 0 else prev_ts
        raise DataError(
            f"{where(int(rows.row[i]))}: timestamp {int(ts[i])} is earlier than the previous "
            f"play of user {key[i]!r} ({before}); streaming needs plays grouped by user and "
            "ordered by time (sort by user_id, timestamp)"
        )
    user_start = ~same
    if known:
        user_start[0] = key[0] != prev_key
    run_keys = pd.Series(key[user_start])
    dup = run_keys.duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(user_start)[np.flatnonzero(dup)[0]])
        raise DataError(
            f"{where(int(rows.row[i]))}: user {key[i]!r} appears again after other users; "
            "streaming needs plays grouped by user (sort by user_id, timestamp)"
        )
