from __future__ import annotations

import hashlib
import time

import numpy as np
import pandas as pd
import pytest

from twotower.data.schema import INTERACTION_COLUMNS, DataError
from twotower.data.synthetic import (
    AUDIO_FEATURES,
    PRESETS,
    SKIPPED_REASON,
    ground_truth,
    load,
    make_config,
)


@pytest.fixture(scope="module")
def tiny():
    res = load(preset="tiny")
    return res, ground_truth("tiny")


def _cluster(truth, track_ids: pd.Series) -> np.ndarray:
    return truth.cluster_of(track_ids)


def test_tiny_size_and_speed():
    t0 = time.perf_counter()
    res = load(preset="tiny")
    elapsed = time.perf_counter() - t0
    df = res.interactions
    assert elapsed < 1.5  # goal < 1 s; slack for the shared 2-core machine
    assert tuple(df.columns) == INTERACTION_COLUMNS
    assert df["user_id"].nunique() == 300
    assert df["track_id"].nunique() <= 500
    assert len(res.tracks) == 500
    assert 10_000 <= len(df) <= 20_000
    assert res.report.rows_read == len(df)
    assert res.report.counted[SKIPPED_REASON] == int(df["skipped"].sum())
    assert df["session_id"].isna().all()  # the pipeline sessionizes by gap
    assert df["timestamp"].notna().all()


def test_deterministic_by_seed():
    a = load(preset="tiny", seed=7)
    b = load(preset="tiny", seed=7)
    c = load(preset="tiny", seed=8)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.tracks, b.tracks)
    assert not a.interactions["track_id"].equals(c.interactions["track_id"])
    ta, tb = ground_truth("tiny", seed=7), ground_truth("tiny", seed=7)
    np.testing.assert_array_equal(ta.user_tastes, tb.user_tastes)


def test_consecutive_plays_share_cluster_far_above_chance(tiny):
    res, truth = tiny
    df = res.interactions
    cl = _cluster(truth, df["track_id"])
    assert (cl >= 0).all()
    ts = df["timestamp"].to_numpy(dtype=np.int64)
    same_user = (df["user_id"].to_numpy()[1:] == df["user_id"].to_numpy()[:-1]) & (
        np.diff(ts) < 1800
    )
    share = (cl[1:] == cl[:-1])[same_user].mean()
    freq = np.bincount(cl) / len(cl)
    chance = float((freq**2).sum())  # two independent plays share a cluster
    assert chance < 0.3
    assert share > 0.85
    assert share > 3 * chance


def test_users_play_their_tastes(tiny):
    res, truth = tiny
    df = res.interactions
    tastes = truth.tastes_of(df["user_id"].drop_duplicates())
    n = np.array([len(t) for t in tastes])
    assert n.min() >= 1 and n.max() <= 3 and len(set(n)) == 3
    cl = _cluster(truth, df["track_id"])
    uid = pd.Index(truth.user_ids).get_indexer(df["user_id"].to_numpy())
    on = (truth.user_tastes[uid] == cl[:, None]).any(axis=1)
    assert on.mean() > 0.9
    skipped = df["skipped"].to_numpy()
    # Off-taste tracks are skipped far more often (planted 0.5 vs 0.1).
    assert skipped[~on].mean() > 0.3
    assert skipped[on].mean() < 0.15


