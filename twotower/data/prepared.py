"""Preprocessed, split data as dense arrays: the contract between the data layer and the model.

Everything is numpy (CSR layout for ragged sequences) so it caches to disk without pickle, memory
maps cheaply, and feeds the DataModule, the metrics and the baselines alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twotower.data.report import DataReport
from twotower.ids import Vocab
from twotower.query import play_gaps

# 2: evaluation sets carry every play with its per-play signals; 3: and its time (the clock)
CACHE_FORMAT = 3


def csr_rows(values: np.ndarray, offsets: np.ndarray, i: int) -> np.ndarray:
    """Row ``i`` of a CSR array."""
    return values[offsets[i] : offsets[i + 1]]


@dataclass
class Sequences:
    """Ordered event sequences (one per user or session) in CSR layout, training part only.

    Attributes:
        items: Item index of every event, ``[N]`` int64.
        offsets: Row starts, ``[S + 1]`` int64; sequence ``s`` is
            ``items[offsets[s]:offsets[s+1]]``.
        users: User index per sequence, ``[S]`` int64 (0 when the source has no users).
        hours: Hour of day per event, ``[N]`` int8, -1 unknown.
        contexts: Context-type index per event, ``[N]`` int64 (0 unknown).
        positive: ``[N]`` bool, False for skipped plays (kept as signal, never a target).
        timestamps: ``[N]`` int64 unix seconds, -1 unknown.
    """

    items: np.ndarray
    offsets: np.ndarray
    users: np.ndarray
    hours: np.ndarray
    contexts: np.ndarray
    positive: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Events per sequence, ``[S]``."""
        return np.diff(self.offsets)

    def play_gaps(self) -> np.ndarray:
        """Gap bucket of every event since the previous one of its sequence, ``[N]`` int64.

        The first event of each sequence gets ``GAP_FIRST`` (see
        :func:`twotower.query.play_gaps`): what training windows and listener vectors read.
        """
        starts = np.zeros(len(self.items), dtype=bool)  # [N]
        starts[self.offsets[:-1][self.lengths > 0]] = True
        return play_gaps(self.timestamps, starts)


@dataclass
class EvalSet:
    """Next-item examples for validation or test.

    Attributes:
        history: Most recent ``max_history`` events before the target, CSR values ``[M]`` int64.
        offsets: ``[Q + 1]`` int64.
        targets: Item index to predict, ``[Q]`` int64; OOV (1) when the target track never
            occurs in training (a cold item): it counts as a miss, never as skipped.
        users: User index, ``[Q]`` int64 (0 when none).
        hours: Hour of day of the target event, ``[Q]`` int8, -1 unknown.
        contexts: Context-type index of the target event, ``[Q]`` int64.
        seen: Every distinct item of the user's full history before the target (for optional
            filtering of already-seen items), CSR values.
        seen_offsets: ``[Q + 1]`` int64.
        plays: Every play before the target (skipped ones too; the most recent
            ``max_history``), CSR values ``[P]`` int64, or None: for towers that read the
            per-play signals.
        plays_offsets: ``[Q + 1]`` int64 (None with ``plays``).
        plays_skipped: ``[P]`` int8, 1 where the play was skipped.
        plays_gaps: ``[P]`` int8 gap bucket of each play (:func:`twotower.query.play_gaps`).
        request_gaps: ``[Q]`` int8 gap bucket from the last play to the target.
        plays_timestamps: ``[P]`` int64 unix seconds of each play (-1 unknown): the hour of
            day and weekday of each play come from it (:func:`twotower.query.play_clock`).
        target_timestamps: ``[Q]`` int64 unix seconds of each target (-1 unknown).
    """

    history: np.ndarray
    offsets: np.ndarray
    targets: np.ndarray
    users: np.ndarray
    hours: np.ndarray
    contexts: np.ndarray
    seen: np.ndarray
    seen_offsets: np.ndarray
    plays: np.ndarray | None = None
    plays_offsets: np.ndarray | None = None
    plays_skipped: np.ndarray | None = None
    plays_gaps: np.ndarray | None = None
    request_gaps: np.ndarray | None = None
    plays_timestamps: np.ndarray | None = None
    target_timestamps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class ItemFeatures:
    """Side features per item index (row 0 pad, row 1 OOV: all zeros).

    Attributes:
        artist: ``[V]`` int64 index into ``artist_vocab`` (0 unknown).
        album: ``[V]`` int64 index into ``album_vocab`` (0 unknown).
        genres: ``[V, G]`` int64 genre indices padded with 0.
        year: ``[V]`` int64 year bucket (0 unknown, else 1 + 5-year bucket since 1900).
        audio: ``[V, F]`` float32 standardised numeric features (0 when unknown).
        artist_vocab: Artist names.
        album_vocab: Album names.
        genre_vocab: Genre names.
        audio_names: Names of the ``F`` numeric features.
    """

    artist: np.ndarray
    album: np.ndarray
    genres: np.ndarray
    year: np.ndarray
    audio: np.ndarray
    artist_vocab: Vocab
    album_vocab: Vocab
    genre_vocab: Vocab
    audio_names: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        """Table sizes for the ItemTower constructor (0 disables a feature)."""
        return {
            "num_artists": len(self.artist_vocab) if self.artist.any() else 0,
            "num_albums": len(self.album_vocab) if self.album.any() else 0,
            "num_genres": len(self.genre_vocab) if self.genres.any() else 0,
            "num_year_buckets": int(self.year.max()) + 1 if self.year.any() else 0,
            "num_audio": int(self.audio.shape[1]),
        }


