from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twotower.config import ConfigError, load_data_config
from twotower.data import pipeline
from twotower.data.pipeline import (
    COLD_TARGET_REASON,
    RANDOM_HOLDOUT_NOTE,
    DataConfig,
    cache_path,
    popularity_stats,
    prepare_data,
)
from twotower.data.report import DataReport
from twotower.data.schema import (
    DataError,
    LoadResult,
    conform_interactions,
    conform_tracks,
    empty_tracks,
)
from twotower.ids import OOV

REPO = Path(__file__).resolve().parents[1]


def _result(df: pd.DataFrame, tracks: pd.DataFrame | None, ordered: bool, source: str):
    inter = conform_interactions(df)
    rep = DataReport(source=source, rows_read=len(inter))
    tr = conform_tracks(tracks) if tracks is not None else empty_tracks()
    return LoadResult(inter, tr, rep, ordered=ordered, source=source)


@pytest.fixture
def fake_source(monkeypatch):
    """Replace the loader by one returning a given frame; counts calls."""
    calls = {"n": 0}

    def install(df, tracks=None, ordered=True, source="fake"):
        def loader(fmt, path, columns=None, **options):
            calls["n"] += 1
            return _result(df, tracks, ordered, source)

        monkeypatch.setattr(pipeline, "load_source", loader)
        return calls

    return install


@pytest.fixture
def csv_source(monkeypatch):
    """A loader that reads a CSV file at ``path`` (so file changes reach the fingerprint)."""
    calls = {"n": 0}

    def loader(fmt, path, columns=None, **options):
        calls["n"] += 1
        df = pd.read_csv(path, dtype={"user_id": str, "track_id": str})
        return _result(df, None, True, "csv-test")

    monkeypatch.setattr(pipeline, "load_source", loader)
    return calls


def seq_rows(user: str, tracks: list[str], skipped: list[bool] | None = None, t0: int = 0):
    n = len(tracks)
    return pd.DataFrame(
        {
            "user_id": [user] * n,
            "track_id": tracks,
            "timestamp": [t0 + 600 * i for i in range(n)],
            "skipped": skipped or [False] * n,
        }
    )


def row_list(values: np.ndarray, offsets: np.ndarray, i: int) -> list[int]:
    return values[offsets[i] : offsets[i + 1]].tolist()


# --------------------------------------------------------------------------- accounting
def test_rows_add_up_with_every_filter(tmp_path):
    cfg = DataConfig(options={"preset": "tiny"}, dedupe_consecutive=True, kcore=10, cache_dir=None)
    data = prepare_data(cfg)
    r = data.report
    assert r.rows_read == r.rows_kept + sum(r.dropped.values())
    assert r.dropped["k-core filter (k=10)"] > 0
    assert r.dropped["consecutive repeat of the same track (dedupe_consecutive)"] > 0
    s = r.split
    assert s["train_events"] + s["valid"] + s["test"] + s["held_out_events"] == r.rows_kept
    assert len(data.train.items) == s["train_events"]
    assert 250 < r.users < 300 and r.sessions > 300  # k-core removed a few users
    assert r.time_min is not None and r.time_max > r.time_min
    assert set(r.session_length) == {"p10", "p50", "p90", "max"}
    assert set(r.popularity) == {"top1pct_share", "gini", "tracks_1_play"}


def test_synthetic_sessions_recovered_and_sequence_by_session():
    by_user = prepare_data(DataConfig(options={"preset": "tiny"}, cache_dir=None))
    by_sess = prepare_data(
        DataConfig(options={"preset": "tiny"}, sequence_by="session", cache_dir=None)
    )
    assert by_user.params["sequence_by"] == "user"
    assert by_sess.params["sequence_by"] == "session"
    assert len(by_user.train) == 300
    # every session with >= 3 positives gives one validation and one test example
    assert by_sess.report.sessions == by_user.report.sessions
    assert 0 < len(by_sess.valid) < by_sess.report.sessions
    assert len(by_sess.train) == by_sess.report.sessions


