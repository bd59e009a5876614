"""The prepared dataset: the contract between the data layer and training, in memory and on disk.

In memory everything is numpy (CSR layout for ragged sequences) and feeds the DataModule, the
metrics and the baselines alike. On disk (:meth:`PreparedData.save`, :meth:`PreparedData.load`)
it is a folder of Parquet files plus a small JSON header, written once by
:func:`twotower.data.pipeline.prepare_data` (or by any engine that writes the same layout: see
the README's "Prepared dataset format"):

``header.json``
    ``format`` (:data:`FORMAT`), ``fingerprint``, ``params`` (the preprocessing parameters and
    the resolved protocol), ``vocabs`` (user, context, artist, album and genre ids; index
    ``i + 2`` is ``ids[i]``), ``audio_names``, ``report`` (the data report) and optionally
    ``files`` (size and sha256 of every file, checked before use).
``items.parquet``
    One row per item index (rows 0 and 1 are padding and out-of-vocabulary): ``track_id``,
    ``title``, ``artist`` (display), ``count`` (training positives: logQ and popularity),
    ``artist_idx``, ``album_idx``, ``year_bucket``, ``genre_0..`` and the ``f_*`` audio
    features.
``plays/*.parquet``
    The training plays in sequence order: ``seq`` (sequence number, increasing), ``user``,
    ``item``, ``hour``, ``context``, ``positive``, ``timestamp``. Every row group holds whole
    sequences: a row group is a *block*, the unit that training streams, shuffles and shards
    by DDP rank and loader worker.
``valid.parquet``, ``test.parquet``
    One row per evaluation case: the :class:`EvalSet` fields (ragged ones as list columns).
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
import pyarrow as pa
import pyarrow.parquet as pq

from twotower.data.report import DataReport
from twotower.ids import BucketIds, HashVocab, Vocab
from twotower.query import play_gaps

# 2: evaluation sets carry every play with its per-play signals; 3: and its time (the clock);
# 4: Parquet shards + header.json, training plays in blocks
FORMAT = 4
CACHE_FORMAT = FORMAT
DEFAULT_BLOCK_ROWS = 262_144  # training plays per block (row group), whole sequences
PLAY_COLUMNS = ("seq", "user", "item", "hour", "context", "positive", "timestamp")
_SEQ_FIELDS = {"items": "item", "hours": "hour", "contexts": "context", "positive": "positive",
               "timestamps": "timestamp"}  # fmt: skip
_EVAL_RAGGED = {  # CSR values -> their offsets field
    "history": "offsets",
    "seen": "seen_offsets",
    "plays": "plays_offsets",
    "plays_skipped": "plays_offsets",
    "plays_gaps": "plays_offsets",
    "plays_timestamps": "plays_offsets",
}


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


@dataclass(frozen=True)
class Block:
    """A run of whole training sequences: one row group on disk, or a slice of them in memory.

    Attributes:
        index: Position in the dataset's block list.
        rows: Plays in the block.
        file: Parquet file (None for a block of in-memory sequences).
        row_group: Row group in ``file``.
        seq_start: First sequence (position in :attr:`PreparedData.train`) of an in-memory block.
        seq_stop: One past its last sequence.
    """

    index: int
    rows: int
    file: Path | None = None
    row_group: int = 0
    seq_start: int = 0
    seq_stop: int = 0


def plan_blocks(offsets: np.ndarray, block_rows: int) -> np.ndarray:
    """Sequence boundaries of blocks of at most ``block_rows`` plays (a longer sequence alone).

    Returns:
        ``[B + 1]`` int64 sequence indices; block ``b`` holds sequences ``[out[b], out[b+1])``.
    """
    if block_rows < 1:
        raise ValueError(f"data.block_rows must be >= 1, got {block_rows}")
    num_seq = len(offsets) - 1
    bounds = [0]
    while bounds[-1] < num_seq:
        b = bounds[-1]
        nxt = int(np.searchsorted(offsets, offsets[b] + block_rows, side="right")) - 1
        bounds.append(min(max(nxt, b + 1), num_seq))
    return np.asarray(bounds, dtype=np.int64)


def memory_blocks(seqs: Sequences, block_rows: int) -> list[Block]:
    """The blocks of in-memory sequences, cut as :meth:`PreparedData.save` cuts row groups."""
    bounds = plan_blocks(seqs.offsets, block_rows)
    return [
        Block(i, int(seqs.offsets[b] - seqs.offsets[a]), seq_start=int(a), seq_stop=int(b))
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def slice_sequences(seqs: Sequences, start: int, stop: int) -> Sequences:
    """Sequences ``start..stop-1`` as their own :class:`Sequences` (views, offsets from 0)."""
    lo, hi = int(seqs.offsets[start]), int(seqs.offsets[stop])
    return Sequences(
        items=seqs.items[lo:hi],
        offsets=seqs.offsets[start : stop + 1] - lo,
        users=seqs.users[start:stop],
        hours=seqs.hours[lo:hi],
        contexts=seqs.contexts[lo:hi],
        positive=seqs.positive[lo:hi],
        timestamps=seqs.timestamps[lo:hi],
    )


def concat_sequences(parts: list[Sequences]) -> Sequences:
    """One :class:`Sequences` of ``parts`` in order."""
    sizes = np.cumsum([0] + [len(p.items) for p in parts])
    offsets = [p.offsets[:-1] + s for p, s in zip(parts, sizes[:-1], strict=True)]
    return Sequences(
        items=np.concatenate([p.items for p in parts]).astype(np.int64),
        offsets=np.append(np.concatenate(offsets), sizes[-1]).astype(np.int64),
        users=np.concatenate([p.users for p in parts]).astype(np.int64),
        hours=np.concatenate([p.hours for p in parts]).astype(np.int8),
        contexts=np.concatenate([p.contexts for p in parts]).astype(np.int64),
        positive=np.concatenate([p.positive for p in parts]).astype(bool),
        timestamps=np.concatenate([p.timestamps for p in parts]).astype(np.int64),
    )


def read_block(block: Block) -> Sequences:
    """The sequences of an on-disk block (one row group)."""
    assert block.file is not None
    t = pq.ParquetFile(block.file).read_row_group(block.row_group, columns=list(PLAY_COLUMNS))
    return _sequences_of(t, f"{block.file} (row group {block.row_group})")


def _sequences_of(t: pa.Table, where: str) -> Sequences:
    col = {name: t.column(name).to_numpy() for name in PLAY_COLUMNS}
    seq = col["seq"]
    if len(seq) and (np.diff(seq) < 0).any():
        raise ValueError(f"{where}: column 'seq' decreases: plays must be in sequence order")
    new = np.ones(len(seq), dtype=bool)
    new[1:] = seq[1:] != seq[:-1]
    starts = np.flatnonzero(new)
    return Sequences(
        items=col["item"].astype(np.int64),
        offsets=np.append(starts, len(seq)).astype(np.int64),
        users=col["user"][starts].astype(np.int64),
        hours=col["hour"].astype(np.int8),
        contexts=col["context"].astype(np.int64),
        positive=col["positive"].astype(bool),
        timestamps=col["timestamp"].astype(np.int64),
    )


def list_blocks(folder: Path) -> list[Block]:
    """The blocks of a prepared folder's ``plays/*.parquet`` (files in name order).

    Raises:
        ValueError: No play files, a missing column, or a sequence split across row groups.
    """
    files = sorted((folder / "plays").glob("*.parquet"))
    if not files:
        raise ValueError(f"{folder / 'plays'}: no *.parquet files of training plays")
    blocks: list[Block] = []
    last_seq: int | None = None
    for f in files:
        meta = pq.ParquetFile(f).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        missing = [c for c in PLAY_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing} (expected {list(PLAY_COLUMNS)})")
        seq_col = names.index("seq")
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if rg.num_rows == 0:
                continue
            stats = rg.column(seq_col).statistics
            if stats is None or not stats.has_min_max:
                raise ValueError(f"{f}: row group {g} has no min/max statistics for 'seq'")
            if last_seq is not None and int(stats.min) <= last_seq:
                raise ValueError(
                    f"{f}: row group {g} starts at seq {stats.min} <= {last_seq}, the end of the "
                    "previous block: a sequence spans two row groups, or plays are out of order"
                )
            last_seq = int(stats.max)
            blocks.append(Block(len(blocks), int(rg.num_rows), file=f, row_group=g))
    return blocks


@dataclass
class PreparedData:
    """Everything training, evaluation and export need, built from one load.

    Attributes:
        item_vocab: Track ids (built from the training part only: no leakage).
        user_vocab: Listener ids (may be empty).
        context_vocab: Context types (may be empty).
        train_sequences: Training sequences in memory, or None while they are only on disk
            (:attr:`train` reads them on first use; streamed training reads :attr:`blocks`).
        valid: Validation next-item examples.
        test_set: Test next-item examples, or None while only on disk (:attr:`test` reads
            them on first use: training never needs them).
        item_counts: Training frequency per item index, ``[V]`` int64 (logQ, popularity).
        features: Item side features.
        tracks: Display metadata aligned with item indices (row i = item i; rows 0/1 reserved),
            columns track_id, title, artist.
        report: The data report.
        fingerprint: Hash of input files + parameters (the cache key).
        params: The preprocessing parameters.
        blocks: The training blocks: row groups of the folder, or slices of the in-memory
            sequences cut the same way.
        folder: The prepared folder the data was read from (None: built in memory only).
        catalogue: With hashed track ids (:class:`~twotower.ids.BucketIds`), every raw
            training track: ``track_id``, ``index`` (its bucket), ``plays``; else None.
    """

    item_vocab: Vocab
    user_vocab: Vocab
    context_vocab: Vocab
    train_sequences: Sequences | None
    valid: EvalSet
    test_set: EvalSet | None
    item_counts: np.ndarray
    features: ItemFeatures
    tracks: pd.DataFrame
    report: DataReport
    fingerprint: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)
    catalogue: pd.DataFrame | None = None
    folder: Path | None = None

    def __post_init__(self) -> None:
        seqs = self.train_sequences
        if not self.blocks and seqs is not None and len(seqs):  # one block of everything
            self.blocks = [Block(0, len(seqs.items), seq_start=0, seq_stop=len(seqs))]

    @property
    def num_items(self) -> int:
        """Item vocabulary size including pad and OOV."""
        return len(self.item_vocab)

    @property
    def num_users(self) -> int:
        """User vocabulary size including pad and OOV."""
        return len(self.user_vocab)

    @property
    def train(self) -> Sequences:
        """Every training sequence in memory (read from the blocks on first use)."""
        self.hold_in_memory()
        assert self.train_sequences is not None
        return self.train_sequences

    def block(self, b: Block) -> Sequences:
        """The sequences of block ``b`` (a slice in memory, or its row group read from disk)."""
        if b.file is not None:
            return read_block(b)
        return slice_sequences(self.train, b.seq_start, b.seq_stop)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        """Write atomically to folder ``path`` (see the module docstring), no pickle.

        Args:
            path: The folder (replaced).
            block_rows: Training plays per row group (whole sequences; see :func:`plan_blocks`).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        try:
            _write_plays(self.train, tmp / "plays", block_rows)
            _items_table(self).to_parquet(tmp / "items.parquet", index=False)
            for name in ("valid", "test"):
                pq.write_table(_eval_table(getattr(self, name)), tmp / f"{name}.parquet")
            if self.catalogue is not None:
                self.catalogue.to_parquet(tmp / "catalogue.parquet", index=False)
            ft = self.features
            hashed = getattr(self.item_vocab, "vocab", None)
            header = {
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "params": self.params,
                "vocabs": {
                    "user": list(self.user_vocab.ids),
                    "context": list(self.context_vocab.ids),
                    "artist": list(ft.artist_vocab.ids),
                    "album": list(ft.album_vocab.ids),
                    "genre": list(ft.genre_vocab.ids),
                },
                "audio_names": ft.audio_names,
                "item_hash": hashed.to_dict() if hashed is not None else None,
                "report": self.report.to_dict(),
                "files": {
                    str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                    for p in sorted(tmp.rglob("*.parquet"))
                },
            }
            (tmp / "header.json").write_text(json.dumps(header, indent=1, default=str))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | Path, train: bool = True) -> PreparedData:
        """Read a prepared folder; every listed file's size and checksum is verified first.

        Args:
            path: The folder.
            train: Read the training plays into memory now (False: on first use of
                :attr:`train`; streamed training reads the blocks one at a time).

        Raises:
            ValueError: The folder is incomplete, truncated, of another format or inconsistent
                (the message names the file).
        """
        path = Path(path)
        header_file = path / "header.json"
        try:
            header = json.loads(header_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{header_file}: unreadable prepared-dataset header ({e})") from e
        if header.get("format") != FORMAT:
            raise ValueError(f"{header_file}: format {header.get('format')} != {FORMAT}")
        for name, entry in (header.get("files") or {}).items():
            f = path / name
            if (
                not f.is_file()
                or f.stat().st_size != entry["bytes"]
                or (entry.get("sha256") and _sha256(f) != entry["sha256"])
            ):
                raise ValueError(f"{f}: missing or corrupt (size or checksum mismatch)")
        try:
            items = pd.read_parquet(path / "items.parquet")
            valid = _eval_set(path / "valid.parquet")
        except (OSError, pa.ArrowException, KeyError) as e:
            raise ValueError(f"{path}: unreadable items or evaluation file ({e})") from e
        try:
            blocks = list_blocks(path)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path / 'plays'}: unreadable training plays ({e})") from e
        v = header.get("vocabs") or {}
        item_vocab: Any = Vocab(items["track_id"].iloc[2:].astype(str).tolist())
        catalogue = None
        if header.get("item_hash"):
            item_vocab = BucketIds(HashVocab.from_dict(header["item_hash"]))
            try:
                catalogue = pd.read_parquet(path / "catalogue.parquet")
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path / 'catalogue.parquet'}: unreadable ({e})") from e
        data = cls(
            item_vocab=item_vocab,
            user_vocab=Vocab(v.get("user", [])),
            context_vocab=Vocab(v.get("context", [])),
            train_sequences=None,
            valid=valid,
            test_set=None,
            item_counts=np.array(items["count"], dtype=np.int64),  # writable
            features=_features_of(items, v, list(header.get("audio_names") or [])),
            tracks=_display_of(items),
            report=DataReport.from_dict(header.get("report") or {}),
            fingerprint=str(header.get("fingerprint", "")),
            params=dict(header.get("params") or {}),
            blocks=blocks,
            catalogue=catalogue,
            folder=path,
        )
        if train:
            data.hold_in_memory()
        return data

    @property
    def test(self) -> EvalSet:
        """The test examples (read from the folder on first use)."""
        if self.test_set is None:
            if self.folder is None:
                raise ValueError("no test examples: neither in memory nor a folder to read")
            try:
                self.test_set = _eval_set(self.folder / "test.parquet")
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{self.folder / 'test.parquet'}: unreadable ({e})") from e
        return self.test_set

    @test.setter
    def test(self, value: EvalSet) -> None:
        self.test_set = value

    @property
    def train_rows(self) -> int:
        """Training plays (rows of every block)."""
        return sum(b.rows for b in self.blocks)

    def hold_in_memory(self) -> None:
        """Read every on-disk block into memory (the blocks become slices of :attr:`train`).

        Raises:
            ValueError: A play file is unreadable or has the wrong column types.
        """
        if self.train_sequences is not None:
            return
        try:
            parts = [read_block(b) for b in self.blocks]
        except (OSError, pa.ArrowException, TypeError) as e:
            raise ValueError(f"unreadable training plays ({e})") from e
        self.train_sequences = concat_sequences(parts)
        sizes = np.cumsum([0] + [len(p) for p in parts])
        self.blocks = [
            Block(b.index, b.rows, seq_start=int(sizes[i]), seq_stop=int(sizes[i + 1]))
            for i, b in enumerate(self.blocks)
        ]


