from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from twotower.cli import main
from twotower.data.pipeline import DataConfig, data_report, prepare_data
from twotower.data.report import DataReport


def _yaml(tmp_path: Path, body: str, name: str = "cfg.yaml") -> str:
    p = tmp_path / name
    p.write_text(body)
    return str(p)


def _accounting(r: DataReport) -> None:
    assert r.rows_read == r.rows_kept + sum(r.dropped.values())
    s = r.split
    assert s["train_events"] + s["valid"] + s["test"] + s["held_out_events"] == r.rows_kept


def test_cli_data_report_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _yaml(
        tmp_path, "data:\n  format: synthetic\n  options: {preset: tiny}\n  batch_size: 8\n"
    )
    out_json = tmp_path / "report.json"
    assert main(["data-report", "--config", cfg, "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "Data report: synthetic:tiny" in text
    assert "rows read       15," in text
    assert "skipped play (kept as signal, not a positive)" in text
    assert "session length  p10=" in text
    assert "split           train_events=" in text
    rep = DataReport.from_dict(json.loads(out_json.read_text()))
    assert rep.users == 300 and rep.tracks == 500
    assert rep.split["valid"] == rep.split["test"] == 300
    _accounting(rep)
    # the default cache dir, relative to the working directory; second run hits it
    assert any((tmp_path / ".cache" / "twotower").iterdir())
    assert main(["data-report", "--config", cfg, "--data.max_history", "5"]) == 0
    assert len(list((tmp_path / ".cache" / "twotower").iterdir())) == 2
    # --set stays an alias of --KEY=VALUE (a key without a section is a data option)
    assert main(["data-report", "--config", cfg, "--set", "max_history=5"]) == 0
    assert len(list((tmp_path / ".cache" / "twotower").iterdir())) == 2


def test_cli_data_report_bad_config(tmp_path, capsys):
    cfg = _yaml(tmp_path, "data:\n  format: synthetic\n  sesion_gap: 3\n")
    assert main(["data-report", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "cfg.yaml: unknown key 'data.sesion_gap'" in err
    cfg = _yaml(tmp_path, "data: {format: nope, cache_dir: null}\n", "b.yaml")
    assert main(["data-report", "--config", cfg]) == 2
    assert "unknown data format 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------- fixture files
FIXTURE_CASES = ["ml100k", "ml1m", "ml_latest", "mssd", "lastfm1k", "hetrec"]


def _fixtures():
    return pytest.importorskip("fixtures", reason="tests/fixtures.py (helper A) not available")


@pytest.mark.parametrize("name", FIXTURE_CASES)
def test_data_report_on_fixture_formats(name, tmp_path, capsys):
    writers = _fixtures().WRITERS
    if name not in writers:
        pytest.skip(f"tests/fixtures.py has no writer {name!r}")
    writer, fmt = writers[name]
    path = writer(tmp_path / "data")
    cfg = _yaml(tmp_path, f"data:\n  format: {fmt}\n  path: {path}\n  cache_dir: null\n")
    assert main(["data-report", "--config", cfg, "--json", str(tmp_path / "r.json")]) == 0
    rep = DataReport.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert rep.rows_read > 0 and rep.tracks > 0
    _accounting(rep)
    assert rep.split["train_events"] > 0
    assert f"Data report: {rep.source}" in capsys.readouterr().out


def test_data_report_on_generic_csv_with_mapping(tmp_path, capsys):
    fx = _fixtures()
    folder = fx.write_generic_csv(tmp_path)
    cfg = _yaml(
        tmp_path,
        "data:\n"
        "  format: csv\n"
        f"  path: {folder / 'plays.csv'}\n"
        f"  columns: {json.dumps(fx.GENERIC_COLUMNS)}\n"
        f"  options: {{tracks_path: {folder / 'tracks.csv'}, "
        f"track_columns: {json.dumps(fx.GENERIC_TRACK_COLUMNS)}}}\n"
        "  cache_dir: null\n",
    )
    assert main(["data-report", "--config", cfg, "--json", str(tmp_path / "r.json")]) == 0
    rep = DataReport.from_dict(json.loads((tmp_path / "r.json").read_text()))
    e = fx.GENERIC_EXPECTED
    assert (rep.rows_read, rep.rows_kept) == (e["rows_read"], e["rows_kept"])
    assert rep.dropped == {"empty track_id": 1, "duplicate row": 1}
    _accounting(rep)
    # u1 has 2 positives and u2 one: every sequence is too short to evaluate
    assert rep.split["valid"] == rep.split["test"] == 0
    assert "Data report" in capsys.readouterr().out


# --------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_ml100k_report_and_split(shared_data, tmp_path):
    path = shared_data / "ml-100k"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    data = prepare_data(DataConfig(format="movielens", path=str(path), cache_dir=None))
    r = data.report
    assert (r.rows_read, r.users, r.tracks) == (100_000, 943, 1_682)
    _accounting(r)
    assert len(data.valid) == len(data.test) == 943  # every user has >= 3 ratings
    assert r.split["train_events"] == 100_000 - 2 * 943
    assert data.params["filter_seen"] is True
    assert r.time_min == 874724710 and r.time_max == 893286638
    # leave-last-out: each test history ends with the user's validation item
    last = data.test.history[data.test.offsets[1:] - 1]
    np.testing.assert_array_equal(last, data.valid.targets)


@pytest.mark.realdata
def test_ml100k_cli(shared_data, tmp_path, capsys):
    path = shared_data / "ml-100k"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    cfg = _yaml(tmp_path, f"data:\n  format: movielens\n  path: {path}\n  cache_dir: null\n")
    assert main(["data-report", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "rows read       100,000" in out
    assert "1997-09-20 03:05:10 UTC .. 1998-04-22 23:10:38 UTC" in out


@pytest.mark.realdata
def test_hetrec_random_holdout(shared_data):
    path = shared_data / "hetrec2011-lastfm-2k"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    r = data_report(DataConfig(format="hetrec-lastfm", path=str(path), cache_dir=None))
    assert (r.rows_read, r.users, r.tracks) == (92_834, 1_892, 17_632)
    _accounting(r)
    assert "random per-user holdout: no play order" in r.notes
    assert r.split["test"] > 1_800