# --------------------------------------------------------------------------- split semantics
def test_skipped_plays_are_signal_not_targets(fake_source):
    df = pd.concat(
        [
            seq_rows(
                "a", ["s0", "t1", "t2", "t3", "t4", "t5"], [True, False, False, False, True, False]
            ),
            seq_rows("b", ["t1", "t2", "t3", "t1"]),
        ]
    )
    fake_source(df)
    data = prepare_data(DataConfig(format="fake", cache_dir=None, filter_seen="off"))
    iv = data.item_vocab
    # user a: positives t1 t2 t3 t5 -> valid t3, test t5; t4 (skipped) held out
    a = 0 if data.user_vocab.id_of([data.train.users[0]]) == ["a"] else 1
    assert iv.id_of(row_list(data.train.items, data.train.offsets, a)) == ["s0", "t1", "t2"]
    assert data.train.positive[data.train.offsets[a] : data.train.offsets[a + 1]].tolist() == [
        False,
        True,
        True,
    ]
    q = {u: i for i, u in enumerate(data.user_vocab.id_of(data.test.users))}
    assert iv.id_of([data.test.targets[q["a"]]]) == ["<oov>"]  # t5 never in training
    assert iv.id_of(row_list(data.test.history, data.test.offsets, q["a"])) == ["t1", "t2", "<oov>"]
    assert iv.id_of([data.valid.targets[q["a"]]]) == ["<oov>"]  # t3 is never in training either
    assert data.report.counted["skipped play (kept as signal, not a positive)"] == 2
    assert data.report.split["held_out_events"] == 1


def test_no_leakage_vocab_counts_features_from_training_only(fake_source):
    df = pd.concat(
        [
            seq_rows("a", ["x", "y", "v", "q"]),  # valid v, test q: both only after the cut
            seq_rows("b", ["x", "y", "z", "x"]),  # valid z (cold), test x
            seq_rows("c", ["y", "x", "y", "x"]),  # valid y, test x
        ]
    )
    tracks = pd.DataFrame(
        {
            "track_id": ["x", "y", "v", "q", "z"],
            "artist": ["A1", "A2", "LEAK", "LEAK", "LEAK"],
            "genres": ["g1", "g1|g2", "leak", "leak", "leak"],
            "f_energy": [1.0, 3.0, 100.0, 100.0, 100.0],
        }
    )
    fake_source(df, tracks)
    data = prepare_data(DataConfig(format="fake", cache_dir=None))
    assert data.item_vocab.ids == ["x", "y"]  # 3 plays each; tie broken by id
    assert data.item_counts.tolist() == [0, 0, 3, 3]
    q = {u: i for i, u in enumerate(data.user_vocab.id_of(data.test.users))}
    vq = {u: i for i, u in enumerate(data.user_vocab.id_of(data.valid.users))}
    assert data.test.targets[q["a"]] == OOV
    assert data.valid.targets[vq["a"]] == OOV
    assert data.valid.targets[vq["b"]] == OOV
    assert data.item_vocab.id_of([data.test.targets[q["b"]]]) == ["x"]
    # a's test history: x y then v (never in training) -> OOV; seen ignores OOV
    assert row_list(data.test.history, data.test.offsets, q["a"]) == [2, 3, OOV]
    assert row_list(data.test.seen, data.test.seen_offsets, q["a"]) == [2, 3]
    assert data.report.counted[COLD_TARGET_REASON] == 3
    f = data.features
    assert "LEAK" not in f.artist_vocab.ids
    assert "leak" not in f.genre_vocab.ids
    assert sorted(f.genre_vocab.ids) == ["g1", "g2"]
    # standardised over training tracks only: x -> -1, y -> +1
    assert f.audio[2:, 0].tolist() == pytest.approx([-1.0, 1.0])
    assert data.tracks["track_id"].tolist() == ["<pad>", "<oov>", "x", "y"]


def test_filter_seen_auto(fake_source):
    # no item repeats inside a sequence: explicit-ratings-like -> on
    df = pd.concat([seq_rows(u, ["a", "b", "c", "d"]) for u in "uvw"])
    fake_source(df)
    assert prepare_data(DataConfig(format="fake", cache_dir=None)).params["filter_seen"] is True
    on = prepare_data(DataConfig(format="fake", cache_dir=None, filter_seen="off"))
    assert on.params["filter_seen"] is False
    # a listening-log format stays off even without repeats
    log = prepare_data(DataConfig(format="mssd", path=None, cache_dir=None))
    assert log.params["filter_seen"] is False
    assert "listening log" in log.report.notes[-1]


def test_filter_seen_auto_off_for_music_logs():
    tiny = prepare_data(DataConfig(options={"preset": "tiny"}, cache_dir=None))
    assert tiny.params["filter_seen"] is False


