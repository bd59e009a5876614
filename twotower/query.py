"""The query contract: :class:`QueryBatch` and the one builder of query-tower inputs.

Every place that turns listening histories into query-tower inputs goes through this module:
training and validation batches, ``evaluate``, ``compare``, ``drift``, ``export`` (listener
vectors), the :class:`~twotower.retrieve.Retriever`, the HTTP service and the ONNX encoder.

A history is a list of item indices, oldest first, **left-padded** with 0 to a common length
(index 1 means out of vocabulary). The per-play signals (skip mark, gap since the previous
play, hour of day and weekday) travel aligned with it, the request context beside it. Which fields a
given tower reads, their dtypes, shapes and the value that means "unknown" are described by
:class:`QuerySpec`, which the export writes into ``manifest.json`` so that a client holding only
onnxruntime can call ``query_tower.onnx``.

This module imports neither training-data code nor Lightning: serving uses it as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

PAD = 0  # history padding, and "unknown" for every index field
OOV = 1  # an id the vocabulary does not know
UNKNOWN_HOUR = -1
NUM_HOURS = 24

# Per-play signals. A gap is the time from the previous play to this one (or, for the request,
# from the last play of the history to now), bucketed: 0 unknown, 1 no earlier play, then
# 2 + the number of GAP_EDGES (seconds) it reaches. Bucket >= SESSION_BREAK (30 minutes and
# more, the sessionizer's default) or 1 starts a new session.
GAP_UNKNOWN = 0
GAP_FIRST = 1
GAP_EDGES: tuple[int, ...] = (
    60,
    300,
    900,
    1800,
    3600,
    3 * 3600,
    12 * 3600,
    86400,
    3 * 86400,
    7 * 86400,
    30 * 86400,
)
NUM_GAPS = len(GAP_EDGES) + 3
SESSION_BREAK = 2 + GAP_EDGES.index(1800) + 1
NOT_SKIPPED = 0  # also "unknown": a play without a skip mark counts as listened
SKIPPED = 1
# The clock of each play, UTC, from its unix time (twotower.query.play_clock).
UNKNOWN_WEEKDAY = -1
NUM_WEEKDAYS = 7  # Monday = 0 .. Sunday = 6
CLOCK_FORMULAS = {
    "play_hours": "(ts // 3600) % 24",
    "play_weekdays": "((ts // 86400) + 3) % 7",
}  # ts: the play's unix seconds (UTC); 1970-01-01 was a Thursday, so Monday = 0


@dataclass(frozen=True)
class QueryField:
    """One input of the query tower, as the manifest describes it.

    Attributes:
        name: Input name (``QueryBatch`` attribute and ONNX input).
        dtype: NumPy dtype name.
        shape: Axis names (``batch``, ``length``).
        unknown: The value that means "unknown" (also the padding value of ``history``).
        meaning: One line for people.
    """

    name: str
    dtype: str
    shape: tuple[str, ...]
    unknown: int
    meaning: str

    def describe(self) -> dict[str, Any]:
        """JSON form for ``manifest.json``."""
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "unknown": self.unknown,
            "meaning": self.meaning,
        }
        if self.name == "history":
            out["padding"] = "left"
            out["pad_value"] = PAD
            out["oov_value"] = OOV
        return out


HISTORY = QueryField(
    "history",
    "int64",
    ("batch", "length"),
    PAD,
    "item indices (vocab.json tracks) of the listening history, oldest first, most recent last, "
    "LEFT-padded with 0; 1 = out of vocabulary; at most history_len are used (the most recent)",
)
USERS = QueryField(
    "users", "int64", ("batch",), PAD, "listener index (vocab.json users); 0 = unknown listener"
)
HOURS = QueryField(
    "hours", "int64", ("batch",), UNKNOWN_HOUR, "hour of day 0..23 of the request; -1 = unknown"
)
CONTEXTS = QueryField(
    "contexts",
    "int64",
    ("batch",),
    PAD,
    "context-type index (vocab.json contexts) of the request; 0 = unknown",
)
SKIPS = QueryField(
    "skips",
    "int64",
    ("batch", "length"),
    NOT_SKIPPED,
    "per history play: 1 = skipped (a signal, never a target), 0 = listened or not marked; "
    "aligned with history (0 at padding)",
)
GAPS = QueryField(
    "gaps",
    "int64",
    ("batch", "length"),
    GAP_UNKNOWN,
    "per history play: bucket of the time since the previous play (twotower.query.gap_buckets: "
    "1 = no earlier play, 2.. = GAP_EDGES); 0 = unknown (no timestamps) and at padding",
)
REQUEST_GAPS = QueryField(
    "request_gaps",
    "int64",
    ("batch",),
    GAP_UNKNOWN,
    "bucket of the time from the last history play to the request (same buckets); a bucket of "
    "30 minutes or more means a new session starts; 0 = unknown",
)
PLAY_HOURS = QueryField(
    "play_hours",
    "int64",
    ("batch", "length"),
    UNKNOWN_HOUR,
    "per history play: hour of day 0..23 (UTC) of the play, (ts // 3600) % 24 of its unix "
    "seconds ts; -1 = unknown (no time) and at padding",
)
PLAY_WEEKDAYS = QueryField(
    "play_weekdays",
    "int64",
    ("batch", "length"),
    UNKNOWN_WEEKDAY,
    "per history play: weekday 0..6 (UTC, Monday = 0) of the play, ((ts // 86400) + 3) % 7 of "
    "its unix seconds ts; -1 = unknown (no time) and at padding",
)
FIELDS: tuple[QueryField, ...] = (
    HISTORY,
    USERS,
    HOURS,
    CONTEXTS,
    SKIPS,
    GAPS,
    REQUEST_GAPS,
    PLAY_HOURS,
    PLAY_WEEKDAYS,
)
PLAY_FIELDS = ("skips", "gaps", "request_gaps")
CLOCK_FIELDS = ("play_hours", "play_weekdays")
# the [batch, length] fields aligned with history (cut and padded with it)
PER_PLAY_FIELDS = tuple(f.name for f in FIELDS if "length" in f.shape and f.name != "history")


def gap_buckets(seconds: np.ndarray) -> np.ndarray:
    """Gap buckets of time differences in seconds (negative: unknown -> 0), ``int64``.

    ``0`` unknown, ``2 + #edges <= gap``; a caller marks "no earlier play" with ``GAP_FIRST``.
    """
    seconds = np.asarray(seconds, dtype=np.int64)
    out = 2 + np.searchsorted(np.asarray(GAP_EDGES, dtype=np.int64), seconds, side="right")
    return np.where(seconds >= 0, out, GAP_UNKNOWN).astype(np.int64)


def play_clock(timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hour of day and weekday (UTC, Monday = 0) of every play, from its unix seconds.

    THE helper for ``play_hours`` / ``play_weekdays``: training windows, evaluation sets,
    listener vectors and the Retriever all call it (the manifest states the same formulas,
    :data:`CLOCK_FORMULAS`).

    Args:
        timestamps: Unix seconds per play, any shape (negative: unknown).

    Returns:
        ``(hours, weekdays)`` int64 of the same shape; -1 where the time is unknown.
    """
    ts = np.asarray(timestamps, dtype=np.int64)
    known = ts >= 0
    hours = np.where(known, (ts // 3600) % NUM_HOURS, UNKNOWN_HOUR)
    weekdays = np.where(known, ((ts // 86400) + 3) % NUM_WEEKDAYS, UNKNOWN_WEEKDAY)
    return hours.astype(np.int64), weekdays.astype(np.int64)


def play_gaps(timestamps: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Gap bucket of every play since the previous play of its sequence.

    Args:
        timestamps: Unix seconds per play in sequence order, ``[N]`` (-1 unknown).
        starts: ``[N]`` bool, True at the first play of each sequence (gets ``GAP_FIRST``).

    Returns:
        ``[N]`` int64 buckets; 0 where either timestamp is unknown.
    """
    ts = np.asarray(timestamps, dtype=np.int64)
    prev = np.concatenate([[-1], ts[:-1]]) if len(ts) else ts
    diff = np.where((prev >= 0) & (ts >= 0), np.maximum(ts - prev, 0), -1)
    return np.where(np.asarray(starts, dtype=bool), GAP_FIRST, gap_buckets(diff))


@dataclass
class QueryBatch:
    """Query-tower inputs for ``B`` queries (the query contract).

    The request fields (``hours``, ``contexts``, ``request_gaps``) are ``[B]`` (one request
    per row) or, for training, ``[B, L]`` (the context of the event each position predicts).
    The per-play fields (``skips``, ``gaps``, ``play_hours``, ``play_weekdays``) are
    ``[B, L]``, aligned with ``history``.
    ``None`` means "unknown for every row"; a tower ignores the fields it was not built to read.

    Attributes:
        history: ``[B, L]`` int64, left-padded item indices (0 pad, 1 OOV).
        users: ``[B]`` int64 listener index (0 unknown) or None.
        hours: ``[B]`` or ``[B, L]`` int64 hour of day (-1 unknown) or None.
        contexts: ``[B]`` or ``[B, L]`` int64 context-type index (0 unknown) or None.
        skips: ``[B, L]`` int64, 1 where the play was skipped, or None (none marked).
        gaps: ``[B, L]`` int64 gap bucket of each play (0 unknown) or None.
        request_gaps: ``[B]`` or ``[B, L]`` int64 gap bucket of the request (0 unknown) or None.
        play_hours: ``[B, L]`` int64 hour of day (UTC) of each play (-1 unknown) or None.
        play_weekdays: ``[B, L]`` int64 weekday (UTC, Monday = 0) of each play (-1 unknown)
            or None.
    """

    history: Tensor
    users: Tensor | None = None
    hours: Tensor | None = None
    contexts: Tensor | None = None
    skips: Tensor | None = None
    gaps: Tensor | None = None
    request_gaps: Tensor | None = None
    play_hours: Tensor | None = None
    play_weekdays: Tensor | None = None

    def __len__(self) -> int:
        return int(self.history.shape[0])

    def __getitem__(self, rows: slice | Tensor) -> QueryBatch:
        """The queries ``rows`` (a slice or an index tensor)."""
        return QueryBatch(*(None if t is None else t[rows] for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device: torch.device | str) -> QueryBatch:
        """The same batch on ``device``."""
        return QueryBatch(*(None if t is None else t.to(device) for t in self._tensors()))

    def with_history(self, history: Tensor) -> QueryBatch:
        """The same context with another history (e.g. cut to the tower's ``max_len``).

        Per-play fields are cut (from the left) to the new history's length.
        """
        length = history.shape[1]
        cut = {
            name: t[:, t.shape[1] - length :]
            for name in PER_PLAY_FIELDS
            if (t := getattr(self, name)) is not None and t.shape[1] != length
        }
        return replace(self, history=history, **cut)

    @classmethod
    def of(cls, value: QueryBatch | Tensor) -> QueryBatch:
        """A batch as is, or a bare ``[B, L]`` history tensor with every context unknown."""
        return value if isinstance(value, QueryBatch) else cls(history=value)

    @classmethod
    def from_mapping(cls, batch: Mapping[str, Tensor]) -> QueryBatch:
        """The query fields of a collated batch dict (other keys, e.g. targets, ignored)."""
        return cls(**{f.name: batch.get(f.name) for f in FIELDS})

    def numpy_inputs(self, names: list[str]) -> dict[str, np.ndarray]:
        """Named int64 arrays for an ONNX session (unknown fields filled with their value)."""
        out = {}
        for f in FIELDS:
            if f.name not in names:
                continue
            t = getattr(self, f.name)
            shape = tuple(self.history.shape) if "length" in f.shape else (len(self),)
            out[f.name] = (
                np.full(shape, f.unknown, np.int64)
                if t is None
                else t.cpu().numpy().astype(np.int64)
            )
        return out


def left_pad_last(
    values: np.ndarray, offsets: np.ndarray, length: int, fill: int = 0
) -> np.ndarray:
    """The last ``length`` values of every CSR row, left-padded with ``fill``, ``[R, length]``."""
    lens = np.diff(offsets)
    take = np.minimum(lens, length)
    rows = np.repeat(np.arange(len(lens)), take)
    within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    out = np.full((len(lens), length), fill, dtype=values.dtype)
    out[rows, length - np.repeat(take, take) + within] = values[
        np.repeat(offsets[1:] - take, take) + within
    ]
    return out


def _rows_of(offsets: np.ndarray, rows: slice | None) -> tuple[np.ndarray, slice]:
    if rows is None:
        rows = slice(0, len(offsets) - 1)
    start, stop, _ = rows.indices(len(offsets) - 1)
    return offsets[start : stop + 1], slice(start, stop)


def _column(values: np.ndarray | None, rows: slice) -> Tensor | None:
    if values is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(values[rows], dtype=np.int64))


@dataclass(frozen=True)
class QuerySpec:
    """What one query tower reads: its history length and which context fields.

    Attributes:
        history_len: Longest history the tower uses (the most recent plays).
        users: The tower has a listener embedding.
        hours: The tower reads the hour of day.
        contexts: The tower reads the context type.
        play_signals: The tower reads the per-play signals (``skips``, ``gaps``) and the
            request's gap; its history holds every play, skipped ones included.
        play_clock: The tower also reads the hour of day and weekday of every play
            (``play_hours``, ``play_weekdays``; only with ``play_signals``).
    """

    history_len: int
    users: bool = False
    hours: bool = False
    contexts: bool = False
    play_signals: bool = False
    play_clock: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], history_len: int | None = None) -> QuerySpec:
        """The spec of a query tower from its constructor arguments (``tower.config``)."""
        max_len = int(config["max_len"])
        return cls(
            history_len=min(int(history_len or max_len), max_len),
            users=int(config.get("num_users", 0)) > 0,
            hours=bool(config.get("use_hour", False)),
            contexts=int(config.get("num_contexts", 0)) > 0,
            play_signals=bool(config.get("play_signals", False)),
            play_clock=bool(config.get("play_clock", False)),
        )

    @property
    def inputs(self) -> list[QueryField]:
        """The fields this tower reads, in ONNX input order."""
        used = {"history": True, "users": self.users, "hours": self.hours}
        used["contexts"] = self.contexts
        used.update(dict.fromkeys(PLAY_FIELDS, self.play_signals))
        used.update(dict.fromkeys(CLOCK_FIELDS, self.play_clock))
        return [f for f in FIELDS if used[f.name]]

    @property
    def input_names(self) -> list[str]:
        """Names of :attr:`inputs`."""
        return [f.name for f in self.inputs]

    def describe(self) -> dict[str, Any]:
        """The manifest's description of the query inputs (enough to call the ONNX encoder)."""
        out: dict[str, Any] = {
            "history_len": self.history_len,
            "inputs": [f.describe() for f in self.inputs],
            "output": {
                "name": "query_emb",
                "dtype": "float32",
                "shape": ["batch", "dim"],
                "meaning": "query vector; score tracks by inner product with index.faiss rows",
            },
        }
        if self.play_signals:
            out["history_holds"] = "every play, skipped ones included (marked in skips)"
            out["gap_edges_seconds"] = list(GAP_EDGES)
        if self.play_clock:  # how a client derives the clock inputs from a play's time
            out["play_clock"] = {
                "timezone": "UTC",
                "ts": "each play's unix seconds; a play without a time gets -1 (unknown)",
                **CLOCK_FORMULAS,
            }
        return out

    def build(
        self,
        values: np.ndarray,
        offsets: np.ndarray,
        users: np.ndarray | None = None,
        hours: np.ndarray | None = None,
        contexts: np.ndarray | None = None,
        rows: slice | None = None,
        trim: bool = False,
        skips: np.ndarray | None = None,
        gaps: np.ndarray | None = None,
        request_gaps: np.ndarray | None = None,
        play_hours: np.ndarray | None = None,
        play_weekdays: np.ndarray | None = None,
    ) -> QueryBatch:
        """THE builder: CSR histories (item indices, oldest first) + context -> a QueryBatch.

        Args:
            values: History item indices of every query, concatenated, ``[M]``.
            offsets: ``[Q + 1]``; query ``q`` owns ``values[offsets[q]:offsets[q + 1]]``.
            users: Listener index per query ``[Q]`` (0 unknown) or None.
            hours: Hour of day per query ``[Q]`` (-1 unknown) or None.
            contexts: Context-type index per query ``[Q]`` (0 unknown) or None.
            rows: Build only queries ``rows`` (a slice of ``0..Q``).
            trim: Pad only to the longest history of the batch instead of ``history_len``
                (encoders are invariant to leading padding; short histories cost less).
            skips: Skipped flag per history value ``[M]`` (aligned with ``values``) or None.
            gaps: Gap bucket per history value ``[M]`` or None (unknown).
            request_gaps: Gap bucket of each request ``[Q]`` or None (unknown).
            play_hours: Hour of day per history value ``[M]`` (:func:`play_clock`; -1
                unknown) or None (unknown).
            play_weekdays: Weekday per history value ``[M]`` (:func:`play_clock`) or None.

        Returns:
            The most recent ``history_len`` items of every history, left-padded, with the
            context fields this tower reads (the others None).
        """
        off, rows = _rows_of(np.asarray(offsets, dtype=np.int64), rows)
        length = self.history_len
        if trim:
            length = max(1, min(length, int(np.diff(off).max(initial=1))))
        rel = off - off[0]

        def padded(column: np.ndarray, fill: int = 0) -> Tensor:
            window = np.asarray(column[off[0] : off[-1]], dtype=np.int64)  # the rows' values
            return torch.from_numpy(left_pad_last(window, rel, length, fill))  # [b, length]

        play, clock = self.play_signals, self.play_clock
        return QueryBatch(
            history=padded(values),
            users=_column(users, rows) if self.users else None,
            hours=_column(hours, rows) if self.hours else None,
            contexts=_column(contexts, rows) if self.contexts else None,
            skips=padded(skips) if play and skips is not None else None,
            gaps=padded(gaps) if play and gaps is not None else None,
            request_gaps=_column(request_gaps, rows) if play else None,
            play_hours=(
                padded(play_hours, UNKNOWN_HOUR) if clock and play_hours is not None else None
            ),
            play_weekdays=(
                padded(play_weekdays, UNKNOWN_WEEKDAY)
                if clock and play_weekdays is not None
                else None
            ),
        )

    def build_from(self, queries: Any, rows: slice | None = None, trim: bool = False) -> QueryBatch:
        """:meth:`build` from an object with the index arrays of queries.

        ``queries`` has ``history``, ``offsets``, ``users``, ``hours`` and ``contexts`` (an
        ``EvalSet``, or raw queries mapped to a model's vocabulary). A tower that reads the
        per-play signals takes its history from ``plays`` / ``plays_offsets`` (every play,
        with ``plays_skipped`` and ``plays_gaps``) and ``request_gaps`` when the object has
        them; otherwise from ``history`` with the signals unknown. A tower that reads the clock
        gets it from ``plays_timestamps`` (:func:`play_clock`; unknown when absent).
        """
        plays = getattr(queries, "plays", None) if self.play_signals else None
        if plays is None:
            return self.build(
                queries.history,
                queries.offsets,
                queries.users,
                queries.hours,
                queries.contexts,
                rows=rows,
                trim=trim,
            )
        return self.build(
            plays,
            queries.plays_offsets,
            queries.users,
            queries.hours,
            queries.contexts,
            rows=rows,
            trim=trim,
            skips=queries.plays_skipped,
            gaps=queries.plays_gaps,
            request_gaps=queries.request_gaps,
            **self._clock_of(getattr(queries, "plays_timestamps", None)),
        )

    def _clock_of(self, timestamps: np.ndarray | None) -> dict[str, np.ndarray]:
        """``play_hours`` / ``play_weekdays`` of per-play times for :meth:`build` (or none)."""
        if not self.play_clock or timestamps is None:
            return {}
        return dict(zip(CLOCK_FIELDS, play_clock(timestamps), strict=True))

    def example(
        self, num_items: int, num_users: int, num_contexts: int, batch: int, seed: int = 0
    ) -> QueryBatch:
        """Random valid inputs with variable left padding (parity checks of exports)."""
        g = torch.Generator().manual_seed(seed)
        length = self.history_len
        history = torch.randint(2, num_items, (batch, length), generator=g)
        pad = torch.randint(0, length, (batch,), generator=g)  # [B] padding per row
        padding = torch.arange(length).unsqueeze(0) < pad.unsqueeze(1)  # [B, L]
        history[padding] = PAD
        play = self.play_signals
        skips = gaps = request_gaps = None
        if play:
            skips = torch.randint(0, 2, (batch, length), generator=g).masked_fill(padding, 0)
            gaps = torch.randint(0, NUM_GAPS, (batch, length), generator=g).masked_fill(padding, 0)
            request_gaps = torch.randint(0, NUM_GAPS, (batch,), generator=g)
        play_hours = play_weekdays = None
        if self.play_clock:
            play_hours = torch.randint(-1, NUM_HOURS, (batch, length), generator=g)
            play_weekdays = torch.randint(-1, NUM_WEEKDAYS, (batch, length), generator=g)
            play_hours = play_hours.masked_fill(padding, UNKNOWN_HOUR)  # [B, L]
            play_weekdays = play_weekdays.masked_fill(padding, UNKNOWN_WEEKDAY)  # [B, L]
        return QueryBatch(
            history=history,
            users=torch.randint(0, num_users, (batch,), generator=g) if self.users else None,
            hours=torch.randint(-1, NUM_HOURS, (batch,), generator=g) if self.hours else None,
            contexts=(
                torch.randint(0, num_contexts, (batch,), generator=g) if self.contexts else None
            ),
            skips=skips,
            gaps=gaps,
            request_gaps=request_gaps,
            play_hours=play_hours,
            play_weekdays=play_weekdays,
        )


def spec_of(tower: Any, history_len: int | None = None) -> QuerySpec:
    """The :class:`QuerySpec` of a query tower, from its ``config``.

    A tower without one (a test double) gets every field and its ``max_len``.
    """
    config = getattr(tower, "config", None)
    if isinstance(config, Mapping) and "max_len" in config:
        return QuerySpec.from_config(config, history_len)
    return QuerySpec(int(history_len or tower.max_len), users=True, hours=True, contexts=True)
