"""Retriever: next-track recommendations and similar tracks from an artifact folder.

Loading never imports Lightning: the artifact carries the query tower's class and constructor
arguments plus a weights-only state dict, the FAISS index, the display table and vocabularies.

History ids that the model has never seen are reported in :attr:`Recommendations.unknown` and
left out of the query (their OOV embedding was never trained); they are never silently ignored.

**Per-play signals.** A history may come with a play time per track (unix seconds, None where
unknown), a skipped mark per track and the request time ``at``. For a tower that reads them
(``play_signals``), the gap of each play is the bucketed time since the play before it in the
history as sent (:func:`twotower.query.play_gaps`); the first play's gap is unknown (0), not
"no earlier play", since the client's history may not be the listener's first play. An unknown
id is dropped *with* its mark and gap, after the gaps were computed on the full history, so
every gap still means "time since the listener's previous play". The request gap is ``at``
minus the last play's time (``at`` defaults to now when any play has a time; without times
every gap and the request gap are unknown). Skipped plays stay in the history (the tower was
trained on every play, skipped ones marked); ``exclude="history"`` leaves them out of the
answer too. A tower that also reads the clock (``play_clock``) gets the hour of day and
weekday (UTC) of each play from its time (:func:`twotower.query.play_clock`; unknown without
one), dropped with an unknown id like the other signals. A tower without play signals ignores
all of this (same answers) and says so in ``notes``.

A model trained with a hashed track vocabulary (streaming, manifest ``item_vocab.kind ==
"hash"``, format 1.1) has one index row per bucket. Its raw track ids map to rows through the
same hash as in training: when the export listed the raw training ids of every bucket
(``items.parquet`` ``raw_ids``), an id of that list maps to its bucket and any other id is
unknown (no training play ever gave it meaning); without the list every id is hashed. Results
name a bucket by its most played raw id (``bucket#i`` when none is known). Hashed listener ids
(``user_vocab``) are hashed the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from twotower.artifact import (
    ArtifactError,
    load_query_tower,
    read_manifest,
    verify_artifact,
)
from twotower.ids import HashVocab
from twotower.index import check_index, load_index, set_search_param
from twotower.model.ensemble import bias_columns
from twotower.query import (
    GAP_UNKNOWN,
    NUM_HOURS,
    UNKNOWN_HOUR,
    QueryBatch,
    QuerySpec,
    gap_buckets,
    play_clock,
    play_gaps,
)

Exclude = list[str] | str | None
Times = list[int | None] | None  # play times of one history (unix seconds; None unknown)
Marks = list[bool] | None  # skipped marks of one history
NO_SIGNALS_NOTE = "this model does not use play times or skip marks"


class UnknownTrackError(KeyError):
    """A track id that is not in the artifact's catalogue."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown track"


@dataclass
class Recommendations:
    """Top-k tracks for one query, best first.

    Attributes:
        ids: Track ids.
        titles: Titles ("" when unknown).
        artists: Artists ("" when unknown).
        scores: Inner products of query and track vectors (cosine for normalised vectors).
        unknown: History ids not in the vocabulary (left out of the query), in input order.
        notes: Other inputs that could not be used (unknown context type or user, ...).
    """

    ids: list[str]
    titles: list[str]
    artists: list[str]
    scores: list[float]
    unknown: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def to_frame(self) -> pd.DataFrame:
        """One row per recommendation: rank (1-based), track_id, title, artist, score."""
        return pd.DataFrame(
            {
                "rank": np.arange(1, len(self.ids) + 1),
                "track_id": self.ids,
                "title": self.titles,
                "artist": self.artists,
                "score": np.asarray(self.scores, dtype=np.float32),
            }
        )

    def format(self) -> str:
        """A plain table: rank, track id, title, artist, score, columns sized to the data.

        Ids are printed whole (a 36-character MBID or a long ``name:`` key can be pasted back
        into ``--track``); titles and artists are cut at 48 and 32 characters.
        """
        from twotower.table import format_table

        rows = [
            (r, i, t, a, f"{s:.4f}")
            for r, (i, t, a, s) in enumerate(
                zip(self.ids, self.titles, self.artists, self.scores, strict=True), 1
            )
        ]
        return format_table(
            ("rank", "track_id", "title", "artist", "score"),
            rows,
            right=(True, False, False, False, True),
            max_width=(None, None, 48, 32, None),
        )


