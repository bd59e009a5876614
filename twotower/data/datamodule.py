"""The Lightning DataModule: a prepared dataset -> training batches and evaluation batches.

One DataModule for every size. The data is prepared once (:func:`~twotower.data.pipeline.
prepare_data`, or read from a folder another engine wrote in the same layout: ``prepared``), and
training reads its blocks through :class:`~twotower.data.train_batches.TrainingBatches`: from
memory, or one row group at a time from the Parquet files (memory then follows ``block_rows x
shuffle_blocks``, not the data). Both give the same batches: the blocks, their order and the
shuffle buffers are the same; only where a block is read from differs. ``streaming: auto`` (the
default) holds data of one shuffle buffer or less in memory and streams anything larger.

Training: every training sequence (positive events only, or every play with the per-play
signals) is cut, from its end backwards, into windows of ``window + 1`` items, left-padded with
0 (:func:`~twotower.data.windows.build_windows`). A window gives ``window`` next-item examples
at once (input position ``t`` predicts item ``t + 1``).

Evaluation: the last ``window`` items of each validation/test history, left-padded, with the
target and, when the data's ``filter_seen`` is on, the already-seen items as a CSR slice.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from twotower.data.eval_dataset import EvalDataset
from twotower.data.pipeline import DataConfig, prepare_data
from twotower.data.prepared import DEFAULT_BLOCK_ROWS, PreparedData
from twotower.data.schema import DataError
from twotower.data.train_batches import TrainingBatches, TrainLoader, global_seed
from twotower.data.windows import build_windows, windows_per_sequence
from twotower.query import left_pad_last  # noqa: F401  (re-export)

__all__ = ["EvalDataset", "TwoTowerDataModule", "build_windows", "left_pad_last"]

Batch = dict[str, Tensor]


def _batch_as_is(batch: Batch) -> Batch:
    return batch


def block_windows(data: PreparedData, window: int, stride: int, play_signals: bool) -> np.ndarray:
    """Training windows of every block, ``[B]`` (on disk: reads only ``seq`` and ``positive``)."""
    out = np.zeros(len(data.blocks), dtype=np.int64)
    for i, b in enumerate(data.blocks):
        if b.file is None:
            seqs = data.block(b)
            keep = np.ones(len(seqs.items), bool) if play_signals else seqs.positive
            seq_of = np.repeat(np.arange(len(seqs)), seqs.lengths)
            n = np.bincount(seq_of[keep], minlength=len(seqs))
        else:
            t = pq.ParquetFile(b.file).read_row_group(b.row_group, columns=["seq", "positive"])
            seq = t.column("seq").to_numpy()
            keep = np.ones(len(seq), bool) if play_signals else t.column("positive").to_numpy()
            _, n = np.unique(seq[keep], return_counts=True)
        out[i] = int(windows_per_sequence(n, window, stride).sum())
    return out


def _no_validation_message(params: dict[str, Any]) -> str:
    """Why training cannot start without validation queries, naming the options to change."""
    split = params.get("split", "?")
    msg = f"{params.get('source', 'data')}: no validation queries (data.split={split}), so no "
    msg += "model can be selected"
    if split in ("time", "next_in_session"):
        cut = params.get("resolved_cutoffs", {})
        msg += (
            f": nothing to evaluate starts in [{cut.get('val_cutoff', '?')}, "
            f"{cut.get('test_cutoff', '?')}) (data.val_cutoff={params.get('val_cutoff')!r}, "
            f"data.test_cutoff={params.get('test_cutoff')!r}); move the cut-offs (e.g. "
            "--data.val_cutoff 0.7 --data.test_cutoff 0.85) or use more data"
        )
        if split == "next_in_session":
            msg += " (a case needs a session with 2+ positive plays that starts in the period)"
    else:
        msg += "; use more data"
    return msg + "; `twotower data-report` shows the split"


class TwoTowerDataModule(pl.LightningDataModule):
    """A prepared dataset as Lightning batches, in memory or streamed (see the module doc).

    The first block of arguments is :class:`~twotower.data.pipeline.DataConfig`, field for field
    (see its documentation); the rest choose the prepared folder and shape the batches.

    Args:
        format: Loader name.
        path: Input file or folder.
        columns: Canonical column -> file column.
        options: Loader options, e.g. ``{"preset": "tiny"}``.
        session_gap_minutes: Inactivity that starts a new session.
        sequence_by: ``user`` | ``session`` | ``auto``.
        split: ``leave_last_out`` | ``time`` | ``next_in_session``.
        val_cutoff: Start of validation (``time``, ``next_in_session``): ISO date or a
            fraction in (0, 1) (quantile of the play times).
        test_cutoff: Start of test, likewise.
        dedupe_consecutive: Remove consecutive repeats inside a session.
        kcore: Minimum rows per user and track (0 off).
        max_history: Events kept in each evaluation history.
        filter_seen: ``auto`` | ``on`` | ``off``.
        cache_dir: Cache folder of the prepared data (None: no cache).
        seed: Preprocessing seed.
        block_rows: Training plays per block (row group), whole sequences.
        num_buckets: Hash track ids into this many embedding rows (None: exact vocabulary).
        prepared: Read this prepared folder (written by :meth:`PreparedData.save` or by another
            engine in the same layout) instead of preparing ``path``; the options above are
            then ignored (the folder's header has its own).
        streaming: ``true``: keep the training plays on disk and read them block by block
            (needs ``cache_dir`` or ``prepared``); ``false``: hold them in memory; ``auto``:
            in memory when they fit in one shuffle buffer (``block_rows x shuffle_blocks``
            plays) or nothing is on disk, else streamed. The batches are the same either way.
        shuffle_blocks: Blocks shuffled together (the buffer); data of at most this many
            blocks is shuffled globally.
        batch_size: Training windows per batch (each gives up to ``window`` examples).
        eval_batch_size: Queries per evaluation batch.
        window: History length ``L`` of training windows and evaluation queries.
        window_stride: Events between consecutive training windows of a sequence (0 =
            ``window``: non-overlapping; smaller overlaps them, see :func:`build_windows`).
        play_signals: Per-play signals: training windows and evaluation histories hold every
            play (skipped ones marked, never a target) with the gap since the previous play;
            linked to ``model.play_signals``.
        play_clock: Training windows and evaluation histories also carry the hour of day and
            weekday (UTC) of every play, from its timestamp (needs ``play_signals``); linked
            to ``model.play_clock``.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory (None: when CUDA is available).
        persistent_workers: Keep evaluation workers alive between epochs (training workers
            are started every epoch, so they see its plan).
    """

    def __init__(
        self,
        format: str = "synthetic",
        path: str | None = None,
        columns: dict[str, str] | None = None,
        options: dict[str, Any] | None = None,
        session_gap_minutes: float = 30.0,
        sequence_by: str = "auto",
        split: str = "leave_last_out",
        val_cutoff: str | float | None = None,
        test_cutoff: str | float | None = None,
        dedupe_consecutive: bool = False,
        kcore: int = 0,
        max_history: int = 200,
        filter_seen: str | bool = "auto",
        cache_dir: str | None = ".cache/twotower",
        seed: int = 0,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        num_buckets: int | None = None,
        prepared: str | None = None,
        streaming: bool | str = "auto",
        shuffle_blocks: int = 16,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        window: int = 50,
        window_stride: int = 0,
        play_signals: bool = False,
        play_clock: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = DataConfig(
            format=format,
            path=path,
            columns=columns,
            options=options,
            session_gap_minutes=session_gap_minutes,
            sequence_by=sequence_by,
            split=split,
            val_cutoff=val_cutoff,
            test_cutoff=test_cutoff,
            dedupe_consecutive=dedupe_consecutive,
            kcore=kcore,
            max_history=max_history,
            filter_seen=filter_seen,
            cache_dir=cache_dir,
            seed=seed,
            block_rows=block_rows,
            num_buckets=num_buckets,
        )
        self.prepared = prepared
        if streaming not in (True, False, "auto"):
            raise ValueError(f"data.streaming: expected true, false or auto, got {streaming!r}")
        self.streaming = streaming
        if shuffle_blocks < 1:
            raise ValueError(f"data.shuffle_blocks must be >= 1, got {shuffle_blocks}")
        self.shuffle_blocks = shuffle_blocks
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.window = window
        self.window_stride = window_stride
        if play_clock and not play_signals:
            raise ValueError("data.play_clock needs data.play_signals (a per-play signal)")
        self.play_signals = play_signals
        self.play_clock = play_clock
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self._data: PreparedData | None = None
        self._train: TrainingBatches | None = None

    # ------------------------------------------------------------------ data and sizes
    @property
    def data(self) -> PreparedData:
        """The prepared data (built, or read from its folder, on first use).

        Streamed, the training plays stay on disk; :attr:`PreparedData.train` reads them all
        only when a caller needs every play in memory (the baselines).
        """
        if self._data is None:
            on_disk = self.prepared is not None or self.config.cache_dir is not None
            in_memory = self.streaming is False or (self.streaming == "auto" and not on_disk)
            one_buffer = self.config.block_rows * self.shuffle_blocks
            try:
                if self.prepared is not None:
                    data = PreparedData.load(self.prepared, train=in_memory)
                else:
                    data = prepare_data(self.config, in_memory=in_memory)
                if self.streaming == "auto" and data.train_rows <= one_buffer:
                    data.hold_in_memory()
            except DataError:
                raise
            except ValueError as e:  # an unreadable prepared folder
                raise DataError(f"data.prepared: {e}" if self.prepared else str(e)) from e
            self._data = data
        return self._data

    @property
    def streamed(self) -> bool:
        """Whether training reads its blocks from disk (else from memory)."""
        return self.data.train_sequences is None

    @property
    def exclude_seen(self) -> bool:
        """Whether evaluation removes already-seen items (resolved by the pipeline)."""
        return bool(self.data.params.get("filter_seen", False))

    @property
    def num_items(self) -> int:
        """Item vocabulary size including pad and OOV."""
        return self.data.num_items

    @property
    def num_users(self) -> int:
        """User vocabulary size including pad and OOV."""
        return self.data.num_users

    def model_sizes(self) -> dict[str, int]:
        """Data-derived constructor arguments of :class:`~twotower.model.module.TwoTowerModule`."""
        d = self.data
        sizes = dict(d.features.sizes())
        sizes.update(
            num_items=d.num_items,
            num_users=d.num_users,
            num_contexts=len(d.context_vocab),
            max_genres=int(d.features.genres.shape[1]) if d.features.genres.ndim == 2 else 1,
        )
        return sizes

    def prepare_data(self) -> None:
        """Prepare the data once (rank 0) before every rank reads the folder in :meth:`setup`."""
        if self.prepared is None and self.config.cache_dir is not None:
            prepare_data(self.config, in_memory=False)  # rank 0 checks or rebuilds the folder

    def setup(self, stage: str | None = None) -> None:
        """Load the data (every rank) and plan the training batches."""
        if stage == "fit" and len(self.data.valid) == 0:
            raise DataError(_no_validation_message(self.data.params))
        if stage in (None, "fit") and self._train is None:
            self._train = self.train_batches()

    def train_batches(self, rank: int = 0, world_size: int = 1) -> TrainingBatches:
        """The training batches of one DDP rank (see :class:`TrainingBatches`)."""
        d = self.data
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            rank, world_size = trainer.global_rank, trainer.world_size
        batches = TrainingBatches(
            list(d.blocks),
            d.block,
            block_windows(d, self.window, self.window_stride, self.play_signals),
            self.batch_size,
            self.window,
            self.window_stride,
            self.play_signals,
            self.play_clock,
            seed=global_seed(self.config.seed),
            shuffle_blocks=self.shuffle_blocks,
            rank=rank,
            world_size=world_size,
        )
        if not self.streamed:
            batches.warm()
        return batches

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=_batch_as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches, ordered by ``(seed, epoch)`` (resumable mid-epoch)."""
        self.setup("fit")
        assert self._train is not None
        trainer = getattr(self, "trainer", None)
        loader = TrainLoader(
            self._train,
            epoch_fn=self._epoch if trainer is not None else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        if trainer is not None:
            loader.epoch_batches = lambda: trainer.num_training_batches
        return loader

    def _epoch(self) -> int:
        """The epoch being trained (epochs fully processed so far)."""
        return int(self.trainer.fit_loop.epoch_progress.current.processed)

    def eval_dataset(self, split: str) -> EvalDataset:
        """Evaluation queries of ``"valid"`` or ``"test"``."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        return EvalDataset(
            getattr(self.data, split),
            self.window,
            self.exclude_seen,
            self.play_signals,
            self.play_clock,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation queries in order."""
        return self._loader(self.eval_dataset("valid"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test queries in order."""
        return self._loader(self.eval_dataset("test"), self.eval_batch_size)


def datamodule_from_hparams(hparams: dict[str, Any]) -> TwoTowerDataModule:
    """The DataModule of saved hyper-parameters (a checkpoint's or a manifest's).

    Keys that :class:`TwoTowerDataModule` does not take (LightningCLI's private ones) are left
    out.
    """
    params = inspect.signature(TwoTowerDataModule.__init__).parameters
    return TwoTowerDataModule(**{k: v for k, v in hparams.items() if k in params and k != "self"})


# The class's name before one DataModule served every size: older configs and checkpoints
# (``class_path: twotower.data.datamodule.SessionDataModule``) still load.
SessionDataModule = TwoTowerDataModule