def test_unordered_source_random_holdout(fake_source):
    df = pd.concat([seq_rows(u, [f"t{i}" for i in range(10)]) for u in "abc"])
    df["timestamp"] = pd.NA
    fake_source(df, ordered=False, source="hetrec-like")
    d1 = prepare_data(DataConfig(format="fake", cache_dir=None, seed=1))
    d2 = prepare_data(DataConfig(format="fake", cache_dir=None, seed=1))
    d3 = prepare_data(DataConfig(format="fake", cache_dir=None, seed=2))
    assert RANDOM_HOLDOUT_NOTE in d1.report.notes
    np.testing.assert_array_equal(d1.test.targets, d2.test.targets)
    assert not np.array_equal(d1.train.items, d3.train.items)
    assert len(d1.test) == 3
    with pytest.raises(DataError, match="play times"):
        prepare_data(
            DataConfig(
                format="fake",
                cache_dir=None,
                split="time",
                val_cutoff="2020-01-01",
                test_cutoff="2020-02-01",
            )
        )


def test_time_split_on_synthetic():
    from twotower.data.synthetic import load

    ts = load(preset="tiny").interactions["timestamp"].to_numpy(dtype=np.int64)
    val, test = (int(np.quantile(ts, q)) for q in (0.6, 0.8))
    iso = [pd.Timestamp(t, unit="s").isoformat() for t in (val, test)]
    cfg = DataConfig(
        options={"preset": "tiny"},
        split="time",
        val_cutoff=iso[0],
        test_cutoff=iso[1],
        cache_dir=None,
    )
    data = prepare_data(cfg)
    assert pipeline.parse_cutoff(iso[0]) == val
    assert data.train.timestamps.max() < val
    assert abs(data.report.split["train_events"] / len(ts) - 0.6) < 0.01
    assert len(data.valid) > 100 and len(data.test) > 100
    # every validation target is after the cut-off, so its history holds training events
    assert (np.diff(data.valid.offsets) > 0).all()


def test_config_validation():
    with pytest.raises(DataError, match="data.split"):
        DataConfig(split="random")
    with pytest.raises(DataError, match="val_cutoff"):
        DataConfig(split="time")
    with pytest.raises(DataError, match="earlier"):
        DataConfig(split="time", val_cutoff="2020-02-01", test_cutoff="2020-01-01")
    assert DataConfig(filter_seen=True).filter_seen == "on"


def test_popularity_stats_hand_computed():
    st = popularity_stats(np.array([1, 1, 1, 97, 0]))
    assert st["tracks_1_play"] == 3
    assert st["top1pct_share"] == pytest.approx(0.97)
    # Gini of [1, 1, 1, 97]: (2 * (1 + 2 + 3 + 4 * 97) / (4 * 100)) - 5 / 4
    assert st["gini"] == pytest.approx(2 * (1 + 2 + 3 + 388) / 400 - 1.25)


# --------------------------------------------------------------------------- cache
def _write_csv(path: Path, n_users: int = 4, extra: str = "") -> None:
    df = pd.concat([seq_rows(f"u{u}", ["a", "b", "c", "d", "e"], t0=u) for u in range(n_users)])
    df.to_csv(path, index=False)
    if extra:
        with open(path, "a") as f:
            f.write(extra)


def test_cache_hit_miss_invalidation_and_corrupt_rebuild(tmp_path, csv_source, caplog):
    caplog.set_level(logging.INFO, logger="twotower")
    f = tmp_path / "plays.csv"
    _write_csv(f)
    cfg = DataConfig(format="csv", path=str(f), cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg)
    assert csv_source["n"] == 1
    second = prepare_data(cfg)
    assert csv_source["n"] == 1  # hit
    assert "prepared data found" in caplog.text
    np.testing.assert_array_equal(first.train.items, second.train.items)
    assert second.item_vocab == first.item_vocab
    assert second.report.to_dict() == first.report.to_dict()
    assert second.params == first.params

    # a changed parameter -> another key
    prepare_data(pipeline.replace_config(cfg, max_history=3))
    assert csv_source["n"] == 2
    # a changed file -> another key
    _write_csv(f, extra="u9,a,0,False\n")
    changed = prepare_data(cfg)
    assert csv_source["n"] == 3
    assert changed.fingerprint != first.fingerprint

    # truncated cache -> warning, rebuilt, never trusted
    folder = cache_path(cfg)
    shard = folder / "plays" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    caplog.clear()
    rebuilt = prepare_data(cfg)
    assert csv_source["n"] == 4
    assert "unusable, rebuilding" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    np.testing.assert_array_equal(rebuilt.train.items, changed.train.items)
    prepare_data(cfg)
    assert csv_source["n"] == 4  # the rebuilt cache is good again
    # garbage metadata also rebuilds
    (folder / "header.json").write_text("{not json")
    prepare_data(cfg)
    assert csv_source["n"] == 5


