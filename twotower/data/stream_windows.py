"""Streaming training, part 2: the training stream of one (DDP rank, loader worker) shard.

:class:`StreamingWindows` cuts its shard of the play log into equal numbers of row blocks on
every rank, carries the last training positive over every cut (so no target is lost or
duplicated), builds the training windows of each block and deals pooled windows back out as
batches of equal size. The design is described in :mod:`twotower.data.stream_module`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from twotower.data.prepared import Sequences
from twotower.data.schema import DataError
from twotower.data.stream_scan import (
    LOOKBACK_ROWS,
    TRAIN,
    Layout,
    Rows,
    _where_fn,
    decode,
    sequence_starts,
)
from twotower.data.streaming import (
    DEFAULT_CHUNK_ROWS,
    ParquetStream,
    list_fragments,
    read_rows,
    shard_bounds,
)
from twotower.data.windows import build_windows
from twotower.ids import HashVocab, Vocab

Batch = dict[str, Tensor]


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
        # training rows that can be window events (positives only, as in build_windows): the
        # vocabulary lookups below then skip skipped plays
        keep = np.flatnonzero((block.role == TRAIN) & block.positive)
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
