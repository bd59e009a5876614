"""TensorBoard records read back from the event files: hparams with finite metrics, histograms.

One tiny training through the training entry (``twotower.train.fit``) and the shared tiny
pipeline run (:func:`test_pipeline_run.tiny_run`, trained once per session).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from test_pipeline_run import TINY, tiny_run

from twotower.model.callbacks import HP_METRICS, HP_TEST_METRICS
from twotower.train import fit

HISTOGRAMS = ("embeddings/query_norm", "embeddings/item_norm", "embeddings/item_id_norm")


def _events(log_dir: str | Path) -> EventAccumulator:
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def _declared_metrics(ea: EventAccumulator) -> list[str]:
    content = ea.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    return [m.name.tag for m in data.experiment.metric_infos]


def _hparams(ea: EventAccumulator) -> dict[str, object]:
    content = ea.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    out: dict[str, object] = {}
    for k, v in data.session_start_info.hparams.items():
        kind = v.WhichOneof("kind")
        out[k] = getattr(v, kind) if kind else None
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    trainer, module, _ = fit(
        [TINY],
        {
            "trainer.max_epochs": 2,
            "trainer.default_root_dir": str(root),
            "trainer.logger.init_args.save_dir": str(root / "runs"),
            "data.cache_dir": str(root / "cache"),
        },
    )
    return trainer, module, _events(trainer.log_dir)


def test_hparams_metrics_are_the_final_validation_figures(trained):
    trainer, module, ea = trained
    assert set(HP_METRICS) <= set(_declared_metrics(ea))
    hp = _hparams(ea)
    assert hp["dim"] == 32 and hp["encoder"] == "transformer" and hp["projector_items"] == 50
    scalars = set(ea.Tags()["scalars"])
    for tag, val in HP_METRICS.items():
        assert tag in scalars, tag
        values = [e.value for e in ea.Scalars(tag)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (tag, values)
        assert values[-1] == pytest.approx(float(trainer.callback_metrics[val]))
        assert 0 < values[-1] <= 1


def test_vector_norm_histograms_and_logit_scale_each_epoch(trained):
    trainer, module, ea = trained
    tags = set(ea.Tags()["histograms"])
    for tag in HISTOGRAMS:
        assert tag in tags, tag
        events = ea.Histograms(tag)
        assert len(events) == 2, (tag, len(events))  # one per validation epoch, no sanity check
        assert events[-1].histogram_value.num > 0
    queries = ea.Histograms("embeddings/query_norm")[-1].histogram_value
    assert queries.num == 300  # one vector per validation listener
    assert queries.min == pytest.approx(1.0, abs=1e-4)  # L2-normalised (no item bias)
    assert queries.max == pytest.approx(1.0, abs=1e-4)
    items = ea.Histograms("embeddings/item_norm")[-1].histogram_value
    assert items.num == module.hparams.num_items
    scale = [e.value for e in ea.Scalars("train/logit_scale")]
    assert len(scale) == 2
    assert scale[-1] == pytest.approx(1.0 / module.hparams.temperature, rel=1e-5)


@pytest.mark.slow
def test_pipeline_fills_test_figures_into_the_hparams_view(tmp_path_factory):
    run = tiny_run(tmp_path_factory)
    ea = _events(run / "tensorboard")
    declared = _declared_metrics(ea)
    assert set(HP_METRICS) | set(HP_TEST_METRICS) <= set(declared)
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    model = next(r for r in rows if r["name"] == "two-tower")["metrics"]
    for tag, key in HP_TEST_METRICS.items():
        values = [e.value for e in ea.Scalars(tag)]
        assert len(values) == 1 and math.isfinite(values[0])
        assert values[0] == pytest.approx(model[key]["mean"], rel=1e-6)
    for tag in HP_METRICS:
        assert all(math.isfinite(e.value) for e in ea.Scalars(tag))
    assert set(HISTOGRAMS) <= set(ea.Tags()["histograms"])