# ---------------------------------------------------------------------------- on-disk tables
def _write_plays(seqs: Sequences, folder: Path, block_rows: int, blocks_per_file: int = 16) -> None:
    """Training plays as Parquet files of ``blocks_per_file`` row groups, one block each."""
    folder.mkdir(parents=True)
    bounds = plan_blocks(seqs.offsets, block_rows)
    seq_of = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs.lengths)  # [N]
    schema = pa.schema(
        [("seq", pa.int64()), ("user", pa.int64()), ("item", pa.int64()), ("hour", pa.int8()),
         ("context", pa.int64()), ("positive", pa.bool_()), ("timestamp", pa.int64())]
    )  # fmt: skip
    nblocks = max(len(bounds) - 1, 1)
    for f in range(0, nblocks, blocks_per_file):
        with pq.ParquetWriter(folder / f"part-{f // blocks_per_file:05d}.parquet", schema) as w:
            for b in range(f, min(f + blocks_per_file, len(bounds) - 1)):
                lo, hi = int(seqs.offsets[bounds[b]]), int(seqs.offsets[bounds[b + 1]])
                s = seq_of[lo:hi]
                cols = [s, seqs.users[s]] + [
                    a[lo:hi]
                    for a in (seqs.items, seqs.hours, seqs.contexts, seqs.positive, seqs.timestamps)
                ]
                w.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=hi - lo)


