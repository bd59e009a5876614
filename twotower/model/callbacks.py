"""Lightning callbacks: the training clock, throughput and the TensorBoard extras.

:class:`~twotower.model.module.TwoTowerModule` holds the model, the loss and the metrics; what
only observes a run lives here, in Callbacks, registered by default by the training entry
(:func:`default_callbacks`, used by :func:`twotower.train.trainer_defaults`):

* :class:`TrainTimer`: wall time of fitting, accumulated across resumes, stored in every
  checkpoint (``train_seconds``) and set on the module (``module.train_seconds``) at the end;
* :class:`Throughput`: training examples (predicted positions) per second of each epoch,
  logged as ``train/examples_per_s``;
* :class:`EmbeddingHistograms`: every validation epoch, histograms of the norms of the
  validation query vectors, of the item vectors of the whole catalogue, of the item-id (and
  user) embedding rows; every training epoch the logit scale ``1 / temperature``
  (``train/logit_scale``);
* :class:`HparamsMetrics`: the hyper-parameters with ``hp/ndcg@10`` and ``hp/recall@10`` for
  TensorBoard's HPARAMS view, filled with each validation's figures (no NaN placeholder), and
  optionally further metrics that are written later (the pipeline's test figures, see
  :func:`write_hp_metrics`);
* :class:`EmbeddingProjector`: the most popular tracks in TensorBoard's projector, labelled
  "title — artist", at the end of fitting.

None of them draws random numbers or changes the module's state, so a run with these
callbacks trains exactly as one without them (same seed, same losses).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

#: Hparams-view metrics and the validation metric each one mirrors.
HP_METRICS: dict[str, str] = {"hp/ndcg@10": "val/ndcg@10", "hp/recall@10": "val/recall@10"}
#: Hparams-view metrics of the test split, written by ``twotower pipeline`` after evaluation.
HP_TEST_METRICS: dict[str, str] = {"hp/test_ndcg@10": "ndcg@10", "hp/test_recall@10": "recall@10"}


def tensorboard_writer(trainer: pl.Trainer | None) -> Any:
    """The ``SummaryWriter`` of the trainer's TensorBoard logger (None without one)."""
    from torch.utils.tensorboard import SummaryWriter

    if trainer is None:
        return None
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if isinstance(exp, SummaryWriter):
            return exp
    return None


class TrainTimer(Callback):
    """Wall time of fitting, continued across resumes.

    At the start of fitting the clock starts from ``module.train_seconds`` (restored from the
    checkpoint when resuming); every checkpoint stores the time so far as ``train_seconds`` (a
    plain float, read by ``evaluate`` and the export manifest), and at the end of fitting
    ``module.train_seconds`` holds the total.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._base = 0.0

    def elapsed(self) -> float:
        """Seconds of fitting so far (all runs of a resumed training)."""
        if self._start is None:
            return self._base
        return self._base + time.perf_counter() - self._start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock from the module's (restored) training time."""
        self._base = float(getattr(pl_module, "train_seconds", 0.0) or 0.0)
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop the clock; the total goes to ``module.train_seconds``."""
        self._base = self.elapsed()
        self._start = None
        pl_module.train_seconds = self._base

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store the training time so far in the checkpoint (``train_seconds``)."""
        checkpoint["train_seconds"] = float(self.elapsed())


class Throughput(Callback):
    """Training examples per second of each epoch, logged as ``train/examples_per_s``.

    Examples are the predicted positions of a step, which ``training_step`` leaves in
    ``module._examples``; the time runs from the start of the epoch to the end of its last
    training batch (data loading included, validation excluded), and the rate is summed over
    DDP ranks.

    Attributes:
        examples_per_s: The last epoch's rate (NaN before the first epoch ends).
    """

    def __init__(self) -> None:
        self.examples_per_s = float("nan")
        self._epoch_start = 0.0
        self._examples = 0
        self._last_batch_end: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self._examples = 0
        self._epoch_start = time.perf_counter()
        self._last_batch_end = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Count the step's examples."""
        self._examples += int(getattr(pl_module, "_examples", 0))
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log examples/s over the epoch's training batches."""
        if self._last_batch_end is None:
            return
        seconds = max(self._last_batch_end - self._epoch_start, 1e-9)
        self.examples_per_s = self._examples * trainer.world_size / seconds
        pl_module.log("train/examples_per_s", self.examples_per_s)


