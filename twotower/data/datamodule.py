"""The Lightning DataModule: prepared data -> training windows and evaluation batches.

Training: every training sequence (positive events only) is cut, from its end backwards, into
windows of ``window + 1`` items, left-padded with 0. A window gives ``window`` next-item examples
at once (input position ``t`` predicts item ``t + 1``). By default the windows do not overlap and
every positive event after the first of its sequence is a target in exactly one window;
``window_stride < window`` overlaps them (each target then appears behind several contexts).

Evaluation: the last ``window`` items of each validation/test history, left-padded, with the
target and, when the data's ``filter_seen`` is on, the already-seen items as a CSR slice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from twotower.data.eval_dataset import EvalDataset
from twotower.data.pipeline import DataConfig, prepare_data
from twotower.data.prepared import PreparedData
from twotower.data.schema import DataError
from twotower.data.windows import build_windows
from twotower.query import left_pad_last  # noqa: F401  (re-export)

__all__ = ["EvalDataset", "SessionDataModule", "build_windows", "left_pad_last"]

Batch = dict[str, Tensor]


def _batch_as_is(batch: Batch) -> Batch:
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on ``(seed, epoch)``, not on the global RNG state.

    A run resumed from a checkpoint therefore sees exactly the batches an uninterrupted run
    would. The epoch comes from ``epoch_fn`` when given (the trainer's epoch counter: Lightning
    may create the first iterator of a resumed run before it calls :meth:`set_epoch`), else
    from :meth:`set_epoch`.

    With ``lengths`` and ``batch_size``, consecutive runs of ``batch_size`` indices (the
    batches the DataLoader forms) hold windows of similar length: the shuffled indices are cut
    into pools of ``bucket_batches`` batches, each pool is sorted by length and cut into
    batches, and the batches are shuffled. The model then trims the padding columns that a
    whole batch shares, instead of computing on them.

    Args:
        n: Dataset size.
        seed: Base seed.
        epoch_fn: Returns the current epoch.
        lengths: Real (non-pad) length of every item, ``[n]``, for length bucketing.
        batch_size: The DataLoader's batch size (bucketing only).
        bucket_batches: Batches per sorted pool.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        lengths: np.ndarray | None = None,
        batch_size: int = 1,
        bucket_batches: int = 50,
    ) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.epoch_fn = epoch_fn
        self.lengths = lengths
        self.batch_size = batch_size
        self.bucket_batches = bucket_batches
        self.start = 0  # indices to skip once, on the next iteration (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = rng.permutation(self.n)
        if self.lengths is not None and self.batch_size > 1:
            order = self._bucketed(order, rng)
        start, self.start = self.start, 0
        return iter(order[start:].tolist())

    def _bucketed(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Pools of ``bucket_batches`` batches sorted by length, batches shuffled."""
        assert self.lengths is not None
        b = self.batch_size
        pool = b * self.bucket_batches
        full, short = [], []
        for start in range(0, self.n, pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            for i in range(0, len(chunk), b):
                (full if len(chunk[i : i + b]) == b else short).append(chunk[i : i + b])
        # the one short batch (if any) stays last, so every other batch is full
        return np.concatenate([full[i] for i in rng.permutation(len(full))] + short)

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochShuffleSampler` that resumes mid-epoch.

    Lightning stores :meth:`state_dict` (batches served in the current epoch, 0 once the epoch
    is complete) in every checkpoint and calls :meth:`load_state_dict` when resuming; the next
    iterator then starts that many batches into the same epoch order, so a run resumed from a
    mid-epoch checkpoint sees exactly the batches an uninterrupted run would (instead of
    restarting the epoch). ``epoch_batches`` returns the batches of a full epoch (the trainer's
    ``num_training_batches``, which ``limit_train_batches`` may make shorter than the loader).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self.epoch_batches: Callable[[], float] | None = None

    def __iter__(self) -> Iterator[Any]:
        self._served = getattr(self.sampler, "start", 0) // self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Batches handed out in the current epoch (0 when the epoch is complete)."""
        full = self.epoch_batches() if self.epoch_batches is not None else len(self)
        return {"batches": self._served if self._served < full else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip the batches a checkpoint had already trained on."""
        self.sampler.start = max(int(state.get("batches", 0)), 0) * self.batch_size


class WindowDataset(Dataset):
    """Training windows; fetched a whole batch at a time (``__getitems__``), no per-row collate.

    Args:
        arrays: Output of :func:`build_windows`.
    """

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self.lengths = (arrays["items"] != 0).sum(axis=1)

    def __len__(self) -> int:
        return int(self.tensors["items"].shape[0])

    def __getitem__(self, i: int) -> Batch:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


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


class SessionDataModule(pl.LightningDataModule):
    """Prepared data as Lightning batches.

    The first block of arguments is :class:`~twotower.data.pipeline.DataConfig`, field for field
    (see its documentation); the rest shape the batches.

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
        persistent_workers: Keep workers alive between epochs.
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
        )
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
        self._train: WindowDataset | None = None

    # ------------------------------------------------------------------ data and sizes
    @property
    def data(self) -> PreparedData:
        """The prepared data (built or read from the cache on first use)."""
        if self._data is None:
            self._data = prepare_data(self.config)
        return self._data

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
        """Build the cache once (rank 0) before every rank reads it in :meth:`setup`."""
        if self.config.cache_dir is not None:
            prepare_data(self.config)

    def setup(self, stage: str | None = None) -> None:
        """Load the data (every rank) and build the training windows."""
        if stage == "fit" and len(self.data.valid) == 0:
            raise DataError(_no_validation_message(self.data.params))
        if stage in (None, "fit") and self._train is None:
            windows = build_windows(
                self.data.train, self.window, self.window_stride, self.play_signals, self.play_clock
            )
            self._train = WindowDataset(windows)

    # ------------------------------------------------------------------ loaders
    def _loader(
        self,
        ds: Dataset,
        batch_size: int,
        shuffle: bool,
        sampler: Sampler | None = None,
        cls: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        return cls(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            collate_fn=_batch_as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training windows (order seeded by ``seed_everything`` and the epoch).

        On one device an :class:`EpochShuffleSampler`; under DDP Lightning's
        ``DistributedSampler`` (also seeded by epoch) replaces a plain shuffle.
        """
        self.setup("fit")
        assert self._train is not None
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return self._loader(self._train, self.batch_size, shuffle=True)
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.config.seed))
        sampler = EpochShuffleSampler(
            len(self._train),
            seed,
            self._epoch if trainer else None,
            lengths=self._train.lengths,
            batch_size=self.batch_size,
        )
        loader = self._loader(
            self._train, self.batch_size, False, sampler=sampler, cls=ResumableDataLoader
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
        return self._loader(self.eval_dataset("valid"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test queries in order."""
        return self._loader(self.eval_dataset("test"), self.eval_batch_size, shuffle=False)
