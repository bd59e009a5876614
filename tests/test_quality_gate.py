"""CI quality gate: a short MovieLens-100K training must beat session co-occurrence.

Trains ``configs/movielens-100k.yaml`` with a capped number of epochs (a few minutes on a
2-core CPU), reloads the best checkpoint (validation NDCG@10) and compares it on the test split,
full catalogue, seen items filtered, with the co-occurrence baseline at the parameters that
``bench/quality.py`` tunes on validation (fixed here, so the gate is cheap and deterministic).
"""

from __future__ import annotations

import os
import sys

import pytest

from twotower.baselines import ItemCooccurrence
from twotower.evaluate import EmbeddingScorer, evaluate_scorers
from twotower.model.module import TwoTowerModule
from twotower.train import fit

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "movielens-100k.yaml")
# Tuned on the validation split by bench/quality.py (fit_baselines); fixed here.
COOCCURRENCE = {"n_last": 20, "decay": 0.8, "mix": 0.0, "window": 5}
MAX_EPOCHS = 15  # the full run (early stopping) peaks on validation at epoch 14


def test_short_ml100k_training_beats_cooccurrence(shared_data, tmp_path, monkeypatch):
    data_path = shared_data / "ml-100k"
    if not data_path.is_dir():
        pytest.skip(f"MovieLens-100K not found at {data_path}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    trainer, module, dm = fit(
        [CONFIG],
        {
            "data.path": str(data_path),
            "data.cache_dir": str(tmp_path / "cache"),
            "trainer.max_epochs": MAX_EPOCHS,
            "trainer.logger": False,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "checkpoint.dirpath": str(tmp_path / "ckpt"),
            "model.projector_items": 0,
        },
    )
    best = trainer.checkpoint_callback.best_model_path
    module = TwoTowerModule.load_from_checkpoint(best, map_location="cpu", weights_only=True)
    data = dm.data
    assert data.params["filter_seen"]
    cooc = ItemCooccurrence(**COOCCURRENCE).fit(data)
    table = evaluate_scorers(
        [(EmbeddingScorer(module, name="two-tower", device="cpu"), "model"), (cooc, "baseline")],
        data,
        "test",
        (10,),
        True,
        bootstrap=200,
    )
    ours = table.row("two-tower").metrics["ndcg@10"][0]
    base = table.row("cooccurrence").metrics["ndcg@10"][0]
    assert ours > base, f"two-tower NDCG@10 {ours:.4f} <= co-occurrence {base:.4f}: {table.paired}"
