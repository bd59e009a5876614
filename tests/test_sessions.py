from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twotower.data.report import DataReport
from twotower.data.schema import DataError, conform_interactions
from twotower.data.sessions import (
    CONSECUTIVE_REASON,
    events_from_frame,
    sessionize,
    sessionize_events,
)


def frame(**cols) -> pd.DataFrame:
    return conform_interactions(pd.DataFrame(cols))


def test_gap_boundary_is_exact_at_30_minutes():
    df = frame(
        user_id=["a"] * 5,
        track_id=["t1", "t2", "t3", "t4", "t5"],
        # gaps: 1800 (same session), 1801 (new), 60 (same), 1800 (same)
        timestamp=[0, 1800, 3601, 3661, 5461],
    )
    out = sessionize(df, gap_minutes=30)
    assert out["session"].tolist() == [0, 0, 1, 1, 1]
    assert sessionize(df, gap_minutes=29.99)["session"].tolist() == [0, 1, 2, 2, 3]


def test_rows_ordered_by_user_then_time_and_sessions_numbered_in_that_order():
    df = frame(
        user_id=["b", "a", "b", "a", "a"],
        track_id=["x3", "y2", "x1", "y1", "y3"],
        timestamp=[10_000, 100, 0, 0, 50_000],
    )
    out = sessionize(df)
    assert out["track_id"].tolist() == ["x1", "x3", "y1", "y2", "y3"]
    assert out["user_id"].tolist() == ["b", "b", "a", "a", "a"]  # users by first appearance
    assert out["session"].tolist() == [0, 1, 2, 2, 3]


def test_given_session_ids_are_respected_and_ordered_by_time_then_position():
    df = frame(
        session_id=["s2", "s1", "s1", "s1", "s2", "s1"],
        track_id=["b1", "a3", "a1", "a2", "b2", "a9"],
        # s1 spans 3 hours: still one session (ids are given); same-day rows ordered by position
        timestamp=[500, 86_400, 86_400, 86_400, 500, 86_400 + 3 * 3600],
        position=[1, 3, 1, 2, 2, 1],
    )
    out = sessionize(df)
    assert out["track_id"].tolist() == ["b1", "b2", "a1", "a2", "a3", "a9"]
    assert out["session"].tolist() == [0, 0, 1, 1, 1, 1]
    assert out["session_id"].tolist() == ["s2", "s2", "s1", "s1", "s1", "s1"]


def test_missing_timestamps_with_session_and_position():
    df = frame(session_id=["s", "s", "s"], track_id=["c", "a", "b"], position=[3, 1, 2])
    assert sessionize(df)["track_id"].tolist() == ["a", "b", "c"]


def test_hour_is_derived_from_timestamp_when_missing():
    ev = events_from_frame(frame(user_id=["a"], track_id=["t"], timestamp=[5 * 3600 + 10]))
    assert ev.hour.tolist() == [5]


def test_errors_name_the_row_and_column():
    with pytest.raises(DataError, match=r"row 1: neither 'session_id' nor 'user_id'"):
        sessionize(frame(user_id=["a", None], track_id=["t", "u"], timestamp=[0, 1]))
    with pytest.raises(DataError, match=r"row 0: column 'timestamp' is empty"):
        sessionize(frame(user_id=["a"], track_id=["t"]))
    with pytest.raises(DataError, match="track_id"):
        sessionize(frame(user_id=["a", "a"], track_id=["t", None], timestamp=[0, 1]))


def test_dedupe_consecutive_counts_drops():
    df = frame(
        user_id=["a"] * 6,
        track_id=["t1", "t1", "t2", "t1", "t1", "t1"],
        timestamp=[0, 60, 120, 180, 10_000, 10_060],  # the 5th row starts a new session
    )
    rep = DataReport()
    out = sessionize(df, dedupe=True, report=rep)
    assert out["track_id"].tolist() == ["t1", "t2", "t1", "t1"]
    assert out["session"].tolist() == [0, 0, 0, 1]
    assert rep.dropped == {CONSECUTIVE_REASON: 2}


def test_kcore_is_iterative():
    # k=2: user c has 1 row -> dropped; then track z (only c and one of b) ... planned by hand:
    df = frame(
        user_id=["a", "a", "a", "b", "b", "c"],
        track_id=["x", "y", "z", "x", "y", "z"],
        timestamp=[0, 60, 120, 0, 60, 0],
    )
    rep = DataReport()
    out = sessionize(df, k=2, report=rep)
    # c dropped (1 row) -> z has 1 row left (a's) -> dropped; a keeps x, y; b keeps x, y.
    assert sorted(zip(out["user_id"], out["track_id"], strict=True)) == [
        ("a", "x"),
        ("a", "y"),
        ("b", "x"),
        ("b", "y"),
    ]
    assert rep.dropped == {"k-core filter (k=2)": 2}
    assert out["session"].tolist() == [0, 0, 1, 1]


def test_random_order_is_one_session_per_user_and_seeded():
    df = frame(user_id=["a"] * 20 + ["b"] * 5, track_id=[f"t{i}" for i in range(25)])
    ev1 = sessionize_events(events_from_frame(df), random_order=True, seed=1)
    ev2 = sessionize_events(events_from_frame(df), random_order=True, seed=1)
    ev3 = sessionize_events(events_from_frame(df), random_order=True, seed=2)
    np.testing.assert_array_equal(ev1.track, ev2.track)
    assert not np.array_equal(ev1.track, ev3.track)
    assert ev1.session.tolist() == [0] * 20 + [1] * 5


def test_vectorised_on_a_large_frame():
    rng = np.random.default_rng(0)
    n = 200_000
    df = frame(
        user_id=rng.integers(0, 1000, n).astype(str),
        track_id=rng.integers(0, 5000, n).astype(str),
        timestamp=rng.integers(0, 86_400 * 30, n),
    )
    ev = sessionize_events(events_from_frame(df))
    # Within every session, times are sorted and gaps are at most 30 min.
    same = ev.session[1:] == ev.session[:-1]
    d = np.diff(ev.timestamp)
    assert (d[same] >= 0).all() and (d[same] <= 1800).all()
    # Between consecutive sessions of a user, the gap is larger than 30 min.
    same_user = ev.user[1:] == ev.user[:-1]
    assert (d[~same & same_user] > 1800).all()
    assert (np.diff(ev.session) >= 0).all()
