"""Where a training run writes, and one summary line when it ends.

:class:`RunSummary` is added to every trainer of :class:`~twotower.train.TwoTowerCLI`. At the
start of ``fit`` it prints where the checkpoints and the TensorBoard logs go; at the end one
line with the best validation metric (name, value, epoch), the checkpoint that holds it and the
``tensorboard --logdir ...`` command that shows the run.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from twotower.model.module import MONITOR


def _checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    cb = getattr(trainer, "checkpoint_callback", None)
    return cb if isinstance(cb, ModelCheckpoint) else None


def checkpoint_dir(trainer: pl.Trainer) -> Path | None:
    """The folder the run's checkpoints go to (None without checkpointing)."""
    cb = _checkpoint_callback(trainer)
    if cb is None:
        return None
    if cb.dirpath:
        return Path(cb.dirpath)
    # ModelCheckpoint resolves its folder in setup; before that, Lightning's rule:
    return Path(_logger_dir(trainer) or trainer.default_root_dir) / "checkpoints"


def _logger_dir(trainer: pl.Trainer) -> str | None:
    """The first logger's folder, as ``Trainer.log_dir`` finds it, without its broadcast.

    ``Trainer.log_dir`` is a collective under DDP (every rank must call it); this callback
    prints on rank 0 only, where a collective would wait for the other ranks forever.
    """
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    folder = getattr(logger, "log_dir", None) or logger.save_dir
    return str(folder) if folder else None


def log_dir(trainer: pl.Trainer) -> Path | None:
    """The TensorBoard (or other logger's) folder of this run (None without a logger)."""
    folder = _logger_dir(trainer)
    return Path(folder) if folder else None


def tensorboard_command(folder: str | Path) -> str:
    """``tensorboard --logdir FOLDER`` with the folder quoted for a shell."""
    return f"tensorboard --logdir {shlex.quote(str(folder))}"


class RunSummary(pl.Callback):
    """Print where a run writes when it starts, and its best validation result when it ends.

    Args:
        monitor: The validation metric to report (default: the checkpoint callback's, else
            :data:`~twotower.model.module.MONITOR`).
        mode: ``max`` or ``min`` (default: the checkpoint callback's, else ``max``).
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None) -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.lines: list[str] = []

    def _resolve(self, trainer: pl.Trainer) -> tuple[str, str]:
        cb = _checkpoint_callback(trainer)
        monitor = self.monitor or (cb.monitor if cb is not None and cb.monitor else MONITOR)
        mode = self.mode or (cb.mode if cb is not None else "max")
        return monitor, mode

    def _say(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the device, the checkpoint folder and the log folder."""
        self.best = self.best_epoch = None
        ckpt, logs = checkpoint_dir(trainer), log_dir(trainer)
        device = f"{trainer.strategy.root_device.type} x{trainer.num_devices}"
        parts = [f"training on {device} ({trainer.precision})"]
        parts.append(f"checkpoints -> {ckpt}" if ckpt else "no checkpoints")
        parts.append(f"logs -> {logs}" if logs else "no logger")
        self._say("; ".join(parts))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the best value of the monitored metric and its epoch.

        ``on_validation_end``, as ModelCheckpoint: the module logs the metric in its own
        ``on_validation_epoch_end``, which runs after the callbacks' hook of that name.
        """
        if trainer.sanity_checking:
            return
        monitor, mode = self._resolve(trainer)
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            return
        v = float(value)
        if math.isnan(v):
            return
        better = self.best is None or (v > self.best if mode == "max" else v < self.best)
        if better:
            self.best, self.best_epoch = v, int(trainer.current_epoch)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the one summary line."""
        self._say(self.summary(trainer))

    def summary(self, trainer: pl.Trainer) -> str:
        """``best val/ndcg@10 0.1234 at epoch 3; checkpoint ...; tensorboard --logdir ...``."""
        monitor, _ = self._resolve(trainer)
        cb = _checkpoint_callback(trainer)
        best_path = (cb.best_model_path or cb.last_model_path) if cb is not None else ""
        parts = []
        if self.best is not None:
            parts.append(f"best {monitor} {self.best:.4f} at epoch {self.best_epoch}")
        else:
            parts.append(f"no {monitor} (no validation ran)")
        parts.append(f"checkpoint {best_path}" if best_path else "no checkpoint saved")
        logs = log_dir(trainer)
        if logs is not None:
            parts.append(tensorboard_command(logs))
        return "training done: " + "; ".join(parts)


def summary_of(trainer: pl.Trainer) -> Any:
    """The :class:`RunSummary` callback of ``trainer`` (None when it has none)."""
    return next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