def test_popularity_heavy_tailed(tiny):
    res, _ = tiny
    counts = np.sort(res.interactions["track_id"].value_counts().to_numpy())[::-1]
    top10 = counts[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top10 > 0.4  # uniform would be 0.1
    assert counts[0] > 20 * np.median(counts)


def test_sessions_are_separable_by_a_30_minute_gap(tiny):
    res, _ = tiny
    df = res.interactions
    same_user = df["user_id"].to_numpy()[1:] == df["user_id"].to_numpy()[:-1]
    gaps = np.diff(df["timestamp"].to_numpy(dtype=np.int64))[same_user]
    assert (gaps > 0).all()  # ordered in time per user
    inside, between = gaps[gaps <= 1800], gaps[gaps > 1800]
    assert inside.max() <= 240  # 3-4 min per play, shorter when skipped
    assert between.min() >= 3600  # at least an hour between sessions
    assert len(between) > 300  # several sessions per user
    hours = df["hour"].to_numpy(dtype=np.int64)
    np.testing.assert_array_equal(hours, (df["timestamp"].to_numpy(np.int64) // 3600) % 24)
    # One context type per session.
    ctx = df["context_type"].to_numpy()
    within = same_user & (np.diff(df["timestamp"].to_numpy(np.int64)) <= 1800)
    assert (ctx[1:][within] == ctx[:-1][within]).all()


def test_track_metadata_matches_truth(tiny):
    res, truth = tiny
    tr = res.tracks
    cl = truth.cluster_of(tr["track_id"])
    num = tr["track_id"].str.slice(1).astype(int).to_numpy()
    assert (tr["title"] == "Track " + pd.Series(num).astype(str)).all()
    assert (tr["artist"] == "Artist " + pd.Series(truth.track_artist[num]).astype(str)).all()
    first_genre = tr["genres"].str.split("|").str[0]
    assert (first_genre == "genre-" + pd.Series(cl).astype(str)).all()
    assert tr["genres"].str.contains("|", regex=False).any()
    assert tr["year"].notna().all()
    # Audio features are explained mostly by the cluster (between-cluster variance share).
    for name in AUDIO_FEATURES:
        x = tr[name].to_numpy(dtype=np.float64)
        means = np.bincount(cl, weights=x) / np.bincount(cl)
        r2 = 1 - ((x - means[cl]) ** 2).sum() / ((x - x.mean()) ** 2).sum()
        assert r2 > 0.3, name


def test_n_plays_knob_and_vectorised_speed():
    t0 = time.perf_counter()
    res = load(preset="default", n_plays=1_000_000)
    elapsed = time.perf_counter() - t0
    assert abs(len(res.interactions) - 1_000_000) < 50_000
    assert elapsed < 5.0


def test_default_preset_size():
    cfg = PRESETS["default"]
    assert cfg.n_users == 3000 and cfg.n_tracks == 5000
    assert 250_000 < cfg.n_users * cfg.sessions_per_user * cfg.mean_length < 350_000


def test_missing_metadata_option():
    res = load(preset="tiny", p_missing_metadata=0.2)
    assert 300 < len(res.tracks) < 500


def test_bad_options():
    with pytest.raises(DataError, match="unknown option"):
        load(preset="tiny", n_user=3)
    with pytest.raises(DataError, match="unknown preset"):
        load(preset="huge")
    with pytest.raises(DataError, match="takes no path"):
        load("some/file.csv", preset="tiny")
    with pytest.raises(DataError, match="max_session_length"):
        make_config("tiny", max_session_length=51)


def _mean_log_likelihood(truth, states, rows) -> float:
    from twotower.data.synthetic import next_play_law

    total = 0.0
    for i in rows:
        law = next_play_law(truth, states["user"][i], states["prev"][i], states["home"][i])
        total += np.log(law[states["track"][i]] / law.sum())
    return total / len(rows)


def test_next_play_law_is_the_generators_law():
    """The law that scores the Bayes ceiling (bench/synthetic_ceiling.py) is the generator's:
    real plays are likelier under it than under laws with the step probabilities moved, it sums
    to one before skips, and skips happen at the configured rates."""
    from dataclasses import replace

    from twotower.data.synthetic import generate, next_play_law, play_states

    cfg = make_config("tiny")
    plays, _, truth = generate(cfg)
    states = play_states(plays, truth)
    no_skips = replace(truth, config=replace(cfg, skip_rate=0.0, skip_rate_off=0.0))
    rows = np.random.default_rng(0).choice(len(plays), 3000, replace=False)
    for prev in (-1, int(states["track"][5])):
        law = next_play_law(no_skips, 0, prev, int(truth.track_cluster[max(prev, 0)]))
        assert law.sum() == pytest.approx(1.0)
        if prev >= 0:
            assert law[prev] < 0.01  # immediate repeats are redrawn
    exact = _mean_log_likelihood(no_skips, states, rows)
    for moved in ({"p_same_artist": 0.15}, {"p_same_artist": 0.45}, {"p_drift": 0.2}):
        other = replace(truth, config=replace(no_skips.config, **moved))
        assert exact > _mean_log_likelihood(other, states, rows) + 0.01, moved
    # sessions open inside one of the user's tastes, from the cluster of the session
    opens = states["prev"] < 0
    tastes = truth.user_tastes[states["user"][opens]]
    assert (tastes == truth.track_cluster[states["track"][opens]][:, None]).any(axis=1).all()
    on = (truth.user_tastes[states["user"]] == truth.track_cluster[states["track"]][:, None]).any(1)
    assert states["skipped"][on].mean() == pytest.approx(cfg.skip_rate, abs=0.02)
    assert states["skipped"][~on].mean() == pytest.approx(cfg.skip_rate_off, abs=0.06)


def _frame_hash(df: pd.DataFrame) -> str:
    """A platform-independent digest of a frame's values (floats rounded to 4 decimals)."""
    h = hashlib.sha256()
    for name in df.columns:
        col = df[name]
        h.update(name.encode())
        if col.dtype.kind in "OUT" or str(col.dtype) == "string":
            text = col.astype(object).where(col.notna(), "<NA>").astype(str)
            h.update("\x1f".join(text).encode())
            continue
        h.update(col.isna().to_numpy().tobytes())
        values = col.fillna(0).to_numpy()
        if values.dtype.kind == "f":
            values = np.round(values.astype(np.float64) * 1e4)
        h.update(np.ascontiguousarray(values.astype("<i8")).tobytes())
    return h.hexdigest()[:16]


# Digests of the data generated before the scrobble preset was added: new generator options
# must leave the old presets (and their seeds) bit-for-bit unchanged.
FROZEN_DIGESTS = {
    ("tiny", 0): ("cd2a960d8cf618f7", "839a354c0d37aff8"),
    ("tiny", 3): ("d12457edc5056021", "f3a1361bb45a85d3"),
    ("default", 0): ("63e721c305415fa5", "2b83d6e1ae318c40"),
}


@pytest.mark.parametrize(("preset", "seed"), sorted(FROZEN_DIGESTS))
def test_old_presets_generate_the_same_data(preset: str, seed: int):
    res = load(preset=preset, seed=seed)
    plays, tracks = FROZEN_DIGESTS[(preset, seed)]
    assert _frame_hash(res.interactions) == plays
    assert _frame_hash(res.tracks) == tracks


# ---------------------------------------------------------------------------------- scrobble
@pytest.fixture(scope="module")
def scrobble():
    t0 = time.perf_counter()
    res = load(preset="scrobble")
    elapsed = time.perf_counter() - t0
    return res, ground_truth("scrobble"), elapsed


def _in_session(df: pd.DataFrame) -> np.ndarray:
    """``[N - 1]``: row i + 1 follows row i in the same session (30-minute gap)."""
    user = df["user_id"].to_numpy()
    gap = np.diff(df["timestamp"].to_numpy(dtype=np.int64))
    return (user[1:] == user[:-1]) & (gap <= 1800)


def _replay_share(df: pd.DataFrame) -> float:
    """Share of plays of a track the same listener played before."""
    return float(df.duplicated(["user_id", "track_id"]).mean())


def test_scrobble_shape(scrobble):
    res, _, elapsed = scrobble
    df = res.interactions
    assert elapsed < 5.0  # about a second; slack for the shared 2-core machine
    assert tuple(df.columns) == INTERACTION_COLUMNS
    assert 300 <= df["user_id"].nunique() <= 400
    assert 200_000 <= len(df) <= 300_000
    ts = df["timestamp"].to_numpy(dtype=np.int64)
    assert 170 <= (ts.max() - ts.min()) / 86400 <= 183  # about 6 months
    assert ts.min() >= pd.Timestamp("2023-01-01", tz="UTC").timestamp()
    # A long tail: most tracks that are played at all are played once or twice.
    counts = df["track_id"].value_counts()
    assert (counts <= 2).mean() > 0.5
    assert counts.iloc[0] > 100  # and a head of hits
    # Listeners of unequal activity, each with many sessions over the whole span.
    plays = df.groupby("user_id").size()
    assert plays.max() > 3 * plays.median()
    sessions = 1 + int((~_in_session(df)).sum())
    assert 40 <= sessions / len(plays) <= 80
    last = df.groupby("user_id")["timestamp"].max().to_numpy(dtype=np.int64)
    assert (last >= ts.max() - 0.1 * (ts.max() - ts.min())).mean() > 0.9  # in the test window
    # Sessions stay separable by a 30-minute gap.
    same_user = df["user_id"].to_numpy()[1:] == df["user_id"].to_numpy()[:-1]
    gaps = np.diff(ts)[same_user]
    assert (gaps > 0).all()
    assert gaps[gaps <= 1800].max() <= 240 and gaps[gaps > 1800].min() >= 3600


def test_scrobble_replays_artist_runs_and_skips(scrobble):
    res, truth, _ = scrobble
    df = res.interactions
    # Re-plays of the listener's own history, well above what popularity alone gives.
    assert 0.3 <= _replay_share(df) <= 0.55
    assert _replay_share(load(preset="scrobble", n_users=100, p_repeat=0.0).interactions) < 0.25
    # Artist runs, mostly in album order.
    num = pd.Index(truth.track_ids).get_indexer(df["track_id"].to_numpy())
    assert (num >= 0).all()
    within = _in_session(df)
    artist = truth.track_artist[num]
    same = (artist[1:] == artist[:-1]) & within
    assert 0.35 <= same.sum() / within.sum() <= 0.65
    assert (num[1:] == num[:-1] + 1)[same].mean() > 0.5
    # Sessions keep a cluster; listeners play their tastes and skip the rest more.
    cl = truth.track_cluster[num]
    assert (cl[1:] == cl[:-1])[within].mean() > 0.7
    uid = pd.Index(truth.user_ids).get_indexer(df["user_id"].to_numpy())
    on = (truth.user_tastes[uid] == cl[:, None]).any(axis=1)
    assert on.mean() > 0.85
    skipped = df["skipped"].to_numpy()
    assert 0.08 <= skipped.mean() <= 0.2
    assert skipped[~on].mean() > 2 * skipped[on].mean()


def test_scrobble_tastes_persist_over_time(scrobble):
    """A listener's first three months tell which clusters the last three hold."""
    res, truth, _ = scrobble
    df = res.interactions
    cl = truth.cluster_of(df["track_id"])
    ts = df["timestamp"].to_numpy(dtype=np.int64)
    early = ts < ts.min() + (ts.max() - ts.min()) // 2
    frame = pd.DataFrame({"user": df["user_id"].to_numpy(), "cl": cl})
    counts = frame[early].value_counts().rename("n").reset_index()
    top3 = counts.sort_values("n", ascending=False).groupby("user").head(3)
    top3 = set(zip(top3["user"], top3["cl"], strict=True))
    late = frame[~early]
    hit = np.array([(u, c) in top3 for u, c in zip(late["user"], late["cl"], strict=True)])
    assert hit.mean() > 0.8


def test_scrobble_deterministic_and_next_play_law_unsupported():
    small = {"n_users": 60, "artists_per_cluster": 40}  # fast: a smaller catalogue
    a = load(preset="scrobble", seed=5, **small).interactions
    b = load(preset="scrobble", seed=5, **small).interactions
    c = load(preset="scrobble", seed=6, **small).interactions
    pd.testing.assert_frame_equal(a, b)
    assert not a["track_id"].equals(c["track_id"])
    from twotower.data.synthetic import next_play_law

    truth = ground_truth("scrobble", **small)
    assert truth.user_tastes.shape[0] == 60
    with pytest.raises(DataError, match="not supported"):
        next_play_law(truth, 0, -1, 0)


def test_scrobble_options_validated():
    with pytest.raises(DataError, match="album_next"):
        make_config("tiny", p_same_artist=0.5, p_album_next=0.6)
    with pytest.raises(DataError, match="repeat_recency"):
        make_config("tiny", repeat_recency=0.0)
    with pytest.raises(DataError, match="span_days"):
        make_config("tiny", span_days=-1.0)
    with pytest.raises(DataError, match="probabilities"):
        make_config("tiny", p_repeat=1.5)


def test_scrobble_config_cuts_the_last_tenths(scrobble):
    """configs/synthetic-scrobble.yaml: next-in-session cases in the last ~10% each."""
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "synthetic-scrobble.yaml"
    data = yaml.safe_load(path.read_text())["data"]
    assert data["options"] == {"preset": "scrobble"} and data["split"] == "next_in_session"
    assert (data["val_cutoff"], data["test_cutoff"]) == (0.8, 0.9)  # time quantiles of the plays
    assert data["play_signals"] is True and data["sequence_by"] == "user"