class Retriever:
    """Serve recommendations from an artifact folder (use :meth:`load`)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        index: Any,
        items: pd.DataFrame,
        vocab: dict[str, dict[str, int]],
        query_tower: nn.Module,
        item_emb: np.ndarray,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        self.query_tower = query_tower
        self.item_emb = item_emb  # [N, d], float32 or float16 (memory-mapped)
        self.ids = items["track_id"].astype(str).to_numpy(object)
        self.titles = _text(items, "title")
        self.artists = _text(items, "artist")
        self.track_rows: dict[str, int] = {t: i for i, t in enumerate(self.ids)}
        item_vocab = manifest.get("item_vocab") or {}
        self.item_hash = (
            HashVocab.from_dict(item_vocab) if item_vocab.get("kind") == "hash" else None
        )
        # hashed ids go through the hash unless the export listed every bucket's raw ids
        self.hash_unlisted = self.item_hash is not None and not item_vocab.get("raw_ids")
        # rows that may be returned: with a raw-id list, buckets no training track hashed into
        # hold untrained vectors and are never results
        self.searchable: np.ndarray | None = None
        if "raw_ids" in items.columns:
            listed = items["raw_ids"].explode().dropna()
            for t, r in zip(listed.astype(str).tolist(), listed.index.tolist(), strict=True):
                self.track_rows.setdefault(t, int(r))
            if not self.hash_unlisted:
                self.searchable = items["raw_ids"].map(lambda r: r is not None and len(r) > 0)
                self.searchable = self.searchable.to_numpy(bool)
        self.num_searchable = len(items) if self.searchable is None else int(self.searchable.sum())
        user_vocab = manifest.get("user_vocab") or {}
        self.user_hash = (
            HashVocab.from_dict(user_vocab) if user_vocab.get("kind") == "hash" else None
        )
        self.user_index = vocab.get("users", {})
        self.context_index = vocab.get("contexts", {})
        cfg = manifest["query_tower"]["args"]
        self.config = cfg
        self.spec = QuerySpec.from_config(cfg, manifest["query_tower"].get("history_len"))
        self.history_len = self.spec.history_len
        self.filter_seen = bool((manifest.get("data") or {}).get("filter_seen", False))
        # coordinates that hold a learned item bias (popularity), not taste (item_bias models)
        self.bias_columns = bias_columns(cfg)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, verify: bool = True, mmap: bool = True) -> Retriever:
        """Verify and load an artifact folder.

        Args:
            path: The folder written by :func:`twotower.export.export_checkpoint`.
            verify: Check every file's checksum first (a few seconds for 1M tracks).
            mmap: Memory-map ``item_embeddings.npy`` instead of reading it.

        Raises:
            ArtifactError: Missing/corrupt files, a newer format, or inconsistent contents.
        """
        path = Path(path)
        manifest = verify_artifact(path) if verify else read_manifest(path)
        try:
            return cls._load(path, manifest, mmap)
        except ArtifactError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as e:
            # the manifest is the one file no checksum covers: a damaged one must not escape
            # as a KeyError or a size mismatch deep inside torch
            raise ArtifactError(
                f"{path}: inconsistent artifact or malformed {path / 'manifest.json'} "
                f"({type(e).__name__}: {e})"
            ) from e

    @classmethod
    def _load(cls, path: Path, manifest: dict[str, Any], mmap: bool) -> Retriever:
        try:
            index = load_index(path / "index.faiss")
        except (OSError, ValueError) as e:  # a damaged index names itself, not the manifest
            raise ArtifactError(f"{path / 'index.faiss'}: unreadable FAISS index ({e})") from e
        num_items, dim = int(manifest["num_items"]), int(manifest["dim"])
        tower_dim = manifest["query_tower"]["args"].get("dim")
        if tower_dim != dim:
            raise ArtifactError(
                f"{path / 'manifest.json'}: the query tower makes {tower_dim}-d vectors but "
                f"the index holds {dim}-d ones"
            )
        try:
            check_index(index, num_items, dim)
        except ValueError as e:
            raise ArtifactError(f"{path / 'index.faiss'}: {e}") from e
        for name, value in (manifest["index"].get("search_params") or {}).items():
            set_search_param(index, name, value)
        items = pd.read_parquet(path / "items.parquet")
        vocab = json.loads((path / "vocab.json").read_text())
        tracks = vocab.get("tracks", {})
        ordered = sorted(tracks, key=tracks.__getitem__)
        if len(items) != num_items or items["track_id"].astype(str).tolist() != ordered:
            raise ArtifactError(f"{path}: items.parquet rows do not match vocab.json tracks")
        if [tracks[t] for t in ordered] != list(range(2, num_items + 2)):
            raise ArtifactError(f"{path / 'vocab.json'}: track indices must run 2..N+1")
        item_vocab = manifest.get("item_vocab") or {}
        if item_vocab.get("kind") == "hash" and int(item_vocab["num_buckets"]) != num_items:
            raise ArtifactError(
                f"{path / 'manifest.json'}: a hashed vocabulary of {item_vocab['num_buckets']} "
                f"buckets but {num_items} index rows"
            )
        if not items.index.equals(pd.RangeIndex(len(items))):
            items = items.reset_index(drop=True)
        try:
            item_emb = np.load(
                path / "item_embeddings.npy", mmap_mode="r" if mmap else None, allow_pickle=False
            )
        except ValueError as e:  # object arrays (pickles) are refused, never loaded
            raise ArtifactError(f"{path / 'item_embeddings.npy'}: not a numeric array ({e})") from e
        if item_emb.shape != (num_items, dim):
            raise ArtifactError(f"{path / 'item_embeddings.npy'}: shape {item_emb.shape}")
        tower = load_query_tower(path, manifest)
        return cls(path, manifest, index, items, vocab, tower, item_emb)

    @property
    def item_bias(self) -> bool:
        """Whether item vectors carry learned biases (``item_bias`` models or members)."""
        return bool(self.bias_columns)

    def __len__(self) -> int:
        """Catalogue size."""
        return len(self.ids)

    def __contains__(self, track_id: object) -> bool:
        return bool(self.rows_of([str(track_id)])[0] >= 0)

    def rows_of(self, track_ids: list[str]) -> np.ndarray:
        """Index rows of track ids (-1 when unknown; hashed without a raw-id list: the bucket)."""
        get = self.track_rows.get
        rows = np.fromiter((get(str(t), -1) for t in track_ids), np.int64, len(track_ids))
        if self.hash_unlisted and (rows < 0).any():
            miss = np.flatnonzero(rows < 0)
            raw = np.array([str(track_ids[i]) for i in miss], dtype=object)
            rows[miss] = self.item_hash.lookup(raw) - 2  # item index = row + 2
        return rows

    # ------------------------------------------------------------------ queries
    def _query_inputs(
        self,
        histories: list[list[str]],
        contexts: list[dict | None],
        timestamps: list[Times] | None = None,
        skipped: list[Marks] | None = None,
        at: list[int | None] | None = None,
    ) -> tuple[QueryBatch, list[list[str]], list[list[str]], list[np.ndarray]]:
        """The QueryBatch of raw histories plus unknown ids, notes and known rows per query.

        ``timestamps`` / ``skipped`` / ``at``: per query, aligned with ``histories`` (see the
        module docstring); None for every query or for one query: unknown / not marked.
        """
        n = len(histories)
        timestamps = _per_query(timestamps, n, "timestamps")
        skipped = _per_query(skipped, n, "skipped")
        at = _per_query(at, n, "at")
        users = np.zeros(n, dtype=np.int64)
        hours = np.full(n, UNKNOWN_HOUR, dtype=np.int64)
        ctx = np.zeros(n, dtype=np.int64)
        request_gaps = np.full(n, GAP_UNKNOWN, dtype=np.int64)
        unknown, notes, known_rows, skips, gaps = [], [], [], [], []
        clock_hours, clock_weekdays = [], []
        now = None
        for q, (hist, c) in enumerate(zip(histories, contexts, strict=True)):
            hist = [str(h) for h in hist]
            rows = self.rows_of(hist) if hist else np.zeros(0, dtype=np.int64)
            known = rows >= 0
            unknown.append(list(dict.fromkeys(h for h, r in zip(hist, rows, strict=True) if r < 0)))
            known_rows.append(rows[known])
            note: list[str] = []
            if c:
                users[q], hours[q], ctx[q] = self._context(c, note)
            ts = _times(timestamps[q], len(hist), q)  # [n_q] int64, -1 unknown
            marks = _marks(skipped[q], len(hist), q)  # [n_q] int64
            # gaps over the history as sent (its first play: unknown), then dropped with the id
            gaps.append(play_gaps(ts, np.zeros(len(ts), dtype=bool))[known])
            skips.append(marks[known])
            play_hours, play_weekdays = play_clock(ts)  # [n_q] each, -1 where ts is unknown
            clock_hours.append(play_hours[known])
            clock_weekdays.append(play_weekdays[known])
            request_at = at[q]
            if request_at is not None:
                request_at = _time(request_at, "at" if n == 1 else f"at[{q}]")
            if len(ts) and ts[-1] >= 0:
                if request_at is None:  # default: now (a clock a little behind is no error)
                    now = int(time.time()) if now is None else now
                    request_at = max(now, int(ts[-1]))
                elif request_at < ts[-1]:
                    raise ValueError(
                        f"at ({request_at}) is earlier than the last play of the history "
                        f"({int(ts[-1])})"
                    )
                request_gaps[q] = gap_buckets(np.array([request_at - ts[-1]]))[0]
            signals = (ts >= 0).any() or marks.any() or at[q] is not None
            if signals and not self.spec.play_signals:
                note.append(NO_SIGNALS_NOTE)
            notes.append(note)
        lengths = np.fromiter((len(r) for r in known_rows), np.int64, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        empty = np.zeros(0, np.int64)
        values = np.concatenate([*known_rows, empty]) + 2  # item index = row + 2
        # padded only to the longest history of the batch: a 20-event history costs 20 positions
        query = self.spec.build(
            values,
            offsets,
            users,
            hours,
            ctx,
            trim=True,
            skips=np.concatenate([*skips, empty]),
            gaps=np.concatenate([*gaps, empty]),
            request_gaps=request_gaps,
            play_hours=np.concatenate([*clock_hours, empty]),
            play_weekdays=np.concatenate([*clock_weekdays, empty]),
        )  # a tower without play signals (or clock) gets none of them (the spec leaves them out)
        return query, unknown, notes, known_rows

    def _context(self, c: dict, notes: list[str]) -> tuple[int, int, int]:
        """(user index, hour, context index) of a context dict; unusable values noted."""
        allowed = {"hour", "context_type", "user", "user_id"}
        extra = sorted(set(c) - allowed)
        if extra:
            raise ValueError(f"unknown context keys {extra}; expected some of {sorted(allowed)}")
        hour = c.get("hour")
        if hour is not None and not (isinstance(hour, int | np.integer) and 0 <= hour < NUM_HOURS):
            raise ValueError(f"context hour must be an integer 0..23, got {hour!r}")
        user_raw = c.get("user", c.get("user_id"))
        user = 0
        if user_raw is not None:
            if self.user_hash is not None:
                user = int(self.user_hash.lookup(np.array([str(user_raw)], dtype=object))[0])
            else:
                user = self.user_index.get(str(user_raw), 0)
            if not user:
                notes.append(f"user {user_raw!r} not in the vocabulary: treated as unknown")
            elif not self.spec.users:
                notes.append("this model does not use the listener id")
        context = 0
        ctype = c.get("context_type")
        if ctype is not None:
            context = self.context_index.get(str(ctype), 0)
            if not context:
                notes.append(f"context_type {ctype!r} not in the vocabulary: treated as unknown")
        if hour is not None and not self.spec.hours:
            notes.append("this model does not use the hour of day")
        return user, -1 if hour is None else int(hour), context

    @torch.inference_mode()
    def query_embeddings(
        self,
        histories: list[list[str]],
        contexts: list[dict | None] | None = None,
        timestamps: list[Times] | None = None,
        skipped: list[Marks] | None = None,
        at: list[int | None] | int | None = None,
    ) -> np.ndarray:
        """Query vectors ``[Q, d]`` of histories (unknown ids left out).

        ``timestamps``, ``skipped`` and ``at`` as in :meth:`recommend_batch`.
        """
        contexts = contexts or [None] * len(histories)
        at = [at] * len(histories) if isinstance(at, int | np.integer) else at
        query, _, _, _ = self._query_inputs(histories, contexts, timestamps, skipped, at)
        return self.query_tower(query).float().numpy()  # [Q, d]

    def _search(
        self, query_emb: np.ndarray, k: int, exclude_rows: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-``k`` rows per query after removing excluded rows (over-fetching to fill k)."""
        n_max = max((len(e) for e in exclude_rows), default=0)
        fetch = min(k + n_max, len(self.ids))
        query_emb = np.ascontiguousarray(query_emb, np.float32)
        while True:
            scores, rows = self.index.search(query_emb, fetch)
            out = []
            for q in range(len(query_emb)):
                keep = rows[q] >= 0
                if self.searchable is not None:
                    keep &= self.searchable[np.maximum(rows[q], 0)]
                if len(exclude_rows[q]):
                    keep &= ~np.isin(rows[q], exclude_rows[q])
                out.append((rows[q][keep][:k], scores[q][keep][:k]))
            if self.searchable is None:
                return out
            short = any(
                len(r) < min(k, self.num_searchable - len(e))  # fewer real results may exist
                for (r, _), e in zip(out, exclude_rows, strict=True)
            )
            if not short or fetch >= len(self.ids) or (rows < 0).any():
                return out  # (-1 rows: the ANN probes found no more candidates)
            fetch = min(4 * fetch, len(self.ids))  # unsearchable rows took places: fetch more

    def _result(
        self, rows: np.ndarray, scores: np.ndarray, unknown: list[str], notes: list[str]
    ) -> Recommendations:
        return Recommendations(
            ids=[str(x) for x in self.ids[rows]],
            titles=[str(x) for x in self.titles[rows]],
            artists=[str(x) for x in self.artists[rows]],
            scores=[float(s) for s in scores],
            unknown=unknown,
            notes=notes,
        )

    def recommend_batch(
        self,
        histories: list[list[str]],
        k: int = 10,
        exclude: Exclude | list[Exclude] = None,
        contexts: list[dict | None] | None = None,
        batch_size: int = 1024,
        timestamps: list[Times] | None = None,
        skipped: list[Marks] | None = None,
        at: list[int | None] | int | None = None,
    ) -> list[Recommendations]:
        """:meth:`recommend` for many histories at once (one tower pass and one search per batch).

        Args:
            histories: Track ids per query, oldest first.
            k: Recommendations per query.
            exclude: ``"history"`` (each query's own history), a list of ids for every query,
                a per-query list of those, or None.
            contexts: Per-query context dicts (see :meth:`recommend`) or None.
            batch_size: Queries per tower pass and index search.
            timestamps: Per query, the play time of every history track (unix seconds, None
                where unknown), or None; None for all: unknown.
            skipped: Per query, a skipped mark per history track, or None (none skipped).
            at: Request time per query (or one for all; unix seconds); None: now when the
                history has play times, else unknown.

        Raises:
            ValueError: Bad ``k``, ``exclude``, lengths that do not match the histories, play
                times that are not integers >= 0 or not oldest first, or ``at`` earlier than
                the last play.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        histories = [list(h) for h in histories]
        contexts = contexts if contexts is not None else [None] * len(histories)
        if len(contexts) != len(histories):
            raise ValueError(f"{len(contexts)} contexts for {len(histories)} histories")
        per_query = isinstance(exclude, list) and bool(exclude) and isinstance(exclude[0], list)
        if per_query and len(exclude) != len(histories):
            raise ValueError(f"{len(exclude)} exclude lists for {len(histories)} histories")
        n = len(histories)
        at = [at] * n if isinstance(at, int | np.integer) else at
        timestamps = _per_query(timestamps, n, "timestamps")
        skipped = _per_query(skipped, n, "skipped")
        at = _per_query(at, n, "at")
        results: list[Recommendations] = []
        for s in range(0, len(histories), batch_size):
            hs, cs = histories[s : s + batch_size], contexts[s : s + batch_size]
            part = slice(s, s + batch_size)
            query, unknown, notes, known = self._query_inputs(
                hs, cs, timestamps[part], skipped[part], at[part]
            )
            with torch.inference_mode():
                query_emb = self.query_tower(query).float().numpy()  # [b, d]
            excl = []
            for j in range(len(hs)):
                e = exclude[s + j] if per_query else exclude
                if e is None:
                    excl.append(np.zeros(0, dtype=np.int64))
                elif isinstance(e, str):
                    if e != "history":
                        raise ValueError(f"exclude must be 'history', a list or None, got {e!r}")
                    excl.append(known[j])
                else:
                    rows = self.rows_of(list(e)) if len(e) else np.zeros(0, dtype=np.int64)
                    excl.append(rows[rows >= 0])
            for j, (rows, scores) in enumerate(self._search(query_emb, k, excl)):
                results.append(self._result(rows, scores, unknown[j], notes[j]))
        return results

    def recommend(
        self,
        history: list[str],
        k: int = 10,
        exclude: Exclude = None,
        context: dict | None = None,
        *,
        timestamps: Times = None,
        skipped: Marks = None,
        at: int | None = None,
    ) -> Recommendations:
        """The next tracks for a listening history.

        Args:
            history: Track ids, oldest first (only the last ``history_len`` known ones count).
            k: Number of recommendations.
            exclude: ``"history"`` (never recommend a track of the history, skipped ones
                included), a list of track ids, or None.
            context: Optional ``{"hour": 0..23, "context_type": str, "user": str}``; values the
                model does not use or does not know are listed in ``notes``.
            timestamps: Play time of every history track (unix seconds, oldest first; None
                where unknown), or None: no times (every gap unknown).
            skipped: Whether each history track was skipped, or None: none marked.
            at: Request time (unix seconds); None: now when the history has play times.

        Returns:
            Ids, titles, artists, scores (best first) and the history ids that were unknown.
        """
        return self.recommend_batch(
            [history], k, exclude, [context], timestamps=[timestamps], skipped=[skipped], at=[at]
        )[0]

    def similar_tracks(self, track_id: str, k: int = 10) -> Recommendations:
        """Tracks whose vectors are closest to ``track_id``'s (the track itself excluded).

        With an item bias (``item_bias`` models, or ensemble members) the query is the track's
        vector with its bias coordinates zeroed: popularity does not pull the results.

        Raises:
            UnknownTrackError: ``track_id`` is not in the catalogue (a KeyError).
        """
        row = int(self.rows_of([track_id])[0])
        if row < 0:
            raise UnknownTrackError(f"unknown track id {track_id!r}: not in this catalogue")
        vec = np.array(self.item_emb[row : row + 1], dtype=np.float32)  # [1, d] (a copy)
        vec[:, self.bias_columns] = 0.0
        rows, scores = self._search(vec, k, [np.array([row])])[0]
        return self._result(rows, scores, [], [])


def _per_query(values: list | None, n: int, name: str) -> list:
    """One entry per query (None for all when ``values`` is None); a length mismatch raises."""
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} entries for {n} histories")
    return values


def _time(value: object, name: str) -> int:
    """A unix time in seconds: an integer >= 0 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be an integer number of unix seconds >= 0, got {value!r}")
    return int(value)


