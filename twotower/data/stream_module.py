"""Streaming training: a Parquet play log larger than memory as Lightning batches.

:class:`StreamingSessionDataModule` is the streaming counterpart of
:class:`~twotower.data.datamodule.SessionDataModule` (select it in a config with
``data: {class_path: twotower.data.stream_module.StreamingSessionDataModule, init_args: ..}``,
see ``configs/streaming.yaml``). It never holds the data set: memory follows ``chunk_rows`` and
``batch_rows``, the vocabulary (exact: per distinct track; hashed: per bucket) and the bounded
evaluation sample.

**Input contract.** A Parquet file or folder (files in name order, row groups in order: the
global row order of :func:`~twotower.data.streaming.list_fragments`) with the columns
``user_id`` and ``track_id`` and optionally ``timestamp`` (unix seconds), ``skipped`` (bool:
a skipped play is context, never a target), ``hour`` (0-23, else derived from the timestamp in
UTC) and ``context_type``; ``columns`` maps these names to the file's. Rows must be **grouped
by listener and ordered by time inside each listener** (as log exports sorted by user and time
are). The setup pass checks it and stops with a :class:`~twotower.data.schema.DataError` naming
the file and row: a timestamp earlier than the previous play of the same listener, or a
listener that reappears after another one inside the same chunk (a reappearance across chunks
is not detected: it would split that listener into two sequences, costing one target).
A sequence is a listener's plays (``sequence_by="user"``) or a session of them
(``"session"``: a new one after more than ``session_gap_minutes`` of inactivity).

**Setup pass** (:func:`scan`, one streaming pass on every rank, deterministic): the item
vocabulary of the training rows (exact, most frequent first, as ``Vocab.build``; or
:class:`~twotower.data.hashing.HashVocab` with ``num_buckets``), the item counts of the
training positives (logQ and popularity), the context-type vocabulary, the evaluation sample,
and counts (rows, targets, sequences).

**Training batches.** The rows are cut into ``world_size x max(num_workers, 1)`` balanced
contiguous shards (:func:`~twotower.data.streaming.plan_shard`), one per (DDP rank, loader
worker), and every shard into exactly ``K = ceil(min_shard_rows / batch_rows)`` blocks of
consecutive rows (the last one takes the remainder: at most ``batch_rows + 1`` rows), so every
rank runs the same number of steps. A block gives the windows
(:func:`~twotower.data.datamodule.build_windows`: ``window + 1`` positive items per window,
left-padded, every positive after the first of its sequence a target in exactly one window) of
its training rows; the windows of ``shuffle_batches`` consecutive blocks are pooled and dealt
back out as that many batches of equal window counts (so a block with few targets, e.g. a run
of held-out listeners, never makes an empty batch), in the same format as
``SessionDataModule``'s (``items``, ``hours``, ``contexts`` ``[B, L+1]``, ``users`` ``[B]``).
Memory: one batch of rows being decoded plus the windows of one pool. A sequence cut by a
block or shard boundary is not lost or duplicated: the last training positive before the cut
is carried over (read back from the file at a shard start) as the first, context-only item of
the continuing part, so every training target is trained on exactly once per epoch; the cut
only shortens the context of the few targets right after it (as any window start does). With
``shuffle`` the pooled windows are also shuffled (seeded by seed, epoch and shard; with
``persistent_workers`` the workers keep the epoch they started with, so the order repeats).

**Evaluation.** A hashed share of the listeners (``val_fraction``, ``test_fraction``;
``fmix64(fnv1a64(user_id))``, so every rank and worker agrees without a table) is held out of
training entirely (vocabulary and counts included); for each of their sequences with two or
more positives, the last positive is the target and up to ``window`` earlier positives the
history. At most ``max_eval_queries`` of them are kept, a seeded reservoir sample. This
measures generalisation to listeners never trained on, which is what the default query tower
(the listener is their history, no user id) serves. With ``val_path`` the validation (and
test) queries come from that separate Parquet file instead (same contract), and nothing is
held out of ``path``. Already-seen items are never filtered (listening logs repeat tracks).

**Export.** ``export.py --checkpoint CKPT`` recognises a streaming checkpoint (its
``datamodule_hyper_parameters``) and rebuilds this module from them: the setup pass (same
fingerprint check as in-memory data) gives the vocabulary, play counts and the validation
queries that tune the index. An exact vocabulary exports as usual (one index row per track).
A hashed one exports one index row per bucket and records ``HashVocab.to_dict()`` in the
manifest; :func:`track_catalogue` (one more pass, memory per distinct *training* track, at
export time only) lists the raw track ids of every bucket, so results carry real track ids
(the most played id of the bucket; all of them in ``items.parquet`` ``raw_ids``).

Not supported (yet): track side features (the item tower is id-only), resuming *mid-epoch*
(a run resumed from a mid-epoch checkpoint restarts that epoch's stream), ``export --users``
(no per-listener history is kept) and ``twotower pipeline`` (it rebuilds in-memory data).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from twotower.data.datamodule import EvalDataset, build_windows
from twotower.data.hashing import HashVocab, hash_buckets
from twotower.data.prepared import EvalSet, ItemFeatures, Sequences
from twotower.data.schema import DataError
from twotower.data.streaming import (
    DEFAULT_CHUNK_ROWS,
    ROW_KEY,
    CountAccumulator,
    Fragment,
    ParquetStream,
    list_fragments,
    read_rows,
    shard_bounds,
    vocab_from_counts,
)
from twotower.data.vocab import OOV_TOKEN, PAD_TOKEN, Vocab

Batch = dict[str, Tensor]
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
    u = hash_buckets(user_ids, HOLDOUT_RESOLUTION, seed=HOLDOUT_SEED) / HOLDOUT_RESOLUTION
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


# ------------------------------------------------------------------------------ training stream
@dataclass
class _Carry:
    """State carried from one block to the next: the previous row and the open sequence."""

    known: bool = False
    prev_key: Any = None
    prev_ts: int = -1
    # last training positive of the open sequence: item, hour, context, user index, row
    item: int = 0
    hour: int = -1
    context: int = 0
    user: int = 0
    row: int = -1

    @property
    def has_item(self) -> bool:
        return self.item != 0


class StreamingWindows(IterableDataset):
    """Training batches of windows from a Parquet stream (see the module docstring).

    Each item is one batch (``DataLoader(batch_size=None)``). ``len()`` is the number of
    batches of this rank per epoch, the same on every rank.

    Args:
        path: The Parquet data set.
        layout: Column mapping and sequence rule.
        item_vocab: Exact or hashed item vocabulary.
        context_vocab: Context types.
        user_vocab: Hashed user ids, or None.
        window: ``L``: inputs per window.
        batch_rows: Rows per batch (block).
        chunk_rows: Rows decoded at a time.
        rank: DDP rank.
        world_size: DDP world size.
        num_workers: DataLoader workers (the shards per rank; 0 counts as 1).
        shuffle: Shuffle windows across ``shuffle_batches`` consecutive batches.
        shuffle_batches: Batches per shuffle pool.
        seed: Base seed of the shuffle.
        emit_rows: Add ``rows [B, L+1]``: the global row of every window item (-1 padding),
            for tests.
    """

    def __init__(
        self,
        path: str | Path,
        layout: Layout,
        item_vocab: Vocab | HashVocab,
        context_vocab: Vocab,
        user_vocab: HashVocab | None,
        window: int,
        batch_rows: int,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        shuffle_batches: int = 8,
        seed: int = 0,
        emit_rows: bool = False,
    ) -> None:
        super().__init__()
        if batch_rows < 1 or window < 1:
            raise ValueError("batch_rows and window must be >= 1")
        self.path = Path(path)
        self.layout = layout
        self.item_vocab = item_vocab
        self.context_vocab = context_vocab
        self.user_vocab = user_vocab
        self.window = window
        self.batch_rows = batch_rows
        self.chunk_rows = chunk_rows
        self.rank = rank
        self.world_size = world_size
        self.workers = max(num_workers, 1)
        self.shuffle = shuffle
        self.shuffle_batches = max(shuffle_batches, 1)
        self.seed = seed
        self.emit_rows = emit_rows
        self.epoch = 0
        self.fragments = list_fragments(self.path, layout.file_columns)
        self.total_rows = sum(f.num_rows for f in self.fragments)
        self.num_shards = world_size * self.workers
        if self.total_rows < self.num_shards:
            raise DataError(
                f"{path}: {self.total_rows} rows cannot feed {world_size} ranks x "
                f"{self.workers} workers (need at least one row each)"
            )
        self.batches_per_shard = -(-(self.total_rows // self.num_shards) // batch_rows)
        self._where = _where_fn(self.fragments)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the shuffle order)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_shard * self.workers

    def shard(self, worker: tuple[int, int] | None = None) -> int:
        """Shard index of this rank and worker (``worker``: ``(id, count)``, else detected)."""
        if worker is None:
            info = get_worker_info()
            worker = (info.id, info.num_workers) if info is not None else (0, 1)
        if worker[1] != self.workers:
            raise RuntimeError(f"built for {self.workers} workers, run with {worker[1]}")
        return self.rank * self.workers + worker[0]

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_batches()

    def iter_batches(self, worker: tuple[int, int] | None = None) -> Iterator[Batch]:
        """The batches of one shard (``worker`` as in :meth:`shard`).

        Blocks are taken ``shuffle_batches`` at a time (a short last pool joins the one before)
        and their windows dealt back out evenly, shuffled when ``shuffle`` is on: a block
        with few targets (a run of skips, held-out listeners, a short last block) never makes
        an empty batch.

        Raises:
            DataError: A pool holds fewer windows than batches (too few rows per shard).
        """
        s = self.shard(worker)
        blocks = self._blocks(s)
        k, p = self.batches_per_shard, self.shuffle_batches
        pools = [p] * (k // p) + ([k % p] if k % p else [])
        if len(pools) > 1 and pools[-1] < p:
            short = pools.pop()
            pools[-1] += short
        rng = np.random.default_rng([self.seed, self.epoch, s]) if self.shuffle else None
        for size in pools:
            pool = [next(blocks) for _ in range(size)]
            dealt = _deal(pool, rng)
            if any(int(b["items"].shape[0]) == 0 for b in dealt):
                raise DataError(
                    f"{self.path}: shard {s} has {sum(len(b['items']) for b in pool)} training "
                    f"windows for {size} batches; use fewer workers/ranks or a smaller "
                    "batch_rows (each batch needs a training target)"
                )
            yield from dealt
        assert next(blocks, None) is None, "blocks left over"

    # -------------------------------------------------------------- blocks of one shard
    def _blocks(self, s: int) -> Iterator[Batch]:
        lo, hi = shard_bounds(self.total_rows, self.num_shards, s)
        stream = ParquetStream(
            self.path,
            self.layout.file_columns,
            chunk_rows=min(self.chunk_rows, self.batch_rows),
            rank=s,
            world_size=self.num_shards,
            row_index=True,
        )
        carry = self._lookback(lo)
        k = self.batches_per_shard
        sizes = [self.batch_rows] * (k - 1) + [hi - lo - self.batch_rows * (k - 1)]
        pending: list[Rows] = []
        pending_rows = 0
        chunks = stream.iter_chunks((0, 1))
        for size in sizes:
            while pending_rows < size:
                rows = decode(next(chunks), self.layout, self._where)
                pending.append(rows)
                pending_rows += len(rows)
            block = Rows.concat(pending)
            rest = block.take(slice(size, None))
            block = block.take(slice(0, size))
            pending, pending_rows = ([rest], len(rest)) if len(rest) else ([], 0)
            yield self._batch(block, carry)
        assert pending_rows == 0 and next(chunks, None) is None, "shard rows left over"

    def _lookback(self, lo: int) -> _Carry:
        """The carry at global row ``lo``, read back from the file.

        That is the row before ``lo`` and the last training positive of its sequence (read in
        growing steps back to where that sequence starts).
        """
        carry = _Carry()
        if lo == 0:
            return carry
        step = LOOKBACK_ROWS
        while True:
            a = max(0, lo - step)
            raw = read_rows(self.fragments, a, lo, self.layout.file_columns)
            rows = decode(raw, self.layout, self._where)
            new = sequence_starts(rows, self.layout)
            start = int(np.flatnonzero(new)[-1])
            tail = np.arange(start, len(rows))
            cand = tail[(rows.role[tail] == TRAIN) & rows.positive[tail]]
            if len(cand) or start > 0 or a == 0:
                break
            step *= 4
        carry.known, carry.prev_key, carry.prev_ts = True, rows.key[-1], int(rows.ts[-1])
        if len(cand):
            self._set_item(carry, rows, int(cand[-1]))
        return carry

    def _set_item(self, carry: _Carry, rows: Rows, i: int) -> None:
        one = rows.take(np.array([i]))
        idx = self._indices(one)
        carry.item = int(idx["items"][0])
        carry.hour = int(one.hour[0])
        carry.context = int(idx["contexts"][0])
        carry.user = int(idx["users"][0])
        carry.row = int(one.row[0])

    def _indices(self, rows: Rows) -> dict[str, np.ndarray]:
        n = len(rows)
        items = self.item_vocab.lookup(rows.track) if n else np.zeros(0, np.int64)
        if rows.context is not None and n:
            contexts = self.context_vocab.lookup(pd.Series(rows.context, dtype=object))
        else:
            contexts = np.zeros(n, dtype=np.int64)
        if self.user_vocab is not None and n:
            users = self.user_vocab.lookup(rows.key)
        else:
            users = np.zeros(n, dtype=np.int64)
        return {"items": items, "contexts": contexts, "users": users}

    def _batch(self, block: Rows, carry: _Carry) -> Batch:
        """Windows of one block; updates ``carry`` to the block's end."""
        new = sequence_starts(block, self.layout, carry.prev_key, carry.prev_ts, carry.known)
        seg = np.cumsum(new)  # 0 = the sequence continued from before the block
        keep = np.flatnonzero(block.role == TRAIN)
        tr = block.take(keep)
        seg_k = seg[keep]
        idx = self._indices(tr)
        items, hours, contexts, users = idx["items"], tr.hour, idx["contexts"], idx["users"]
        positive, rows = tr.positive, tr.row
        if carry.has_item and len(seg_k) and seg_k[0] == 0:
            items = np.concatenate([[carry.item], items])
            hours = np.concatenate([[carry.hour], hours])
            contexts = np.concatenate([[carry.context], contexts])
            users = np.concatenate([[carry.user], users])
            positive = np.concatenate([[True], positive])
            rows = np.concatenate([[carry.row], rows])
            seg_k = np.concatenate([[0], seg_k])
        # carry to the next block
        last = int(seg[-1])
        pos_last = np.flatnonzero(tr.positive & (seg[keep] == last))
        if len(pos_last):
            self._set_item(carry, tr, int(pos_last[-1]))
        elif last > 0:
            carry.item, carry.row = 0, -1
        carry.known, carry.prev_key, carry.prev_ts = True, block.key[-1], int(block.ts[-1])
        return self._windows(items, hours, contexts, users, positive, rows, seg_k)

    def _windows(
        self,
        items: np.ndarray,
        hours: np.ndarray,
        contexts: np.ndarray,
        users: np.ndarray,
        positive: np.ndarray,
        rows: np.ndarray,
        seg: np.ndarray,
    ) -> Batch:
        n = len(items)
        if n:
            starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
        else:
            starts = np.zeros(0, dtype=np.int64)
        offsets = np.r_[starts, n].astype(np.int64)
        seqs = Sequences(
            items=items.astype(np.int64),
            offsets=offsets,
            users=users[starts].astype(np.int64),
            hours=hours.astype(np.int8),
            contexts=contexts.astype(np.int64),
            positive=positive.astype(bool),
            timestamps=np.zeros(n, dtype=np.int64),
        )
        out = build_windows(seqs, self.window)
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
        if self.emit_rows:
            seqs.items = rows + 2  # the same layout, with row numbers instead of items
            batch["rows"] = torch.from_numpy(build_windows(seqs, self.window)["items"] - 2)
        return batch