def _items_table(d: PreparedData) -> pd.DataFrame:
    ft = d.features
    out = pd.DataFrame(
        {
            "track_id": d.tracks["track_id"].astype("string"),
            "title": d.tracks["title"].astype("string") if "title" in d.tracks else pd.NA,
            "artist": d.tracks["artist"].astype("string") if "artist" in d.tracks else pd.NA,
            "count": d.item_counts.astype(np.int64),
            "artist_idx": ft.artist.astype(np.int64),
            "album_idx": ft.album.astype(np.int64),
            "year_bucket": ft.year.astype(np.int64),
        }
    )
    genres = ft.genres.reshape(len(out), -1)
    for j in range(genres.shape[1]):
        out[f"genre_{j}"] = genres[:, j].astype(np.int64)
    for j, name in enumerate(ft.audio_names):
        out[name] = ft.audio[:, j].astype(np.float32)
    return out


def _features_of(items: pd.DataFrame, vocabs: dict[str, list], audio: list[str]) -> ItemFeatures:
    n = len(items)
    genre_cols = sorted(
        (c for c in items.columns if c.startswith("genre_")), key=lambda c: int(c[6:])
    )

    def ints(name: str) -> np.ndarray:
        return np.array(items[name], dtype=np.int64) if name in items else np.zeros(n, np.int64)

    return ItemFeatures(
        artist=ints("artist_idx"),
        album=ints("album_idx"),
        genres=np.array(items[genre_cols], dtype=np.int64)
        if genre_cols
        else np.zeros((n, 1), np.int64),
        year=ints("year_bucket"),
        audio=np.array(items[audio], dtype=np.float32) if audio else np.zeros((n, 0), np.float32),
        artist_vocab=Vocab(vocabs.get("artist", [])),
        album_vocab=Vocab(vocabs.get("album", [])),
        genre_vocab=Vocab(vocabs.get("genre", [])),
        audio_names=audio,
    )