def _times(ts: Times, n: int, q: int) -> np.ndarray:
    """Play times of one history ``[n]`` int64 (-1 unknown), checked: oldest first."""
    if ts is None:
        return np.full(n, -1, dtype=np.int64)
    ts = list(ts)
    if len(ts) != n:
        raise ValueError(f"query {q}: {len(ts)} timestamps for {n} history tracks")
    out = np.array(
        [-1 if t is None else _time(t, f"timestamps[{i}]") for i, t in enumerate(ts)],
        dtype=np.int64,
    )
    known = np.flatnonzero(out >= 0)
    back = np.flatnonzero(np.diff(out[known]) < 0)
    if len(back):
        i, j = known[back[0]], known[back[0] + 1]
        raise ValueError(
            f"query {q}: play times must be oldest first, but play {j} ({out[j]}) is earlier "
            f"than play {i} ({out[i]})"
        )
    return out


def _marks(marks: Marks, n: int, q: int) -> np.ndarray:
    """Skipped marks of one history ``[n]`` int64 (1 skipped)."""
    if marks is None:
        return np.zeros(n, dtype=np.int64)
    marks = list(marks)
    if len(marks) != n:
        raise ValueError(f"query {q}: {len(marks)} skipped marks for {n} history tracks")
    if not all(isinstance(m, bool | np.bool_) for m in marks):
        raise ValueError(f"query {q}: skipped marks must be booleans")
    return np.asarray(marks, dtype=np.int64)


