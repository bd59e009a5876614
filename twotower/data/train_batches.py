"""Training batches of a prepared dataset: one code path for data in memory and streamed from disk.

The training plays are cut into *blocks* of whole sequences (:class:`~twotower.data.prepared.Block`:
a Parquet row group on disk, or the same slice of the sequences in memory). Every epoch:

1. the blocks are dealt to *shards*, one per (DDP rank, loader worker): block by block in a
   seeded order when there are at least :data:`MIN_BLOCKS_PER_SHARD` blocks per shard (each
   shard then reads only its blocks), otherwise every shard reads every block and keeps every
   ``S``-th batch;
2. a shard reads ``shuffle_blocks`` blocks at a time (a *buffer*), builds their training windows
   (:func:`~twotower.data.windows.build_windows`), orders them with :func:`epoch_order`
   (seeded by ``(seed, epoch)``; length-bucketed batches) and hands out full batches, carrying a
   short remainder into the next buffer.

Data that fits in one buffer is ordered exactly as one global shuffle, whether its blocks are in
memory or read from Parquet, so a small log trained in memory and the same log streamed see the
same batches. The order depends only on the seed, the epoch and the number of shards, so a run
resumed mid-epoch (:class:`TrainLoader`) skips exactly the batches it had trained on. DDP ranks
stop after the same number of batches (the smallest rank's), so no rank waits for another.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from twotower.data.prepared import Block, Sequences
from twotower.data.windows import build_windows

Batch = dict[str, Tensor]
MIN_BLOCKS_PER_SHARD = 4
BUCKET_BATCHES = 50


def epoch_order(
    n: int,
    rng: np.random.Generator,
    lengths: np.ndarray | None = None,
    batch_size: int = 1,
    bucket_batches: int = BUCKET_BATCHES,
) -> np.ndarray:
    """A random order of ``n`` windows; with ``lengths``, batches of similar length.

    The shuffled indices are cut into pools of ``bucket_batches`` batches, each pool is sorted
    by length and cut into batches, and the batches are shuffled; the one short batch (if any)
    stays last. The model then trims the padding columns that a whole batch shares.

    Args:
        n: Number of windows.
        rng: The epoch's generator.
        lengths: Real (non-pad) length of every window, ``[n]``.
        batch_size: Batch size (bucketing only).
        bucket_batches: Batches per sorted pool.
    """
    order = rng.permutation(n)
    if lengths is None or batch_size <= 1:
        return order
    pool = batch_size * bucket_batches
    full, short = [], []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        for i in range(0, len(chunk), batch_size):
            part = chunk[i : i + batch_size]
            (full if len(part) == batch_size else short).append(part)
    if not full and not short:
        return order
    return np.concatenate([full[i] for i in rng.permutation(len(full))] + short)


class TrainingBatches(IterableDataset):
    """The training batches of one DDP rank; loader workers split them (see the module doc).

    Args:
        blocks: The dataset's blocks.
        read: Returns the sequences of a block (in memory: a slice; on disk: its row group).
        block_windows: Training windows of every block, ``[B]`` (for lengths and sharding).
        batch_size: Windows per batch.
        window: ``L``, inputs per window.
        stride: Window stride (0 = ``window``).
        play_signals: Windows with per-play signals.
        clock: Windows with hour and weekday of each play.
        seed: Base seed of the order.
        shuffle_blocks: Blocks per buffer (the shuffle's reach and the memory bound).
        rank: DDP rank.
        world_size: DDP world size.
    """

    def __init__(
        self,
        blocks: list[Block],
        read: Callable[[Block], Sequences],
        block_windows: np.ndarray,
        batch_size: int,
        window: int,
        stride: int = 0,
        play_signals: bool = False,
        clock: bool = False,
        seed: int = 0,
        shuffle_blocks: int = 16,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if shuffle_blocks < 1:
            raise ValueError(f"data.shuffle_blocks must be >= 1, got {shuffle_blocks}")
        self.blocks = blocks
        self.read = read
        self.block_windows = np.asarray(block_windows, dtype=np.int64)
        self.batch_size = batch_size
        self.window, self.stride = window, stride
        self.play_signals, self.clock = play_signals, clock
        self.seed = seed
        self.shuffle_blocks = shuffle_blocks
        self.rank, self.world_size = rank, world_size
        self.num_workers = 1  # set by TrainLoader
        self.epoch = 0
        self.skip: list[int] = []  # batches each shard skips once (mid-epoch resume)
        self.rotation = 0  # worker w reads shard (w + rotation) % workers (mid-epoch resume)
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ the plan
    @property
    def num_shards(self) -> int:
        """Shards of the whole run: ranks x loader workers."""
        return self.world_size * self.num_workers

    def by_block(self) -> bool:
        """Whether shards split the blocks (else every shard reads all and splits batches)."""
        return self.num_shards > 1 and len(self.blocks) >= MIN_BLOCKS_PER_SHARD * self.num_shards

    def shard_blocks(self, shard: int, epoch: int) -> list[int]:
        """Block indices shard ``shard`` reads in ``epoch``, in reading order."""
        n = len(self.blocks)
        if n <= 1:
            order = np.arange(n)
        else:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(n)
        if self.by_block():
            order = order[shard :: self.num_shards]
        return order.tolist()

    def shard_batches(self, shard: int, epoch: int) -> int:
        """Batches shard ``shard`` yields in ``epoch``."""
        if self.by_block():
            w = int(self.block_windows[self.shard_blocks(shard, epoch)].sum())
            return math.ceil(w / self.batch_size)
        total = math.ceil(int(self.block_windows.sum()) / self.batch_size)
        return len(range(shard, total, self.num_shards))

    def rank_batches(self, epoch: int) -> int:
        """Batches every rank yields in ``epoch`` (the smallest rank's count)."""
        nw = self.num_workers
        per_rank = [
            sum(self.shard_batches(r * nw + w, epoch) for w in range(nw))
            for r in range(self.world_size)
        ]
        return min(per_rank)

    def __len__(self) -> int:
        return self.rank_batches(self.epoch)

    def warm(self) -> None:
        """Build the windows of in-memory data held in one buffer now (before workers fork)."""
        if len(self.blocks) <= self.shuffle_blocks:
            for b in range(len(self.blocks)):
                self._windows(b)

    # ------------------------------------------------------------------ reading
    def _windows(self, b: int) -> dict[str, np.ndarray]:
        cached = self._cache.get(b)
        if cached is not None:
            return cached
        w = build_windows(
            self.read(self.blocks[b]), self.window, self.stride, self.play_signals, self.clock
        )
        if self.blocks[b].file is None and len(self.blocks) <= self.shuffle_blocks:
            self._cache[b] = w  # in memory and all in one buffer: build once per run
        return w

    def iter_shard(self, shard: int, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of ``shard`` in ``epoch``, the first ``skip`` of them left out."""
        mine = self.shard_blocks(shard, epoch)
        step = 1 if self.by_block() or self.num_shards == 1 else self.num_shards
        offset = 0 if step == 1 else shard
        bs = self.batch_size
        carry: dict[str, np.ndarray] | None = None
        produced = 0  # batches of this buffer stream (before the shard's every-S-th pick)
        for k in range(0, max(len(mine), 1), self.shuffle_blocks):
            buffer = sorted(mine[k : k + self.shuffle_blocks])
            last = k + self.shuffle_blocks >= len(mine)
            parts = [self._windows(b) for b in buffer]
            if carry is not None:
                parts.insert(0, carry)
            if not parts:
                return
            arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            n = len(arrays["users"])  # windows of the buffer (and the carried remainder)
            # every shard of a batch split draws the same order; the first buffer of the first
            # shard draws from (seed, epoch) alone: one buffer = one global shuffle
            who = 0 if step > 1 else shard
            seed = [self.seed, epoch] + ([] if k == 0 and who == 0 else [who, k])
            lengths = (arrays["items"] != 0).sum(axis=1)  # [n] real inputs per window
            order = epoch_order(n, np.random.default_rng(seed), lengths, bs)  # [n]
            full = n if last else (n // bs) * bs
            for start in range(0, full, bs):
                i = produced
                produced += 1
                if i % step != offset:
                    continue
                if skip > 0:
                    skip -= 1
                    continue
                idx = order[start : start + bs]  # [bs]
                yield {name: torch.from_numpy(v[idx]) for name, v in arrays.items()}
            rest = order[full:]  # the short remainder, carried into the next buffer
            carry = {name: v[rest] for name, v in arrays.items()} if len(rest) else None

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        local = ((info.id if info is not None else 0) + self.rotation) % self.num_workers
        skip = self.skip[local] if local < len(self.skip) else 0
        return self.iter_shard(self.rank * self.num_workers + local, self.epoch, skip)


def _worker_skips(counts: list[int], served: int) -> tuple[list[int], int]:
    """Batches of each shard among the first ``served`` handed out, and the shard due next.

    The DataLoader takes one batch from each worker in turn, passing over exhausted ones, and
    starts every iterator at worker 0; the resumed iterator therefore rotates the shards over
    the workers so that the shard whose turn it was is read by worker 0.
    """
    skips = [0] * len(counts)
    remaining = list(counts)
    left, w = served, 0
    while left > 0 and any(remaining):
        if remaining[w]:
            skips[w] += 1
            remaining[w] -= 1
            left -= 1
        w = (w + 1) % len(counts)
    return skips, w


class TrainLoader(DataLoader):
    """A DataLoader of :class:`TrainingBatches` that knows its epoch and resumes mid-epoch.

    Lightning stores :meth:`state_dict` (batches served in the current epoch, 0 once the epoch
    is complete) in every checkpoint and calls :meth:`load_state_dict` when resuming; the next
    iterator then skips that many batches of the same epoch order. ``epoch_fn`` gives the
    trainer's epoch (Lightning may create the first iterator of a resumed run before it sets
    the epoch); ``epoch_batches`` the batches of a full epoch (``limit_train_batches`` may make
    it shorter than the loader).
    """

    def __init__(
        self,
        dataset: TrainingBatches,
        epoch_fn: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("persistent_workers", None)  # workers must see each epoch's plan
        super().__init__(dataset, batch_size=None, collate_fn=_as_is, **kwargs)
        dataset.num_workers = max(self.num_workers, 1)
        self.epoch_fn = epoch_fn
        self.epoch_batches: Callable[[], float] | None = None
        self._served = 0
        self._resume = 0

    def __iter__(self) -> Iterator[Any]:
        ds: TrainingBatches = self.dataset  # type: ignore[assignment]
        if self.epoch_fn is not None:
            ds.epoch = int(self.epoch_fn())
        limit = ds.rank_batches(ds.epoch)
        nw = ds.num_workers
        counts = [ds.shard_batches(ds.rank * nw + w, ds.epoch) for w in range(nw)]
        self._served, self._resume = self._resume, 0
        ds.skip, ds.rotation = _worker_skips(counts, self._served)
        if self._served >= limit:
            return
        for batch in super().__iter__():
            self._served += 1
            yield batch
            if self._served >= limit:
                break

    def state_dict(self) -> dict[str, int]:
        """Batches handed out in the current epoch (0 when the epoch is complete)."""
        full = self.epoch_batches() if self.epoch_batches is not None else len(self)
        return {"batches": self._served if self._served < full else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip the batches a checkpoint had already trained on."""
        self._resume = max(int(state.get("batches", 0)), 0)


def _as_is(batch: Batch) -> Batch:
    return batch


def global_seed(default: int) -> int:
    """The seed of ``seed_everything`` (``PL_GLOBAL_SEED``), else ``default``."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))
