"""Streaming Parquet input: data sets larger than memory, sharded by DDP rank and loader worker.

A Parquet data set (one file or a folder of ``*.parquet`` files, any number of row groups) is
read as a sequence of *fragments* (one row group each) without ever loading it whole.
:class:`ParquetStream` is an ``IterableDataset``: every (rank, worker) pair reads a contiguous,
balanced range of the data set's rows (shards differ by at most one row, so DDP ranks run the
same number of steps), in chunks of at most ``chunk_rows`` rows. Across all ranks and workers
each row is read exactly once per epoch; with ``shuffle`` the fragment order (and the rows
inside each chunk) change every epoch, seeded by ``(seed, epoch)``.

Memory: a reader holds one decoded chunk (``chunk_rows`` rows of the selected columns) plus
Arrow's read buffers of the row group being read, never the data set. Streaming preprocessing
(:func:`stream_counts`, :func:`stream_vocab`, :func:`stream_bucket_counts`) keeps only running
counts: of the distinct ids, or of a fixed number of hash buckets
(:mod:`twotower.ids`). ``bench/scale_bench.py`` measures peak RSS against chunk size.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from twotower.data.schema import DataError
from twotower.ids import HashVocab, Vocab

DEFAULT_CHUNK_ROWS = 65_536
ROW_KEY = "_row"
Chunk = dict[str, np.ndarray]


@dataclass(frozen=True)
class Fragment:
    """One row group of one Parquet file.

    Attributes:
        path: The file.
        row_group: Row-group number inside the file.
        num_rows: Rows in the row group.
        start: Global index of its first row (files sorted by name, then row groups in order).
    """

    path: str
    row_group: int
    num_rows: int
    start: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` (relative to the fragment) of a fragment, assigned to one shard."""

    fragment: Fragment
    lo: int
    hi: int

    @property
    def num_rows(self) -> int:
        """Rows in the piece."""
        return self.hi - self.lo


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of ``path``: the file itself, or every ``*.parquet`` below a folder.

    Raises:
        DataError: Nothing at ``path``, or a folder without Parquet files.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: no such Parquet file or folder")
    files = sorted(Path(f) for f in glob.glob(str(p / "**" / "*.parquet"), recursive=True))
    if not files:
        raise DataError(f"{p}: folder holds no *.parquet files")
    return files