def _text(items: pd.DataFrame, col: str) -> np.ndarray:
    if col not in items.columns:
        return np.full(len(items), "", dtype=object)
    s = items[col]
    return s.astype(object).where(s.notna(), "").astype(str).to_numpy(object)


# ---------------------------------------------------------------------------------- CLI
def plays_of(args: argparse.Namespace) -> tuple[list[str], Times, Marks]:
    """The listening history of ``twotower recommend`` with its play times and skip marks.

    From, in this order: ``--history-file`` (one id per line, blank lines skipped),
    ``--history-json`` (a JSON list whose entries are ids, or objects
    ``{"track": id, "ts": unix seconds, "skipped": bool}`` with ``ts`` and ``skipped``
    optional), every ``--track ID`` and ``--history a,b,c`` (comma-separated: only for ids
    without commas). Plays given as plain ids have no time and no skip mark.

    Returns:
        Ids (oldest first), play times (None when no play has one) and skipped marks (None
        when none is marked), aligned with the ids.

    Raises:
        ValueError: ``--history-json`` is not such a list.
    """
    out: list[str] = []
    times: list[int | None] = []
    marks: list[bool] = []
    path = getattr(args, "history_file", None)
    if path:
        text = Path(path).read_text(encoding="utf-8")
        out += [line.strip() for line in text.splitlines() if line.strip()]
    raw = getattr(args, "history_json", None)
    if raw:
        try:
            entries = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"--history-json: not JSON ({e})") from None
        if not isinstance(entries, list):
            raise ValueError(
                '--history-json expects a JSON list of ids or plays, e.g. \'["a,b", "c"]\' or '
                '\'[{"track": "a", "ts": 1700000000, "skipped": true}]\''
            )
        times += [None] * len(out)
        marks += [False] * len(out)
        for i, entry in enumerate(entries):
            track, ts, skipped = _cli_play(entry, i)
            out.append(track)
            times.append(ts)
            marks.append(skipped)
    out += [str(t) for t in (getattr(args, "tracks", None) or [])]
    comma = getattr(args, "history", "") or ""
    out += [h.strip() for h in comma.split(",") if h.strip()]
    times += [None] * (len(out) - len(times))
    marks += [False] * (len(out) - len(marks))
    return (
        out,
        times if any(t is not None for t in times) else None,
        marks if any(marks) else None,
    )


