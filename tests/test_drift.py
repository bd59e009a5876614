"""Data drift: hand-computed statistics, then a shifted and an unshifted synthetic batch."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_pipeline_run import runs_dir, tiny_run

from twotower.cli import main
from twotower.data.pipeline import DataConfig
from twotower.drift import (
    EXIT_DRIFT,
    DriftThresholds,
    check_thresholds,
    drift_report,
    js_divergence,
    ks_statistic,
    session_histogram,
    spearman,
    top_n,
)

UNSHIFTED = {"preset": "tiny", "n_users": 400, "start_date": "2023-03-01"}
SHIFTED_CHECKS = {
    "new_track_share",
    "popularity_spearman",
    "top100_turnover",
    "session_length_jsd",
    "hour_jsd",
    "metric_drop",
}


# ------------------------------------------------------------------------------ statistics
def test_js_divergence_by_hand():
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([3, 1], [6, 2]) == pytest.approx(0.0)
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4)
    expected = 0.5 * (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25)) + 0.5 * np.log2(
        1 / 0.75
    )
    assert js_divergence([1, 1], [1, 0]) == pytest.approx(expected)
    assert np.isnan(js_divergence([0, 0], [1, 0]))


def test_ks_spearman_top_n_and_bins():
    assert ks_statistic([1, 2, 3], [3, 2, 1]) == 0.0
    assert ks_statistic([1, 1], [2, 2]) == 1.0
    assert ks_statistic([1, 2], [2, 3]) == pytest.approx(0.5)
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.array([1, 2]), np.array([1, 2])))
    counts = pd.Series([5, 9, 9, 0, 1], index=["e", "b", "a", "z", "c"])
    assert top_n(counts, 2) == {"a", "b"} and top_n(counts, 10) == {"a", "b", "c", "e"}
    # bins 1, 2, 3, 4, 5-6, 7-8, 9-12, ...: lengths 5 and 6 share a bin, 7 starts the next
    h = session_histogram(np.array([1, 1, 5, 6, 7, 1000]))
    assert h[:6].tolist() == [2, 0, 0, 0, 2, 1] and h[-1] == 1 and h.sum() == 6


def test_thresholds_cross_in_the_right_direction():
    t = DriftThresholds(max_new_track_share=0.2, min_popularity_spearman=0.5, max_hour_jsd=None)
    values = {
        "new_track_share": 0.25,
        "popularity_spearman": 0.6,
        "hour_jsd": 0.9,  # check switched off
        "user_overlap": None,
    }
    assert check_thresholds(values, t) == ["new_track_share"]
    assert check_thresholds({"popularity_spearman": 0.4}, t) == ["popularity_spearman"]


# ------------------------------------------------------------------------------ batches
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def shifted_batch(tmp_path_factory):
    """Another seed (other popular tracks), short sessions, 30% plays of new tracks, evenings."""
    from twotower.data.synthetic import load

    res = load(None, preset="tiny", seed=1, session_length=4.0, start_date="2023-03-01")
    df = res.interactions
    rng = np.random.default_rng(0)
    ids = df["track_id"].astype(object).to_numpy().copy()
    new = rng.random(len(df)) < 0.3
    ids[new] = [f"new-{i}" for i in rng.integers(0, 200, int(new.sum()))]
    hours = 18 + df["hour"].to_numpy().astype(int) % 6  # the batch comes from the evening
    path = runs_dir(tmp_path_factory) / "shifted.parquet"
    pd.DataFrame(
        {
            "user_id": df["user_id"],
            "track_id": pd.Series(ids, dtype="string"),
            "timestamp": df["timestamp"],
            "skipped": df["skipped"],
            "hour": pd.Series(hours, dtype="Int64"),
            "context_type": df["context_type"],
        }
    ).to_parquet(path)
    return path, float(new.mean())


@pytest.mark.slow
def test_reference_against_itself_shows_no_drift_and_the_evaluated_metric(reference):
    metrics = json.loads((reference / "metrics.json").read_text())
    rep = drift_report(reference, DataConfig(format="synthetic", options={"preset": "tiny"}))
    v = rep.values
    assert v["new_track_share"] == 0.0 and v["user_overlap"] == 1.0
    assert v["popularity_spearman"] == pytest.approx(1.0) and v["top100_turnover"] == 0.0
    assert v["session_length_jsd"] == 0.0 and v["hour_jsd"] == 0.0 and v["metric_drop"] == 0.0
    assert not rep.alert
    # the last event of each listener is the test target: same Recall@10 as `evaluate`
    model = next(r for r in metrics["rows"] if r["kind"] == "model")["metrics"]
    assert rep.details["metric"]["reference_recall"] == pytest.approx(
        model["recall@10"]["mean"], abs=1e-12
    )


@pytest.mark.slow
def test_unshifted_batch_crosses_no_threshold(reference, tmp_path, capsys):
    cfg = tmp_path / "new.yaml"
    cfg.write_text(
        "data:\n  format: synthetic\n  options:\n"
        + "".join(f"    {k}: {v}\n" for k, v in UNSHIFTED.items())
    )
    out = tmp_path / "drift.json"
    rc = main(["drift", "--reference", str(reference), "--data", str(cfg), "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["alert"] is False and doc["crossed"] == []
    v = doc["values"]
    assert v["new_track_share"] == 0.0 and v["user_overlap"] == pytest.approx(0.75)
    assert v["popularity_spearman"] > 0.7 and v["top100_turnover"] < 0.3
    assert v["session_length_jsd"] < 0.01 and v["hour_jsd"] < 0.02
    assert abs(v["metric_drop"]) < 0.3
    assert "No threshold crossed." in capsys.readouterr().out


@pytest.mark.slow
def test_shifted_batch_crosses_thresholds_and_alerts(reference, shifted_batch, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, new_share = shifted_batch
    log_dir = tmp_path / "tb"
    md = tmp_path / "drift.md"
    rc = main(
        ["drift", "--reference", str(reference), "--data", str(path), "--format", "parquet",
         "--log-dir", str(log_dir), "--step", "7", "--md", str(md)]
    )  # fmt: skip
    assert rc == EXIT_DRIFT
    text = capsys.readouterr().out
    assert "**Drift alert**" in text and md.read_text() in text
    rep = drift_report(reference, str(path), fmt="parquet")
    assert set(rep.crossed) == SHIFTED_CHECKS
    assert rep.values["new_track_share"] == pytest.approx(new_share, abs=1e-9)
    assert rep.values["user_overlap"] == 1.0  # same listener ids, different behaviour
    assert rep.details["metric"]["new_missing_targets"] > 0
    # TensorBoard got the numbers as scalars at the given step
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    events = acc.Scalars("drift/new_track_share")
    assert [e.step for e in events] == [7]
    assert events[0].value == pytest.approx(rep.values["new_track_share"], rel=1e-6)
    assert acc.Scalars("drift/alert")[0].value == 1.0
    # switching every crossed check off makes the same batch pass
    off = [f"--{n}" for n in ("max-new-track-share", "min-popularity-spearman",
                              "max-top100-turnover", "max-session-length-jsd", "max-hour-jsd",
                              "max-metric-drop")]  # fmt: skip
    args = ["drift", "--reference", str(reference), "--data", str(path), "--format", "parquet"]
    assert main(args + [x for n in off for x in (n, "off")]) == 0


def test_missing_reference_is_a_clear_error(tmp_path, capsys):
    rc = main(["drift", "--reference", str(tmp_path), "--format", "synthetic"])
    assert rc == 2
    assert "not a pipeline run folder" in capsys.readouterr().err