def _deal(pool: list[Batch], rng: np.random.Generator | None) -> list[Batch]:
    """The windows of ``pool`` (shuffled by ``rng`` if given) dealt into ``len(pool)`` batches.

    Batches get equal numbers of windows (within one). Windows are not sorted by length: that
    saved padding compute but made batch shapes vary, which raised peak RSS by ~80-150 MiB
    (allocator high-water) in ``bench/scale_bench.py train-rss``.
    """
    merged = {k: torch.cat([b[k] for b in pool]) for k in pool[0]}
    total = int(merged["items"].shape[0])
    order = rng.permutation(total) if rng is not None else np.arange(total)
    perm = torch.from_numpy(order)
    cuts = np.linspace(0, total, len(pool) + 1).round().astype(np.int64)
    return [
        {k: v[perm[a:b]] for k, v in merged.items()}
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)
    ]


class _EpochLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch before every pass (workers copy it)."""

    def __init__(self, *args: Any, epoch_fn: Callable[[], int] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Any:
        if self.epoch_fn is not None:
            self.dataset.set_epoch(self.epoch_fn())
        return super().__iter__()


# ------------------------------------------------------------------------------ the DataModule
@dataclass
class StreamingData:
    """What :class:`~twotower.model.module.TwoTowerModule` reads from ``datamodule.data``.

    The same attributes as :class:`~twotower.data.prepared.PreparedData` that training uses
    (vocabularies, ``item_counts``, empty side ``features``, ``tracks``, ``fingerprint``,
    ``params``, ``valid``/``test``), without the training sequences (those are streamed).
    """

    item_vocab: Any
    user_vocab: Any
    context_vocab: Vocab
    valid: EvalSet
    test: EvalSet
    item_counts: np.ndarray
    features: ItemFeatures
    tracks: pd.DataFrame
    fingerprint: str
    params: dict[str, Any]
    stats: dict[str, int]

    @property
    def num_items(self) -> int:
        """Item vocabulary size including pad and OOV."""
        return len(self.item_vocab)

    @property
    def num_users(self) -> int:
        """User vocabulary size including pad and OOV (2 without user ids)."""
        return len(self.user_vocab)


class _HashedIds:
    """A hashed vocabulary seen as a Vocab with ``ids`` = bucket labels (for checkpoints)."""

    def __init__(self, vocab: HashVocab, prefix: str) -> None:
        self.vocab = vocab
        self.ids = [f"{prefix}#{i}" for i in range(vocab.num_buckets)]

    def __len__(self) -> int:
        return len(self.vocab)

    def lookup(self, raw: Any) -> np.ndarray:
        return self.vocab.lookup(raw)


def _fingerprint(path: str | Path, params: dict[str, Any]) -> str:
    """Hash of the files' names, sizes, modification times and row counts, and ``params``."""
    h = hashlib.sha256()
    for f in list_fragments(path):
        st = os.stat(f.path)
        h.update(f"{f.path}|{st.st_size}|{st.st_mtime_ns}|{f.row_group}|{f.num_rows}\n".encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _identity(batch: Batch) -> Batch:
    return batch


class StreamingSessionDataModule(pl.LightningDataModule):
    """Training from a Parquet play log larger than memory (see the module docstring).

    Args:
        path: Parquet file or folder of the plays, grouped by user and time-ordered.
        columns: Canonical column (``user_id``, ``track_id``, ``timestamp``, ``skipped``,
            ``hour``, ``context_type``) -> file column.
        sequence_by: ``user`` (one sequence per listener) or ``session`` (split by gaps).
        session_gap_minutes: Inactivity that starts a new session (``session`` only).
        num_buckets: Hash track ids into this many embedding rows (None: exact vocabulary).
        min_count: Exact vocabulary: minimum training plays of a track (else OOV).
        user_buckets: Hash user ids into this many rows for ``model.use_user`` (None: none).
        val_fraction: Share of listeners held out for validation.
        test_fraction: Share of listeners held out for test.
        val_path: Separate Parquet file(s) of validation plays (then nothing is held out of
            ``path`` and the test queries are the validation ones).
        max_eval_queries: Largest validation / test sample (a seeded reservoir).
        seed: Seed of the evaluation sample and the window shuffle.
        batch_rows: Plays (rows) per training batch; each gives about one example.
        eval_batch_size: Queries per evaluation batch.
        window: History length ``L`` of training windows and evaluation queries.
        chunk_rows: Rows decoded at a time (the reader's memory bound).
        shuffle: Shuffle windows across ``shuffle_batches`` consecutive batches.
        shuffle_batches: Batches per shuffle pool.
        num_workers: DataLoader worker processes (each reads its own shard).
        pin_memory: Pin host memory (None: when CUDA is available).
        persistent_workers: Keep workers alive between epochs.
    """

    def __init__(
        self,
        path: str,
        columns: dict[str, str] | None = None,
        sequence_by: str = "user",
        session_gap_minutes: float = 30.0,
        num_buckets: int | None = None,
        min_count: int = 1,
        user_buckets: int | None = None,
        val_fraction: float = 0.01,
        test_fraction: float = 0.01,
        val_path: str | None = None,
        max_eval_queries: int = 2000,
        seed: int = 0,
        batch_rows: int = 8192,
        eval_batch_size: int = 512,
        window: int = 50,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        shuffle: bool = True,
        shuffle_batches: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_rows < 1 or eval_batch_size < 1 or window < 1:
            raise ValueError("batch_rows, eval_batch_size and window must be >= 1")
        self.path = path
        self.window = window
        self.batch_rows = batch_rows
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        held = (0.0, 0.0) if val_path else (val_fraction, test_fraction)
        self.layout, _ = resolve_layout(
            path, columns, sequence_by, session_gap_minutes, held[0], held[1]
        )
        self._data: StreamingData | None = None
        self._train: StreamingWindows | None = None

    # ------------------------------------------------------------------ data and sizes
    @property
    def data(self) -> StreamingData:
        """Vocabularies, counts and evaluation queries (one streaming pass on first use)."""
        if self._data is None:
            self._data = self._scan()
        return self._data

    def _scan(self) -> StreamingData:
        hp = self.hparams
        res = scan(
            self.path,
            self.layout,
            self.window,
            num_buckets=hp.num_buckets,
            min_count=hp.min_count,
            user_buckets=hp.user_buckets,
            max_eval_queries=hp.max_eval_queries,
            chunk_rows=hp.chunk_rows,
            seed=hp.seed,
        )
        valid, test = res.valid, res.test
        if hp.val_path:
            vlayout, _ = resolve_layout(
                hp.val_path, hp.columns, hp.sequence_by, hp.session_gap_minutes, 0.0, 0.0
            )
            ev = scan(
                hp.val_path,
                vlayout,
                self.window,
                max_eval_queries=hp.max_eval_queries,
                chunk_rows=hp.chunk_rows,
                seed=hp.seed,
                eval_only=True,
                vocabs=(res.item_vocab, res.context_vocab, res.user_vocab),
            )
            valid = test = ev.valid
        if len(valid) == 0:
            raise DataError(
                f"{hp.val_path or self.path}: no validation queries (no held-out sequence "
                "with two or more positive plays); raise val_fraction or give val_path"
            )
        if isinstance(res.item_vocab, HashVocab):
            item_vocab: Any = _HashedIds(res.item_vocab, "bucket")
            labels = item_vocab.ids
        else:
            item_vocab = res.item_vocab
            labels = item_vocab.ids
        user_vocab: Any = (
            _HashedIds(res.user_vocab, "user") if res.user_vocab is not None else Vocab([])
        )
        v = len(item_vocab)
        features = ItemFeatures(
            artist=np.zeros(v, dtype=np.int64),
            album=np.zeros(v, dtype=np.int64),
            genres=np.zeros((v, 0), dtype=np.int64),
            year=np.zeros(v, dtype=np.int64),
            audio=np.zeros((v, 0), dtype=np.float32),
            artist_vocab=Vocab([]),
            album_vocab=Vocab([]),
            genre_vocab=Vocab([]),
        )
        tracks = pd.DataFrame(
            {"track_id": pd.Series([PAD_TOKEN, OOV_TOKEN, *labels], dtype="string")}
        )
        params = {
            "format": "parquet-stream",
            "sequence_by": hp.sequence_by,
            "filter_seen": False,
            "item_vocab": res.item_vocab.to_dict()
            if isinstance(res.item_vocab, HashVocab)
            else "exact",
            **{k: hp[k] for k in ("num_buckets", "min_count", "val_fraction", "test_fraction")},
        }
        return StreamingData(
            item_vocab=item_vocab,
            user_vocab=user_vocab,
            context_vocab=res.context_vocab,
            valid=valid,
            test=test,
            item_counts=res.item_counts,
            features=features,
            tracks=tracks,
            fingerprint=_fingerprint(self.path, dict(hp)),
            params=params,
            stats=res.stats,
        )

    @property
    def exclude_seen(self) -> bool:
        """Always False: listening logs repeat tracks."""
        return False

    @property
    def num_items(self) -> int:
        """Item vocabulary size including pad and OOV."""
        return self.data.num_items

    @property
    def num_users(self) -> int:
        """User vocabulary size including pad and OOV."""
        return self.data.num_users

    def model_sizes(self) -> dict[str, int]:
        """Data-derived constructor arguments of the model (no side features)."""
        return {
            "num_items": self.data.num_items,
            "num_users": self.data.num_users,
            "num_contexts": len(self.data.context_vocab),
            "num_artists": 0,
            "num_albums": 0,
            "num_genres": 0,
            "num_year_buckets": 0,
            "num_audio": 0,
            "max_genres": 1,
        }

    def track_catalogue(self) -> pd.DataFrame | None:
        """Raw track ids per bucket of a hashed vocabulary (see :func:`track_catalogue`).

        Returns:
            The table, or None for an exact vocabulary (its ``ids`` are the raw ids already).
        """
        vocab = self.data.item_vocab
        if not isinstance(vocab, _HashedIds):
            return None
        return track_catalogue(self.path, self.layout, vocab.vocab, self.hparams.chunk_rows)

    def train_dataset(self, rank: int = 0, world_size: int = 1) -> StreamingWindows:
        """The training stream of one rank."""
        hp = self.hparams
        d = self.data
        return StreamingWindows(
            self.path,
            self.layout,
            d.item_vocab.vocab if isinstance(d.item_vocab, _HashedIds) else d.item_vocab,
            d.context_vocab,
            d.user_vocab.vocab if isinstance(d.user_vocab, _HashedIds) else None,
            window=self.window,
            batch_rows=self.batch_rows,
            chunk_rows=hp.chunk_rows,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            shuffle=hp.shuffle,
            shuffle_batches=hp.shuffle_batches,
            seed=int(os.environ.get("PL_GLOBAL_SEED", hp.seed)),
        )

    def setup(self, stage: str | None = None) -> None:
        """Run the setup pass (every rank; deterministic)."""
        _ = self.data

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        """The shards of this rank: ``len()`` batches per epoch, equal on every rank."""
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        if self._train is None or (self._train.rank, self._train.world_size) != (rank, world):
            self._train = self.train_dataset(rank, world)
        epoch_fn = (
            (lambda: int(trainer.fit_loop.epoch_progress.current.processed))
            if trainer is not None
            else None
        )
        return _EpochLoader(
            self._train,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            epoch_fn=epoch_fn,
        )

    def eval_dataset(self, split: str) -> EvalDataset:
        """Evaluation queries of ``"valid"`` or ``"test"``."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        return EvalDataset(getattr(self.data, split), self.window, False)

    def _eval_loader(self, ds: Dataset) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=_identity,
            num_workers=0,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation queries in order."""
        return self._eval_loader(self.eval_dataset("valid"))

    def test_dataloader(self) -> DataLoader:
        """Test queries in order."""
        return self._eval_loader(self.eval_dataset("test"))