def _cli_play(entry: object, i: int) -> tuple[str, int | None, bool]:
    """(track id, play time, skipped) of one ``--history-json`` entry."""
    where = f"--history-json[{i}]"
    if isinstance(entry, str | int) and not isinstance(entry, bool):
        return str(entry), None, False
    if not isinstance(entry, dict) or "track" not in entry:
        raise ValueError(f'{where}: expected an id or {{"track": id, "ts": ..., "skipped": ...}}')
    extra = sorted(set(entry) - {"track", "ts", "skipped"})
    if extra:
        raise ValueError(f"{where}: unknown keys {extra}; expected track, ts, skipped")
    track, ts, skipped = entry["track"], entry.get("ts"), entry.get("skipped", False)
    if not isinstance(track, str | int) or isinstance(track, bool):
        raise ValueError(f"{where}.track: expected a string or integer id, got {track!r}")
    if ts is not None:
        ts = _time(ts, f"{where}.ts")
    if not isinstance(skipped, bool):
        raise ValueError(f"{where}.skipped: expected true or false, got {skipped!r}")
    return str(track), ts, skipped


def history_of(args: argparse.Namespace) -> list[str]:
    """The track ids of ``twotower recommend``'s history, oldest first (see :func:`plays_of`)."""
    return plays_of(args)[0]


def cli_main(args: argparse.Namespace) -> int:
    """``twotower recommend`` and ``twotower similar`` (see ``twotower/cli.py``)."""
    try:
        retriever = Retriever.load(args.artifacts)
        if args.command == "similar":
            rec = retriever.similar_tracks(args.track, k=args.k)
            print(f"tracks similar to {args.track}:")
            print(rec.format())
            return 0
        history, times, marks = plays_of(args)
        exclude = "history" if retriever.filter_seen else None
        signals = {"timestamps": times, "skipped": marks}
        signals = {name: v for name, v in signals.items() if v is not None}  # only when given
        rec = retriever.recommend(history, k=args.k, exclude=exclude, **signals)
    except (KeyError, ValueError, ArtifactError) as e:
        print(f"twotower {args.command}: error: {e}", file=sys.stderr)
        return 2
    if rec.unknown:
        print(f"unknown track ids (not used): {json.dumps(rec.unknown)}", file=sys.stderr)
    if not history or len(rec.unknown) == len(set(history)):
        print(
            "note: no known track in the history; these are the model's defaults", file=sys.stderr
        )
    print(rec.format())
    return 0