def _display_of(items: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"track_id": items["track_id"].astype("string")})
    for c in ("title", "artist"):
        out[c] = (
            items[c].astype("string")
            if c in items
            else pd.Series(pd.NA, index=items.index, dtype="string")
        )
    return out


def _eval_table(es: EvalSet) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    for f in fields(EvalSet):
        value = getattr(es, f.name)
        if value is None or f.name in _EVAL_RAGGED.values():
            continue
        if f.name in _EVAL_RAGGED:
            offsets = pa.array(getattr(es, _EVAL_RAGGED[f.name]).astype(np.int64))
            cols[f.name] = pa.LargeListArray.from_arrays(offsets, pa.array(value))
        else:
            cols[f.name] = pa.array(value)
    return pa.table(cols)


def _eval_set(path: Path) -> EvalSet:
    """An evaluation file, one column at a time (the Arrow buffers of one column at most)."""
    pf = pq.ParquetFile(path)
    kw: dict[str, Any] = {}
    for name in pf.schema_arrow.names:
        col = pf.read(columns=[name]).column(0).combine_chunks()
        if name in _EVAL_RAGGED:
            kw[name] = np.array(col.values.to_numpy(zero_copy_only=False))
            kw[_EVAL_RAGGED[name]] = col.offsets.to_numpy().astype(np.int64)
        else:
            kw[name] = np.array(col.to_numpy(zero_copy_only=False))
        del col
        pa.default_memory_pool().release_unused()
    return EvalSet(**kw)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
