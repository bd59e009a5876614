"""The logging extras as Callbacks: same training, old checkpoints load, the clock survives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twotower.model.callbacks import (
    EmbeddingHistograms,
    EmbeddingProjector,
    HparamsMetrics,
    Throughput,
    TrainTimer,
    default_callbacks,
)
from twotower.model.module import TwoTowerModule
from twotower.train import fit, trainer_defaults

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _one_epoch(root: Path, name: str, callbacks=()) -> tuple:
    return fit(
        [TINY],
        {
            "trainer.max_epochs": 1,
            "trainer.default_root_dir": str(root / name),
            "trainer.logger.init_args.save_dir": str(root / name / "runs"),
            "data.cache_dir": str(root / "cache"),
        },
        callbacks=callbacks,
    )


def test_the_training_entry_registers_the_default_callbacks():
    kinds = {type(c) for c in trainer_defaults()["callbacks"]}
    expected = {TrainTimer, Throughput, EmbeddingHistograms, HparamsMetrics, EmbeddingProjector}
    assert kinds == expected
    a, b = default_callbacks(), default_callbacks()
    assert not {id(c) for c in a} & {id(c) for c in b}  # fresh state for every run


class _Losses(TrainTimer):
    """Records every step's loss (a TrainTimer, so the module's clock still runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_callbacks_do_not_change_training(tmp_path):
    """Same seed, with and without the extras: identical losses, weights and metrics."""
    with_all = _Losses()
    t1, m1, _ = _one_epoch(tmp_path, "all", [with_all, *default_callbacks()[1:]])
    bare = _Losses()
    t2, m2, _ = _one_epoch(tmp_path, "bare", [bare])
    assert with_all.losses and with_all.losses == bare.losses
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=0)
    val = {k: float(v) for k, v in t1.callback_metrics.items() if k.startswith("val/")}
    assert val == {k: float(v) for k, v in t2.callback_metrics.items() if k.startswith("val/")}
    # the clock: on the module at the end, and in every checkpoint
    assert m1.train_seconds > 0 and m2.train_seconds > 0
    ckpt = torch.load(t1.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    assert 0 < ckpt["train_seconds"] <= m1.train_seconds
    assert "callbacks" in ckpt and not any("Throughput" in k for k in ckpt["callbacks"])
    rate = next(c for c in t1.callbacks if isinstance(c, Throughput)).examples_per_s
    assert rate > 0 and float(t1.callback_metrics["train/examples_per_s"]) == pytest.approx(rate)
    assert "train/examples_per_s" not in t2.callback_metrics


def _old_style_checkpoint(path: Path, **hparams) -> Path:
    """A checkpoint as the module wrote it before the callbacks (``projector_items`` and
    ``train_seconds`` written by the module itself)."""
    module = TwoTowerModule(num_items=12, dim=8, id_dim=8, encoder="mean", **hparams)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6.6",
            "twotower": {"item_vocab": [f"t{i}" for i in range(10)], "filter_seen": False},
            "train_seconds": 12.5,
        },
        path,
    )
    return path


def test_old_checkpoints_with_projector_items_still_load(tmp_path):
    path = _old_style_checkpoint(tmp_path / "old.ckpt", projector_items=500)
    assert "projector_items" in torch.load(path, weights_only=True)["hyper_parameters"]
    loaded = TwoTowerModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert loaded.hparams.projector_items == 500
    assert loaded.train_seconds == 12.5
    assert loaded.data_info["item_vocab"][0] == "t0"
    # the projector callback reads the module's key unless it is given its own count
    assert EmbeddingProjector()._count(loaded) == 500
    assert EmbeddingProjector(7)._count(loaded) == 7


def test_module_keeps_its_clock_without_the_timer():
    module = TwoTowerModule(num_items=12, dim=8, id_dim=8, encoder="mean")
    module.train_seconds = 3.0
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["train_seconds"] == 3.0
    ckpt = {"train_seconds": 5.0}  # the TrainTimer (a callback) runs first and wins
    module.on_save_checkpoint(ckpt)
    assert ckpt["train_seconds"] == 5.0


def test_timer_continues_from_the_restored_time():
    class M:
        train_seconds = 100.0

    timer, module = TrainTimer(), M()
    timer.on_fit_start(None, module)  # type: ignore[arg-type]
    assert 100.0 <= timer.elapsed() < 101.0
    ckpt: dict = {}
    timer.on_save_checkpoint(None, module, ckpt)  # type: ignore[arg-type]
    assert 100.0 <= ckpt["train_seconds"] < 101.0
    timer.on_fit_end(None, module)  # type: ignore[arg-type]
    assert module.train_seconds >= ckpt["train_seconds"]