def test_cache_disabled(tmp_path, csv_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "plays.csv"
    _write_csv(f)
    cfg = DataConfig(format="csv", path=str(f), cache_dir=None)
    prepare_data(cfg)
    prepare_data(cfg)
    assert csv_source["n"] == 2
    assert not (tmp_path / ".cache").exists()


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data(DataConfig(format="csv", path=str(tmp_path / "nope.csv"), cache_dir=None))


# --------------------------------------------------------------------------- config files
def test_load_data_config_flat_class_path_and_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text(
        "trainer: {max_epochs: 3}\n"
        "data:\n  format: movielens\n  path: ../x\n  batch_size: 512\n  window: 50\n"
        "  options: {min_rating: 4}\n"
    )
    b = tmp_path / "b.yaml"
    b.write_text(
        "data:\n  class_path: twotower.data.datamodule.TwoTowerDataModule\n"
        "  init_args:\n    kcore: 5\n    split: time\n    val_cutoff: 2020-01-01\n"
        "    test_cutoff: 2020-02-01\n    filter_seen: no\n    num_workers: 2\n"
    )
    cfg = load_data_config([str(a), str(b)], {"max_history": "50", "options.preset": "tiny"})
    assert cfg.format == "movielens" and cfg.path == "../x"
    assert cfg.kcore == 5 and cfg.split == "time"
    assert cfg.val_cutoff == "2020-01-01" and cfg.test_cutoff == "2020-02-01"
    assert cfg.filter_seen == "off"
    assert cfg.max_history == 50
    assert cfg.options == {"min_rating": 4, "preset": "tiny"}
    c = tmp_path / "c.yaml"
    c.write_text("model: {dim: 8}\n")  # no data section: all defaults
    assert load_data_config([str(c)], {"cache_dir": "null"}).cache_dir is None
    assert load_data_config([str(c)], {"options": "{preset: tiny}"}).options == {"preset": "tiny"}


def test_load_data_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  fromat: csv\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.fromat'"):
        load_data_config([str(bad)], {})
    good = tmp_path / "good.yaml"
    good.write_text("data: {format: csv}\n")
    with pytest.raises(ConfigError, match="command line: unknown key 'data.nope'"):
        load_data_config([str(good)], {"nope": "1"})
    with pytest.raises(FileNotFoundError):
        load_data_config([str(tmp_path / "missing.yaml")], {})


def test_datamodule_keys_are_read_and_left_out_of_the_data_config():
    """Batch sizes, window, the streaming module's buckets: DataModule keys, not DataConfig's."""
    names = {f.name for f in fields(DataConfig)}
    cfg = load_data_config([], {"batch_size": 7, "window": 9, "window_stride": 3, "kcore": 2})
    assert cfg.kcore == 2 and not {"batch_size", "window", "window_stride"} & names


def test_no_leakage_on_synthetic_leave_last_out():
    from twotower.data.synthetic import load

    cfg = DataConfig(options={"preset": "tiny", "n_users": 150}, cache_dir=None)
    data = prepare_data(cfg)
    raw = load(preset="tiny", n_users=150).interactions
    # the training part, rebuilt independently: per user, rows before the 2nd-to-last positive
    raw = raw.assign(pos=~raw["skipped"])
    raw["k"] = raw.groupby("user_id")["pos"].transform(lambda p: p[::-1].cumsum()[::-1])
    train_tracks = set(raw.loc[raw["k"] > 2, "track_id"]) | set(
        raw.loc[(raw["k"] == 2) & ~raw["pos"], "track_id"]
    )
    assert set(data.item_vocab.ids) == train_tracks
    assert data.item_counts[data.train.items[data.train.positive]].min() > 0
    test_ids = data.item_vocab.id_of(data.test.targets)
    cold = [t for t in raw.loc[raw["k"] == 1, "track_id"] if t not in train_tracks]
    assert test_ids.count("<oov>") == len(cold)


def test_prepare_is_deterministic():
    a = prepare_data(DataConfig(options={"preset": "tiny"}, cache_dir=None))
    b = prepare_data(DataConfig(options={"preset": "tiny"}, cache_dir=None))
    assert a.fingerprint == b.fingerprint
    for part in ("train", "valid", "test"):
        for name, arr in vars(getattr(a, part)).items():
            np.testing.assert_array_equal(arr, getattr(getattr(b, part), name), err_msg=name)
    assert a.item_vocab == b.item_vocab