@dataclass
class PreparedData:
    """Everything training, evaluation and export need, built from one load.

    Attributes:
        item_vocab: Track ids (built from the training part only: no leakage).
        user_vocab: Listener ids (may be empty).
        context_vocab: Context types (may be empty).
        train: Training sequences.
        valid: Validation next-item examples.
        test: Test next-item examples.
        item_counts: Training frequency per item index, ``[V]`` int64 (logQ, popularity).
        features: Item side features.
        tracks: Display metadata aligned with item indices (row i = item i; rows 0/1 reserved),
            columns track_id, title, artist.
        report: The data report.
        fingerprint: Hash of input files + parameters (the cache key).
        params: The preprocessing parameters.
    """

    item_vocab: Vocab
    user_vocab: Vocab
    context_vocab: Vocab
    train: Sequences
    valid: EvalSet
    test: EvalSet
    item_counts: np.ndarray
    features: ItemFeatures
    tracks: pd.DataFrame
    report: DataReport
    fingerprint: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        """Item vocabulary size including pad and OOV."""
        return len(self.item_vocab)

    @property
    def num_users(self) -> int:
        """User vocabulary size including pad and OOV."""
        return len(self.user_vocab)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write atomically to folder ``path`` (npz without pickle, JSON, Parquet, checksums)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        try:
            for name in ("train", "valid", "test"):
                part = getattr(self, name)
                arrays = {f.name: getattr(part, f.name) for f in fields(part)}
                arrays = {k: v for k, v in arrays.items() if v is not None}
                np.savez(tmp / f"{name}.npz", **arrays)
            ft = self.features
            np.savez(
                tmp / "features.npz",
                artist=ft.artist,
                album=ft.album,
                genres=ft.genres,
                year=ft.year,
                audio=ft.audio,
                item_counts=self.item_counts,
            )
            vocabs = {
                "item": self.item_vocab.ids,
                "user": self.user_vocab.ids,
                "context": self.context_vocab.ids,
                "artist": ft.artist_vocab.ids,
                "album": ft.album_vocab.ids,
                "genre": ft.genre_vocab.ids,
            }
            (tmp / "vocabs.json").write_text(json.dumps(vocabs))
            self.tracks.to_parquet(tmp / "tracks.parquet", index=False)
            meta = {
                "cache_format": CACHE_FORMAT,
                "fingerprint": self.fingerprint,
                "params": self.params,
                "audio_names": ft.audio_names,
                "report": self.report.to_dict(),
                "sha256": {p.name: _sha256(p) for p in sorted(tmp.iterdir())},
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> PreparedData:
        """Read a folder written by :meth:`save`; every checksum is verified first.

        Raises:
            ValueError: The folder is incomplete, truncated or from another cache format.
        """
        path = Path(path)
        meta_file = path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_file}: unreadable cache metadata ({e})") from e
        if meta.get("cache_format") != CACHE_FORMAT:
            raise ValueError(
                f"{meta_file}: cache format {meta.get('cache_format')} != {CACHE_FORMAT}"
            )
        for name, digest in meta["sha256"].items():
            f = path / name
            if not f.is_file() or _sha256(f) != digest:
                raise ValueError(f"{f}: missing or corrupt (checksum mismatch)")
        parts = {}
        for name, kind in (("train", Sequences), ("valid", EvalSet), ("test", EvalSet)):
            with np.load(path / f"{name}.npz", allow_pickle=False) as z:
                parts[name] = kind(**{f.name: z[f.name] for f in fields(kind) if f.name in z})
        v = json.loads((path / "vocabs.json").read_text())
        with np.load(path / "features.npz", allow_pickle=False) as z:
            features = ItemFeatures(
                artist=z["artist"],
                album=z["album"],
                genres=z["genres"],
                year=z["year"],
                audio=z["audio"],
                artist_vocab=Vocab(v["artist"]),
                album_vocab=Vocab(v["album"]),
                genre_vocab=Vocab(v["genre"]),
                audio_names=list(meta["audio_names"]),
            )
            item_counts = z["item_counts"]
        return cls(
            item_vocab=Vocab(v["item"]),
            user_vocab=Vocab(v["user"]),
            context_vocab=Vocab(v["context"]),
            train=parts["train"],
            valid=parts["valid"],
            test=parts["test"],
            item_counts=item_counts,
            features=features,
            tracks=pd.read_parquet(path / "tracks.parquet"),
            report=DataReport.from_dict(meta["report"]),
            fingerprint=meta["fingerprint"],
            params=meta["params"],
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