class EmbeddingHistograms(Callback):
    """Vector-norm histograms every validation epoch and the logit scale every training epoch.

    Histograms (TensorBoard, rank 0, not during the sanity check), at the global step:

    * ``embeddings/query_norm``: the validation query vectors (what the query tower returned
      during validation, caught by a forward hook, so it does not depend on the batch layout);
    * ``embeddings/item_norm``: the item vectors of the catalogue scored by validation;
    * ``embeddings/item_id_norm`` and ``embeddings/user_norm``: rows of the item-id and user
      embedding tables (pad and OOV rows left out).

    With ``model.item_bias`` the vectors hold the bias as their last coordinate, so their norms
    spread; without it they are 1 (L2-normalised) and the histograms show that they stay so.
    The scalar ``train/logit_scale`` (``1 / temperature``, the factor on every dot product in
    the softmax) is logged through Lightning at the end of every training epoch.
    """

    def __init__(self) -> None:
        self._hooks: list[Any] = []
        self._norms: dict[str, list[Tensor]] = {}

    def _capture(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.ndim >= 2:
                norms = output.detach().float().norm(dim=-1).reshape(-1).cpu()
                self._norms.setdefault(name, []).append(norms)

        return hook

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``train/logit_scale`` (1 / temperature)."""
        loss_fn = getattr(pl_module, "loss_fn", None)
        if loss_fn is None:
            return
        temperature = loss_fn.temperature.detach().float()
        pl_module.log("train/logit_scale", 1.0 / temperature)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the towers to collect the norms of the vectors validation computes."""
        self._remove_hooks()
        self._norms = {}
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if tensorboard_writer(trainer) is None:
            return
        for name, attr in (("query_norm", "query_tower"), ("item_norm", "item_tower")):
            tower = getattr(pl_module, attr, None)
            if isinstance(tower, torch.nn.Module):
                self._hooks.append(tower.register_forward_hook(self._capture(name)))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the histograms of this validation epoch."""
        hooked = bool(self._hooks)
        self._remove_hooks()
        tb = tensorboard_writer(trainer)
        if not hooked or tb is None:
            return
        step = trainer.global_step
        for name, parts in self._norms.items():
            tb.add_histogram(f"embeddings/{name}", torch.cat(parts), step)
        self._norms = {}
        tower = getattr(pl_module, "query_tower", None)
        tables = (
            ("item_id_norm", getattr(tower, "item_embedding", None)),
            ("user_norm", getattr(tower, "user_embedding", None)),
        )
        for name, table in tables:
            if table is not None:
                rows = table.weight.detach()[2:].float()
                tb.add_histogram(f"embeddings/{name}", rows.norm(dim=1).cpu(), step)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Leave no hook behind."""
        self._remove_hooks()


def _hparam_value(value: Any) -> bool | int | float | str:
    """A value TensorBoard's hparams summary accepts (others become their text)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def hparams_summaries(hparams: Mapping[str, Any], metric_names: Sequence[str]) -> list[Any]:
    """TensorBoard's three hparams summaries (experiment, session start, session end).

    Only the metric *names* go in; their values are the last scalars with those tags in the
    same log folder, so nothing is written as a placeholder.
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    params = {str(k): _hparam_value(v) for k, v in hparams.items()}
    exp, ssi, sei = hparams_summary(params, {name: 0.0 for name in metric_names})
    return [exp, ssi, sei]


class HparamsMetrics(Callback):
    """Hyper-parameters and their metrics for TensorBoard's HPARAMS view.

    At the start of fitting (rank 0, TensorBoard logger only) the module's hyper-parameters are
    written with the metric names :data:`HP_METRICS` plus ``extra_metrics``; after every
    validation (not the sanity check) ``hp/ndcg@10`` and ``hp/recall@10`` are logged with that
    validation's ``val/ndcg@10`` and ``val/recall@10``, so the view shows the run's final
    validation figures. ``extra_metrics`` (e.g. :data:`HP_TEST_METRICS`) are filled later by
    :func:`write_hp_metrics`. TensorBoard keeps the first hparams summary of a log folder, so
    every metric the view should show must be named here.

    Args:
        extra_metrics: Further metric names to declare.
    """

    def __init__(self, extra_metrics: Sequence[str] = ()) -> None:
        self.extra_metrics = tuple(extra_metrics)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the hparams summary (metric names only)."""
        tb = tensorboard_writer(trainer)
        if tb is None or not trainer.is_global_zero:
            return
        names = list(HP_METRICS) + [m for m in self.extra_metrics if m not in HP_METRICS]
        writer = tb._get_file_writer()
        for summary in hparams_summaries(dict(pl_module.hparams), names):
            writer.add_summary(summary)
        tb.flush()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``hp/*`` with this validation's figures."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {}
        for hp, val in HP_METRICS.items():
            value = trainer.callback_metrics.get(val)
            if value is not None and math.isfinite(float(value)):
                metrics[hp] = float(value)
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def write_hp_metrics(log_dir: str | Path, metrics: Mapping[str, float], step: int) -> None:
    """Add scalars to a TensorBoard log folder (e.g. the test figures after evaluation).

    Args:
        log_dir: The folder the training's TensorBoard logger wrote (a new event file is added).
        metrics: Tag -> value; non-finite values are left out.
        step: Global step of the scalars (the training's last step).
    """
    from torch.utils.tensorboard import SummaryWriter

    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    if not finite:
        return
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, value in finite.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


class EmbeddingProjector(Callback):
    """The most popular tracks in TensorBoard's projector, written at the end of fitting.

    Labels are "title — artist" (the track id when there is no title). Needs an in-memory
    datamodule (``datamodule.data`` with ``item_counts``, ``tracks`` and ``num_items``); a
    streamed one is skipped.

    Args:
        items: Number of tracks; None reads the module's ``projector_items`` hyper-parameter
            (the config key ``model.projector_items``); 0 = off.
    """

    def __init__(self, items: int | None = None) -> None:
        self.items = items

    def _count(self, pl_module: pl.LightningModule) -> int:
        if self.items is not None:
            return int(self.items)
        return int(getattr(pl_module, "hparams", {}).get("projector_items", 0) or 0)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the projector (rank 0)."""
        tb = tensorboard_writer(trainer)
        n = self._count(pl_module)
        data = getattr(getattr(trainer, "datamodule", None), "data", None)
        if tb is None or n <= 0 or not trainer.is_global_zero:
            return
        tracks = getattr(data, "tracks", None)
        if data is None or tracks is None or getattr(data, "item_counts", None) is None:
            return
        counts = np.asarray(data.item_counts).copy()
        counts[:2] = -1
        top = np.argsort(-counts, kind="stable")[: min(n, data.num_items - 2)]
        pl_module.eval()
        with torch.no_grad():
            ids = torch.as_tensor(top, device=pl_module.device)
            emb = pl_module.item_tower(ids).detach().float().cpu()
        labels = []
        for i in top:
            row = tracks.iloc[int(i)] if int(i) < len(tracks) else None
            title = _text(row, "title") or _text(row, "track_id") or f"item {int(i)}"
            artist = _text(row, "artist")
            labels.append(f"{title} — {artist}" if artist else title)
        tb.add_embedding(emb, metadata=labels, tag="items", global_step=trainer.global_step)
        tb.flush()


def _text(row: Any, col: str) -> str:
    if row is None or col not in row.index:
        return ""
    value = row[col]
    return "" if pd.isna(value) else str(value)


def default_callbacks(
    projector_items: int | None = None, extra_hp_metrics: Sequence[str] = ()
) -> list[Callback]:
    """The callbacks every training run gets (train.py's trainer defaults).

    Args:
        projector_items: Tracks in the projector; None = the module's ``projector_items``.
        extra_hp_metrics: Further metric names for the HPARAMS view (``twotower pipeline``
            passes :data:`HP_TEST_METRICS` and writes them after evaluation).

    Returns:
        New instances (callbacks hold per-run state): :class:`TrainTimer`,
        :class:`Throughput`, :class:`EmbeddingHistograms`, :class:`HparamsMetrics`,
        :class:`EmbeddingProjector`.
    """
    return [
        TrainTimer(),
        Throughput(),
        EmbeddingHistograms(),
        HparamsMetrics(extra_hp_metrics),
        EmbeddingProjector(projector_items),
    ]
