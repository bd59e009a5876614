"""``configs/lastfm-1k.yaml`` as shipped, on realistic Last.fm-1K files of 1 and 20 listeners.

The reviewer's file is either one listener's plays or the full 992-listener log; the config must
work on both without edits (only ``--data.path``, a temporary cache, and speed overrides for
training). The files come from the synthetic ``scrobble`` preset in the exact Last.fm-1K layout
(:func:`fixtures.write_lastfm1k_log`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from fixtures import write_lastfm1k_log

from twotower.cli import main
from twotower.data.report import MIN_EVAL_QUERIES

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "lastfm-1k.yaml")
# one listener: ~4.4k rows over 6 months; 20 listeners: ~14k rows (the preset's activity)
LISTENERS = {1: 250.0, 20: 60.0}


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[int, Path]:
    """Listener count -> plays TSV; all share one data cache (``root / cache``)."""
    root = tmp_path_factory.mktemp("lastfm-logs")
    return {
        n: write_lastfm1k_log(root / f"n{n}", n, sessions_per_user=spu)
        for n, spu in LISTENERS.items()
    }


def _data_keys(path: Path) -> list[str]:
    return ["--config", CONFIG, "--data.path", str(path),
            "--data.cache_dir", str(path.parents[2] / "cache")]  # fmt: skip


def test_write_lastfm1k_log_layout(logs):
    """Newest first per listener, ISO Z times, user_NNNNNN ids, some rows without track MBID."""
    for n, f in logs.items():
        cols = ["user", "ts", "artist_mbid", "artist", "track_mbid", "title"]
        df = pd.read_csv(f, sep="\t", header=None, names=cols, quoting=3, dtype=str)
        assert 2_000 < len(df) < 30_000
        assert df["user"].str.fullmatch(r"user_\d{6}").all() and df["user"].nunique() == n
        assert df["ts"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").all()
        assert df["user"].is_monotonic_increasing
        for _, g in df.groupby("user"):
            assert g["ts"].is_monotonic_decreasing  # ISO strings sort as times
        assert 0 < df["track_mbid"].isna().sum() < 0.1 * len(df)
        assert df["artist_mbid"].notna().all() and df["title"].notna().all()


@pytest.mark.parametrize("n", sorted(LISTENERS))
def test_data_report_next_in_session(n, logs, tmp_path, capsys):
    """The report names the protocol, the resolved dates, non-zero cases, and warns below 100."""
    out_json = tmp_path / "report.json"
    assert main(["data-report", *_data_keys(logs[n]), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out_json.read_text())
    assert "  protocol        next_in_session: one case per validation (test) session" in text
    pr = rep["protocol"]
    val, test = pr["val_cutoff"], pr["test_cutoff"]
    assert f"cut-offs        validation from {val}, test from {test}" in text
    assert "quantiles 0.8 / 0.9" in text
    assert "2009-01-01" < val < test < "2009-07-03"  # inside the log's half year
    assert rep["users"] >= (1 if n == 1 else n // 2)
    valid, tst = rep["split"]["valid"], rep["split"]["test"]
    assert valid > 0 and tst > 0
    for part, k in (("validation", valid), ("test", tst)):
        warned = f"WARNING: only {k:,} {part} queries (fewer than {MIN_EVAL_QUERIES})" in text
        assert warned == (k < MIN_EVAL_QUERIES)
    if n == 1:  # one listener's half year: dozens of sessions per period, never 100
        assert "WARNING: only" in text
    assert "dedupe_consecutive" in text  # the double scrobbles are removed


def test_one_listener_too_small_names_the_option(tmp_path, capsys):
    """k-core 5 empties a tiny one-listener file: the error says which option to lower."""
    f = write_lastfm1k_log(tmp_path / "tiny", 1, sessions_per_user=8, span_days=30, seed=1)
    assert main(["data-report", *_data_keys(f)]) == 2
    err = capsys.readouterr().err
    assert "data.kcore=5" in err and "--data.kcore" in err


def test_fit_without_validation_cases_names_the_cutoffs(tmp_path, capsys):
    """No validation session (the last 20% of plays are one session): a clear exit 2, no crash
    deep in early stopping."""
    from twotower.train import main as train_main

    d = tmp_path / "edge"
    d.mkdir()
    start = pd.Timestamp("2009-01-01", tz="UTC")
    # 20 daily sessions of 5 plays, then one 40-play session holding the last 20% of plays
    times = [start + pd.Timedelta(days=s, minutes=4 * i) for s in range(20) for i in range(5)]
    times += [start + pd.Timedelta(days=20, minutes=4 * i) for i in range(40)]
    rows = [f"user_000001\t{t:%Y-%m-%dT%H:%M:%SZ}\t\tArtist A\t\tTrack {k % 10}"
            for k, t in enumerate(times)]  # fmt: skip
    f = d / "userid-timestamp-artid-artname-traid-traname.tsv"
    f.write_text("\n".join(reversed(rows)) + "\n")
    keys = ["--config", CONFIG, "--data.path", str(f), "--data.cache_dir", str(tmp_path / "c")]
    assert main(["data-report", *keys]) == 0
    assert "WARNING: no validation queries" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        train_main(["fit", *keys, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no validation queries" in err and "--data.val_cutoff" in err


@pytest.mark.slow
@pytest.mark.parametrize("n", sorted(LISTENERS))
def test_fit_and_evaluate_with_baselines(n, logs, tmp_path, capsys):
    """One epoch of the shipped config logs a finite val/ndcg@10; evaluate --baselines runs."""
    from twotower.train import fit

    f = logs[n]
    trainer, _, _ = fit(
        [CONFIG],
        {
            "data.path": str(f),
            "data.cache_dir": str(f.parents[2] / "cache"),
            "trainer.default_root_dir": str(tmp_path / "run"),
            # speed only
            "trainer.max_epochs": 1,
            "trainer.limit_train_batches": 2,
            "model.num_negatives": 64,
            "model.projector_items": 0,
        },
    )
    ndcg = float(trainer.callback_metrics["val/ndcg@10"])
    assert math.isfinite(ndcg) and 0.0 <= ndcg <= 1.0
    if n != 1:
        return
    ckpt = trainer.checkpoint_callback.last_model_path
    assert main(["evaluate", "--checkpoint", ckpt, "--baselines", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    for model in ("two-tower", "popular", "transitions", "cooccurrence", "als"):
        assert f"| {model}" in out
    assert "Paired difference" in out
