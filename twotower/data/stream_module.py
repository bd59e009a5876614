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

**Setup pass** (:func:`~twotower.data.stream_scan.scan`, one streaming pass on every rank,
deterministic): the item
vocabulary of the training rows (exact, most frequent first, as ``Vocab.build``; or
:class:`~twotower.ids.HashVocab` with ``num_buckets``), the item counts of the
training positives (logQ and popularity), the context-type vocabulary, the evaluation sample,
and counts (rows, targets, sequences).

The code is split in three files: :mod:`~twotower.data.stream_scan` (decoding, checks, the
setup pass), :mod:`~twotower.data.stream_windows` (the training stream of one shard) and this
one (the DataModule).

**Training batches.** The rows are cut into ``world_size x max(num_workers, 1)`` balanced
contiguous shards (:func:`~twotower.data.streaming.plan_shard`), one per (DDP rank, loader
worker), and every shard into exactly ``K = ceil(min_shard_rows / batch_rows)`` blocks of
consecutive rows (the last one takes the remainder: at most ``batch_rows + 1`` rows), so every
rank runs the same number of steps. A block gives the windows
(:func:`~twotower.data.windows.build_windows`: ``window + 1`` positive items per window,
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
manifest; :func:`~twotower.data.stream_scan.track_catalogue` (one more pass, memory per
distinct *training* track, at
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from twotower.data.eval_dataset import EvalDataset
from twotower.data.prepared import EvalSet, ItemFeatures
from twotower.data.schema import DataError
from twotower.data.stream_scan import (  # noqa: F401  (TRAIN.., holdout_roles: public API)
    TEST,
    TRAIN,
    VALID,
    holdout_roles,
    resolve_layout,
    scan,
    track_catalogue,
)
from twotower.data.stream_windows import StreamingWindows, _EpochLoader
from twotower.data.streaming import (
    DEFAULT_CHUNK_ROWS,
    list_fragments,
)
from twotower.ids import OOV_TOKEN, PAD_TOKEN, HashVocab, Vocab

Batch = dict[str, Tensor]


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


# The hyper-parameters that shape the data (vocabulary, splits, evaluation queries); loader
# settings (batch rows, workers, chunking, shuffling) and LightningCLI's private keys do not.
DATA_KEYS = (
    "path", "columns", "sequence_by", "session_gap_minutes", "num_buckets", "min_count",
    "user_buckets", "val_fraction", "test_fraction", "val_path", "max_eval_queries", "seed",
    "window",
)  # fmt: skip


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
        play_signals: Not on this path yet (refused with a message; kept for the link to
            ``model.play_signals``).
        play_clock: Likewise (refused; kept for the link to ``model.play_clock``).
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
        play_signals: bool = False,
        play_clock: bool = False,
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
        if play_signals or play_clock:
            raise ValueError(
                "data.play_signals / data.play_clock: the streaming DataModule does not carry "
                "per-play signals yet; use twotower.data.SessionDataModule (the in-memory path) "
                "for them"
            )
        self.play_signals = self.play_clock = False
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
            fingerprint=_fingerprint(self.path, {k: hp[k] for k in DATA_KEYS}),
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