def list_fragments(path: str | Path, columns: Sequence[str] | None = None) -> list[Fragment]:
    """Every row group of the data set at ``path`` in a fixed global order (metadata only).

    Args:
        path: A Parquet file or a folder of them.
        columns: Columns that every file must have (checked against each file's schema).

    Raises:
        DataError: An unreadable file, or a file that lacks one of ``columns`` (both named).
    """
    out: list[Fragment] = []
    start = 0
    for f in parquet_files(path):
        try:
            meta = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f}: not a readable Parquet file ({e})") from e
        if columns:
            names = set(meta.schema.names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(f"{f}: missing column(s) {missing}; the file has {sorted(names)}")
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                out.append(Fragment(str(f), rg, n, start))
                start += n
    return out


def shard_bounds(total_rows: int, num_shards: int, shard: int) -> tuple[int, int]:
    """Global rows ``[lo, hi)`` of ``shard`` when ``total_rows`` are cut into balanced parts."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
    return total_rows * shard // num_shards, total_rows * (shard + 1) // num_shards


def plan_shard(fragments: Sequence[Fragment], num_shards: int, shard: int) -> list[Piece]:
    """The pieces of ``fragments`` (in the given order) that make up one balanced shard.

    The fragments are laid end to end in the order given and the concatenated rows are cut
    into ``num_shards`` contiguous ranges: every row belongs to exactly one shard, shard sizes
    differ by at most one row, and at most two fragments per shard are read partially.
    """
    total = sum(f.num_rows for f in fragments)
    lo, hi = shard_bounds(total, num_shards, shard)
    pieces = []
    pos = 0
    for f in fragments:
        a, b = max(lo, pos), min(hi, pos + f.num_rows)
        if a < b:
            pieces.append(Piece(f, a - pos, b - pos))
        pos += f.num_rows
        if pos >= hi:
            break
    return pieces


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _chunk_to_numpy(batch: pa.RecordBatch) -> Chunk:
    return {
        name: col.to_numpy(zero_copy_only=False)
        for name, col in zip(batch.schema.names, batch.columns, strict=True)
    }


class ParquetStream(IterableDataset):
    """Rows of a Parquet data set in chunks, sharded by DDP rank and DataLoader worker.

    Use with ``DataLoader(stream, batch_size=None, num_workers=W)``: each item is one chunk,
    a dict of column -> numpy array of at most ``chunk_rows`` rows (or whatever ``transform``
    makes of it). Shard ``rank * W + worker`` of ``world_size * W`` balanced shards is read.

    Args:
        path: A Parquet file or a folder of them.
        columns: Columns to read (None: all).
        chunk_rows: Largest chunk (the memory bound of a reader, with one row group's buffers).
        rank: DDP rank (None: ``torch.distributed``'s when initialised, else 0).
        world_size: DDP world size (None: as ``rank``).
        shuffle: Shuffle fragment order and the rows inside each chunk, per epoch.
        seed: Base seed of the shuffles.
        row_index: Add the global row number of every row as ``"_row"`` (int64).
        transform: Applied to every chunk before it is yielded (e.g. id hashing, tensors).
    """

    def __init__(
        self,
        path: str | Path,
        columns: Sequence[str] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        row_index: bool = False,
        transform: Callable[[Chunk], Any] | None = None,
    ) -> None:
        super().__init__()
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} is not in 0..{int(world_size) - 1}")
        self.path = Path(path)
        self.columns = list(columns) if columns is not None else None
        self.chunk_rows = int(chunk_rows)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.row_index = row_index
        self.transform = transform
        self.epoch = 0
        self.fragments = list_fragments(self.path, self.columns)
        self.total_rows = sum(f.num_rows for f in self.fragments)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the shuffle order); call on every rank before iterating."""
        self.epoch = int(epoch)

    def shard_of(self, worker: tuple[int, int] | None = None) -> tuple[int, int]:
        """``(shard, num_shards)`` of this rank and worker.

        Args:
            worker: ``(worker id, number of workers)``; None: from ``get_worker_info()`` inside
                a DataLoader worker, else ``(0, 1)``.
        """
        rank, world = (
            (int(self.rank), int(self.world_size))
            if self.world_size is not None
            else _dist_rank_world()
        )
        if worker is None:
            info = get_worker_info()
            worker = (info.id, info.num_workers) if info is not None else (0, 1)
        wid, nw = worker
        return rank * nw + wid, world * nw

    def ordered_fragments(self) -> list[Fragment]:
        """Fragments in this epoch's order (the same on every rank and worker)."""
        if not self.shuffle:
            return list(self.fragments)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.fragments))
        return [self.fragments[i] for i in order]

    def plan(self, worker: tuple[int, int] | None = None) -> list[Piece]:
        """The pieces this rank and worker read in the current epoch."""
        shard, num_shards = self.shard_of(worker)
        return plan_shard(self.ordered_fragments(), num_shards, shard)

    def num_rows(self, worker: tuple[int, int] | None = None) -> int:
        """Rows this rank and worker read per epoch."""
        return sum(p.num_rows for p in self.plan(worker))

    def iter_chunks(self, worker: tuple[int, int] | None = None) -> Iterator[Any]:
        """Chunks of this rank and worker (see the class docstring).

        Args:
            worker: As in :meth:`shard_of` (tests play every worker without processes).
        """
        pieces = self.plan(worker)
        shard, _ = self.shard_of(worker)
        rng = np.random.default_rng([self.seed, self.epoch, shard]) if self.shuffle else None
        files: dict[str, pq.ParquetFile] = {}
        try:
            for piece in pieces:
                pf = files.get(piece.fragment.path)
                if pf is None:
                    pf = files[piece.fragment.path] = pq.ParquetFile(piece.fragment.path)
                for chunk in self._read_piece(pf, piece):
                    if rng is not None:
                        perm = rng.permutation(len(next(iter(chunk.values()))))
                        chunk = {k: v[perm] for k, v in chunk.items()}
                    yield self.transform(chunk) if self.transform is not None else chunk
        finally:
            for pf in files.values():
                pf.close()

    def __iter__(self) -> Iterator[Any]:
        return self.iter_chunks()

    def _read_piece(self, pf: pq.ParquetFile, piece: Piece) -> Iterator[Chunk]:
        """Rows ``[lo, hi)`` of one row group, in chunks of at most ``chunk_rows``."""
        frag = piece.fragment
        pos = 0
        batches = pf.iter_batches(
            batch_size=self.chunk_rows, row_groups=[frag.row_group], columns=self.columns
        )
        for batch in batches:
            a, b = max(piece.lo, pos), min(piece.hi, pos + batch.num_rows)
            if a < b:
                part = batch.slice(a - pos, b - a)
                chunk = _chunk_to_numpy(part)
                if self.row_index:
                    chunk[ROW_KEY] = np.arange(frag.start + a, frag.start + b, dtype=np.int64)
                yield chunk
            pos += batch.num_rows
            if pos >= piece.hi:
                break


def read_rows(
    fragments: Sequence[Fragment], lo: int, hi: int, columns: Sequence[str] | None = None
) -> Chunk:
    """Global rows ``[lo, hi)`` of a data set (fragments in file order), with ``"_row"``.

    Reads only the row groups that overlap the range (each one whole, as Parquet decodes
    them); for short look-backs, not for scans (use :class:`ParquetStream`).
    """
    parts: list[pa.Table] = []
    starts: list[np.ndarray] = []
    for f in fragments:
        a, b = max(lo, f.start), min(hi, f.start + f.num_rows)
        if a >= b:
            continue
        with pq.ParquetFile(f.path) as pf:
            t = pf.read_row_group(f.row_group, columns=list(columns) if columns else None)
        parts.append(t.slice(a - f.start, b - a))
        starts.append(np.arange(a, b, dtype=np.int64))
    if not parts:
        raise ValueError(f"rows [{lo}, {hi}) are outside the data set")
    table = pa.concat_tables(parts).combine_chunks()
    out = {name: table.column(name).to_numpy() for name in table.column_names}
    out[ROW_KEY] = np.concatenate(starts)
    return out


# ---------------------------------------------------------------------------------- preprocessing
def _column_batches(path: str | Path, column: str, chunk_rows: int) -> Iterator[pa.Array]:
    """One column of the whole data set, chunk by chunk (no sharding)."""
    for f in parquet_files(path):
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f}: not a readable Parquet file ({e})") from e
        with pf:
            if column not in pf.schema_arrow.names:
                raise DataError(f"{f}: no column {column!r}; it has {pf.schema_arrow.names}")
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=[column]):
                yield batch.column(0)


