"""The artifact side of the service: catalogue search, held-out listeners, loaded models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel

HOLDOUT_FILE = "holdout.parquet"


class RetrieverLike(Protocol):
    """What the service needs from :class:`twotower.retrieve.Retriever`."""

    def recommend(
        self,
        history: list[str],
        k: int = 10,
        exclude: Any = ...,
        context: dict | None = None,
    ) -> Any:
        """Top-k next tracks (ids, titles, artists, scores, unknown)."""

    def similar_tracks(self, track_id: str, k: int = 10) -> Any:
        """Top-k tracks closest to one track."""

    # optional: ``recommend_batch(histories, k, exclude, contexts)`` (a list of results);
    # without it the service's batcher calls ``recommend`` once per request


class Track(BaseModel):
    """A catalogue track (title and artist empty when unknown)."""

    track_id: str
    title: str = ""
    artist: str = ""


class ScoredTrack(Track):
    """A recommended track with its score (inner product of normalised vectors)."""

    score: float


class Catalogue:
    """Display metadata of every track of an artifact and substring search over it.

    Args:
        items: ``items.parquet`` (track_id, optional title and artist), row order = index rows.
        rows_of: Maps track ids to index rows (-1 unknown): the retriever's, so that the service
            knows exactly the ids the model does (hashed exports: every raw id of a bucket, or
            any id when the export listed none). None: the ``track_id`` column alone.
    """

    def __init__(
        self, items: pd.DataFrame, rows_of: Callable[[list[str]], np.ndarray] | None = None
    ) -> None:
        if "track_id" not in items.columns:
            raise ValueError("items.parquet has no track_id column")
        cols = {}
        for c in ("track_id", "title", "artist"):
            col = items[c] if c in items.columns else pd.Series([""] * len(items))
            cols[c] = col.astype(object).where(col.notna(), "").astype(str).to_numpy(object)
        self.ids: np.ndarray = cols["track_id"]
        self.titles: np.ndarray = cols["title"]
        self.artists: np.ndarray = cols["artist"]
        #: training play count per row, or None when the export recorded none
        self.plays: np.ndarray | None = None
        if "plays" in items.columns:
            plays = pd.to_numeric(items["plays"], errors="coerce").fillna(0)
            self.plays = plays.to_numpy(np.float64).clip(min=0)
        # most played first, catalogue order among equals (the cold-start list)
        self._by_plays = np.argsort(-self.plays, kind="stable") if self.plays is not None else None
        if rows_of is None:
            index = {tid: i for i, tid in enumerate(self.ids)}
            rows_of = lambda ids: np.array([index.get(t, -1) for t in ids], dtype=np.int64)  # noqa: E731
        self._rows_of = rows_of
        hay = pd.Series(self.ids) + "\n" + pd.Series(self.titles) + "\n" + pd.Series(self.artists)
        self._hay = hay.str.lower()
        self._titles_lower = pd.Series(self.titles).str.lower().to_numpy(object)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, track_id: str) -> bool:
        return bool(self._rows_of([track_id])[0] >= 0)

    def known(self, track_ids: list[str]) -> np.ndarray:
        """``[n]`` bool: which ids the model knows (one vectorised lookup)."""
        return self._rows_of(list(track_ids)) >= 0

    def track(self, track_id: str) -> Track:
        """Metadata of one id (empty title/artist when the id is not in the catalogue)."""
        i = int(self._rows_of([track_id])[0])
        if i < 0:
            return Track(track_id=track_id)
        return Track(track_id=track_id, title=self.titles[i], artist=self.artists[i])

    def popular(self, k: int, exclude: list[str] | None = None) -> list[ScoredTrack]:
        """The ``k`` most played tracks of training, for a query without a usable history.

        The score is the track's share of all training plays. Tracks never played in
        training (hashed exports: empty buckets) are left out, and so is ``exclude``.

        Args:
            k: How many tracks.
            exclude: Track ids not to return (unknown ids are ignored).

        Raises:
            LookupError: The export recorded no play counts (``items.parquet`` has no plays).
        """
        if self.plays is None or self._by_plays is None:
            raise LookupError("items.parquet records no play counts")
        skip = set(self._rows_of(list(exclude)).tolist()) if exclude else set()
        total = float(self.plays.sum()) or 1.0
        out: list[ScoredTrack] = []
        for r in self._by_plays:
            if len(out) == k or self.plays[r] <= 0:
                break
            if int(r) in skip:
                continue
            out.append(
                ScoredTrack(
                    track_id=self.ids[r],
                    title=self.titles[r],
                    artist=self.artists[r],
                    score=float(self.plays[r]) / total,
                )
            )
        return out

    def search(self, q: str, limit: int) -> list[Track]:
        """Case-insensitive substring match on id, title or artist.

        Exact id matches come first, then titles starting with ``q``, then catalogue order.
        """
        needle = q.strip().lower()
        if not needle:
            return []
        rows = np.flatnonzero(self._hay.str.contains(needle, regex=False).to_numpy(bool))
        if len(rows) == 0:
            return []
        exact = np.array([self.ids[r].lower() == needle for r in rows])
        prefix = np.array([self._titles_lower[r].startswith(needle) for r in rows])
        order = np.lexsort((rows, ~prefix, ~exact))
        picked = rows[order[:limit]]
        return [
            Track(track_id=self.ids[r], title=self.titles[r], artist=self.artists[r])
            for r in picked
        ]


@dataclass
class Holdout:
    """Held-out listeners: history (oldest first) and the track actually played next.

    Attributes:
        ids: Unique ids (a listener with several examples gets ``id#2``, ``id#3``, ...).
        query_ids: The ``query_id`` column as stored (the listener id when there is one).
        histories: Track ids per example, oldest first.
        targets: The track played next.
        contexts: Hour / context type of the target event, or None.
    """

    ids: list[str]
    query_ids: list[str]
    histories: list[list[str]]
    targets: list[str]
    contexts: list[dict | None]

    def __post_init__(self) -> None:
        self._row = {q: i for i, q in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, query_id: str) -> int | None:
        """Row of a listener id, or None."""
        return self._row.get(query_id)

    @classmethod
    def read(cls, path: Path) -> Holdout:
        """Read ``holdout.parquet``: query_id, history (list of ids), target[, hour, context_type].

        Raises:
            ValueError: A required column is missing (naming the file and column).
        """
        df = pd.read_parquet(path)
        for col in ("query_id", "history", "target"):
            if col not in df.columns:
                raise ValueError(f"{path}: missing column {col!r} (have {list(df.columns)})")
        contexts: list[dict | None] = []
        hours = df["hour"] if "hour" in df.columns else None
        ctypes = df["context_type"] if "context_type" in df.columns else None
        for i in range(len(df)):
            ctx: dict = {}
            if hours is not None and pd.notna(hours.iloc[i]) and int(hours.iloc[i]) >= 0:
                ctx["hour"] = int(hours.iloc[i])
            if ctypes is not None and pd.notna(ctypes.iloc[i]) and str(ctypes.iloc[i]):
                ctx["context_type"] = str(ctypes.iloc[i])
            contexts.append(ctx or None)
        query_ids = [str(x) for x in df["query_id"]]
        ids = list(query_ids)
        seen: dict[str, int] = {}
        for i, q in enumerate(query_ids):  # a listener with several test examples: q, q#2, q#3, ...
            seen[q] = seen.get(q, 0) + 1
            if seen[q] > 1:
                ids[i] = f"{q}#{seen[q]}"
        return cls(
            ids=ids,
            query_ids=query_ids,
            histories=[[str(t) for t in h] for h in df["history"]],
            targets=[str(x) for x in df["target"]],
            contexts=contexts,
        )


@dataclass
class LoadedModel:
    """One artifact folder, loaded and verified."""

    label: str
    path: Path
    retriever: RetrieverLike
    manifest: dict
    catalogue: Catalogue
    holdout: Holdout | None

    @property
    def filter_seen(self) -> bool:
        """Whether the run evaluated with already-heard tracks filtered (the default here)."""
        return bool((self.manifest.get("data") or {}).get("filter_seen", False))

    def listener_context(self, row: int) -> dict | None:
        """Context of a held-out example, with the listener id for models that use one."""
        assert self.holdout is not None
        ctx = dict(self.holdout.contexts[row] or {})
        config = getattr(self.retriever, "config", None) or {}
        if config.get("num_users", 0) > 0:
            ctx["user"] = self.holdout.query_ids[row]
        return ctx or None

    def health(self) -> dict:
        """The part of ``/healthz`` describing this artifact."""
        m = self.manifest
        index = m.get("index") if isinstance(m.get("index"), dict) else {}
        return {
            "label": self.label,
            "format_version": m.get("format_version"),
            "created": m.get("created"),
            "package_version": m.get("package_version"),
            "catalogue_size": len(self.catalogue),
            "index": {
                k: v
                for k, v in {
                    "factory": index.get("factory", m.get("index_factory")),
                    "search_params": index.get("search_params", m.get("search_params")),
                    "metric": index.get("metric", m.get("metric")),
                    "ann_recall": index.get("ann_recall", m.get("ann_recall")),
                }.items()
                if v is not None
            },
            "dim": m.get("dim"),
            "heldout_listeners": len(self.holdout) if self.holdout is not None else 0,
        }


def _default_loader(path: Path) -> RetrieverLike:
    from twotower.retrieve import Retriever

    return Retriever.load(path)


def load_model(
    path: str | Path, loader: Callable[[Path], RetrieverLike] | None = None
) -> LoadedModel:
    """Load an artifact folder: the Retriever (which checks checksums), manifest, items, holdout.

    Args:
        path: The artifact folder.
        loader: Builds the retriever from the folder (default ``Retriever.load``).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: artifact folder not found")
    retriever = (loader or _default_loader)(path)
    manifest_text = (path / "manifest.json").read_text()
    manifest = getattr(retriever, "manifest", None) or json.loads(manifest_text)
    catalogue = Catalogue(
        pd.read_parquet(path / "items.parquet"), getattr(retriever, "rows_of", None)
    )
    holdout = Holdout.read(path / HOLDOUT_FILE) if (path / HOLDOUT_FILE).is_file() else None
    digest = hashlib.sha256(manifest_text.encode()).hexdigest()[:8]
    label = f"{path.resolve().name}#{digest}"
    return LoadedModel(label, path, retriever, manifest, catalogue, holdout)