def stream_counts(path: str | Path, column: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> pd.Series:
    """Occurrences of every distinct value of ``column``, read chunk by chunk.

    Memory: the running counts (one row per distinct value, kept in Arrow) plus one chunk;
    never the column. Values are compared as strings (``str(id)``, as
    :class:`~twotower.ids.Vocab` does); missing values are not counted.

    Returns:
        Counts indexed by value (string), in no particular order.
    """
    acc = _count_table(path, column, chunk_rows)
    return pd.Series(acc["n"].to_numpy(), index=pd.Index(acc["value"].to_pandas()), name=column)


class CountAccumulator:
    """Running occurrence counts of string values, fed chunk by chunk (kept in Arrow).

    Memory: one row per distinct value plus the chunks not merged yet (merged once they hold
    as many rows as the accumulator, so merging costs amortised O(rows)).

    Args:
        merge_rows: Merge pending chunk counts at least once this many rows are pending.
    """

    def __init__(self, merge_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.merge_rows = int(merge_rows)
        self._acc: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, values: Any) -> None:
        """Count ``values`` (Arrow array, numpy or list; compared as strings, nulls ignored)."""
        col = values if isinstance(values, pa.Array) else pa.array(values, from_pandas=True)
        if not pa.types.is_large_string(col.type):
            col = pc.cast(col, pa.large_string())
        vc = pc.value_counts(col)
        t = pa.table({"value": vc.field("values"), "n": vc.field("counts").cast(pa.int64())})
        self._pending.append(t)
        self._pending_rows += t.num_rows
        size = self._acc.num_rows if self._acc is not None else 0
        if self._pending_rows >= max(self.merge_rows, size):
            self._acc = _merge_counts(self._acc, self._pending)
            self._pending, self._pending_rows = [], 0

    def table(self) -> pa.Table:
        """``value`` (large_string), ``n`` (int64) of the distinct non-null values so far."""
        self._acc = _merge_counts(self._acc, self._pending)
        self._pending, self._pending_rows = [], 0
        if self._acc is None:
            return pa.table(
                {"value": pa.array([], pa.large_string()), "n": pa.array([], pa.int64())}
            )
        return self._acc.filter(pc.is_valid(self._acc["value"]))


def vocab_from_counts(counts: pa.Table, min_count: int = 1) -> Vocab:
    """A :class:`~twotower.ids.Vocab` of a ``value``/``n`` count table.

    Most frequent first, ties by id (Arrow sorts UTF-8 bytes, which is code-point order like
    Python's): equal to ``Vocab.build`` of the counted column.
    """
    counts = counts.filter(pc.greater_equal(counts["n"], min_count))
    order = pc.sort_indices(counts, sort_keys=[("n", "descending"), ("value", "ascending")])
    return Vocab(counts["value"].take(order).to_pylist())


def _count_table(path: str | Path, column: str, chunk_rows: int) -> pa.Table:
    """Arrow table ``value`` (large_string), ``n`` (int64) of the distinct non-null values."""
    acc = CountAccumulator(chunk_rows)
    for col in _column_batches(path, column, chunk_rows):
        acc.add(col)
    return acc.table()


def _merge_counts(acc: pa.Table | None, pending: list[pa.Table]) -> pa.Table | None:
    parts = ([acc] if acc is not None else []) + pending
    if not parts:
        return None
    merged = pa.concat_tables(parts).group_by("value").aggregate([("n", "sum")])
    out = pa.table({"value": merged["value"], "n": merged["n_sum"]}).combine_chunks()
    pa.default_memory_pool().release_unused()  # hand freed merge buffers back to the OS
    return out


def stream_vocab(
    path: str | Path, column: str, min_count: int = 1, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Vocab:
    """The :class:`~twotower.ids.Vocab` of ``column``, without loading the column.

    Equal to ``Vocab.build(whole_column, min_count)`` (most frequent first, ties by id; Arrow
    sorts UTF-8 bytes, which is code-point order like Python's).
    """
    return vocab_from_counts(_count_table(path, column, chunk_rows), min_count)


def stream_bucket_counts(
    path: str | Path,
    column: str,
    vocab: HashVocab,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> np.ndarray:
    """Occurrences per hashed index ``[len(vocab)]`` (logQ / popularity for a hashed catalogue).

    Memory: ``len(vocab)`` int64 counters plus one chunk, whatever the number of distinct ids.
    """
    counts = np.zeros(len(vocab), dtype=np.int64)
    for col in _column_batches(path, column, chunk_rows):
        counts += np.bincount(vocab.lookup(col), minlength=len(vocab))
    counts[0] = 0  # missing values land on PAD: not occurrences
    return counts


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
