"""Data hygiene (issue 15): k-core counts training plays only, small test sets are flagged,
and more negatives than the catalogue switch to the full softmax."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twotower.data.pipeline import COLD_TARGET_REASON, DataConfig, prepare_data
from twotower.data.report import MIN_EVAL_QUERIES, DataReport
from twotower.data.sessions import events_from_frame, kcore, kcore_keep, sessionize_events
from twotower.data.splits import NO_HISTORY_REASON, TEST, TRAIN, VALID, split_events
from twotower.model.loss import RetrievalLoss, resolve_full_softmax

DAY = 86_400
JAN = int(pd.Timestamp("2020-01-01", tz="UTC").timestamp())
FEB = JAN + 31 * DAY
MAR = FEB + 29 * DAY


def _csv(tmp_path: Path, rows: list[tuple[str, str, int]], name: str = "plays.csv") -> str:
    p = tmp_path / name
    pd.DataFrame(rows, columns=["user_id", "track_id", "timestamp"]).to_csv(p, index=False)
    return str(p)


def _time_log(test_plays: int) -> list[tuple[str, str, int]]:
    """Six listeners: a, b, c, d in January, a and b in February; 'hot' is played once in
    January (by u0) and ``test_plays`` times per listener in March."""
    rows = []
    for u in range(6):
        user = f"u{u}"
        for i, t in enumerate("abcd"):
            rows.append((user, t, JAN + u * DAY + i * 60))
        rows += [(user, "a", FEB + u * DAY), (user, "b", FEB + u * DAY + 60)]
        rows += [(user, "hot", MAR + u * DAY + i * 60) for i in range(test_plays)]
    rows.append(("u0", "hot", JAN + 20 * DAY))
    return rows


def _time_cfg(path: str, k: int) -> DataConfig:
    return DataConfig(
        format="csv",
        path=path,
        split="time",
        val_cutoff="2020-02-01",
        test_cutoff="2020-03-01",
        kcore=k,
        cache_dir=None,
    )


# --------------------------------------------------------------------------- kcore, time split
def test_track_popular_only_in_test_period_does_not_survive_kcore(tmp_path):
    rows = _time_log(test_plays=3)
    # the plant: counted over the whole log, 'hot' (1 January + 18 March plays) survives k=3
    ev = sessionize_events(
        events_from_frame(pd.DataFrame(rows, columns=["user_id", "track_id", "timestamp"]))
    )
    whole = kcore(ev, 3)
    assert "hot" in set(whole.track_ids[whole.track])

    data = prepare_data(_time_cfg(_csv(tmp_path, rows), k=3))
    assert "hot" not in data.item_vocab.ids  # its one training play is below k
    assert sorted(data.item_vocab.ids) == ["a", "b", "c", "d"]
    r = data.report
    assert r.dropped == {"k-core filter (k=3)": 1}  # u0's January 'hot' play only
    # the March plays stay: every test target is 'hot', a cold target that counts as a miss
    assert len(data.test) == 6 and (data.test.targets == 1).all()
    assert r.counted[COLD_TARGET_REASON] == 6
    assert r.rows_read == r.rows_kept + r.rows_dropped


def test_training_data_does_not_depend_on_test_period_plays(tmp_path):
    few = prepare_data(_time_cfg(_csv(tmp_path, _time_log(1), "few.csv"), k=3))
    many = prepare_data(_time_cfg(_csv(tmp_path, _time_log(50), "many.csv"), k=3))
    assert few.item_vocab.ids == many.item_vocab.ids
    assert np.array_equal(few.train.items, many.train.items)
    assert np.array_equal(few.train.offsets, many.train.offsets)
    assert np.array_equal(few.item_counts, many.item_counts)


# --------------------------------------------------------------------------- kcore, leave last out
def test_leave_last_out_kcore_ignores_the_held_out_plays(tmp_path):
    # every listener: a b c a b c (training), d (validation), hot (test); u0 also plays
    # 'hot' once in training. Whole log: hot has 7 plays; training rows: 1.
    rows = []
    for u in range(6):
        tracks = ["a", "b", "c", "a", "b", "c"] + (["hot"] if u == 0 else []) + ["d", "hot"]
        rows += [(f"u{u}", t, JAN + u * DAY + i * 60) for i, t in enumerate(tracks)]
    data = prepare_data(
        DataConfig(format="csv", path=_csv(tmp_path, rows), kcore=3, cache_dir=None)
    )
    assert "hot" not in data.item_vocab.ids
    assert "d" not in data.item_vocab.ids  # only ever a validation target
    assert len(data.valid) == len(data.test) == 6
    assert (data.test.targets == 1).all()  # cold: a miss, not hidden
    assert data.report.dropped == {"k-core filter (k=3)": 1}


def test_kcore_keep_counts_training_rows_and_keeps_evaluation_rows():
    df = pd.DataFrame(
        {
            "user_id": ["a"] * 4 + ["b"] * 3 + ["n"] * 2,
            "track_id": ["x", "y", "x", "z", "x", "y", "z", "x", "x"],
            "timestamp": [0, 60, 120, 180, 0, 60, 120, 0, 60],
        }
    )
    ev = sessionize_events(events_from_frame(df))
    train = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    keep = kcore_keep(ev, 2, train)
    # b: 1 training row -> removed with its evaluation rows; then y has 1 training row (a's)
    # -> a's y goes; n has no training rows: outside the filter, kept; a's z (evaluation) stays
    assert keep.tolist() == [True, False, True, True, False, False, False, True, True]
    assert kcore_keep(ev, 2).tolist() == kcore_keep(ev, 2, np.ones(9, dtype=bool)).tolist()


def test_split_events_holds_out_targets_left_without_history():
    # listener a: x x x | x (valid) | x (test). Listener b: r, two skipped x | x x: its only
    # training positive is the rare track r, which k=2 removes.
    df = pd.DataFrame(
        {
            "user_id": ["a"] * 5 + ["b"] * 5,
            "track_id": ["x", "x", "x", "x", "x", "r", "x", "x", "x", "x"],
            "timestamp": [0, 60, 120, 180, 240] * 2,
            "skipped": [False] * 5 + [False, True, True, False, False],
        }
    )
    ev = sessionize_events(events_from_frame(df))
    rep = DataReport()
    ev2, seq, roles = split_events(ev, "user", None, k=2, report=rep)
    # b: r (pos), x (skip), x (skip) train; x valid, x test. r dropped -> validation target
    # has no earlier positive -> held out; the test target keeps the validation play as history
    assert rep.dropped == {"k-core filter (k=2)": 1}
    assert rep.counted[NO_HISTORY_REASON] == 1
    b = roles[ev2.user == ev2.user[-1]]
    assert b.tolist() == [TRAIN, TRAIN, 3, TEST]
    assert (roles == VALID).sum() == 1 and len(seq) == len(ev2) == 9


# --------------------------------------------------------------------------- small test sets
def test_one_listener_gives_a_warning_line(tmp_path):
    rows = [("u0", t, JAN + i * 60) for i, t in enumerate("abcdeabcde")]
    data = prepare_data(
        DataConfig(format="csv", path=_csv(tmp_path, rows), sequence_by="user", cache_dir=None)
    )
    assert data.report.split["test"] == 1
    text = data.report.format()
    assert "WARNING: only 1 test queries (fewer than 100)" in text
    assert "WARNING: only 1 validation queries" in text
    d = data.report.to_dict()
    assert len(d["warnings"]) == 2
    assert DataReport.from_dict(d).to_dict() == d


def test_enough_queries_no_warning():
    rep = DataReport(split={"valid": MIN_EVAL_QUERIES, "test": 5000})
    assert rep.warnings() == [] and "WARNING" not in rep.format()
    assert DataReport().warnings() == []  # no split yet: nothing to say


# --------------------------------------------------------------------------- negatives
def test_negatives_at_or_above_catalogue_switch_to_full_softmax(caplog):
    # what the model does when it builds its loss: 4,096 negatives over 1,125 tracks
    with caplog.at_level(logging.WARNING, logger="twotower"):
        full = resolve_full_softmax(1125 + 2, 4096)
    assert full and "full softmax" in caplog.text and "1125 items" in caplog.text
    loss = RetrievalLoss(1125 + 2, num_negatives=4096, full_softmax=full)
    assert loss.full_softmax and loss.sample_negatives() is None
    assert resolve_full_softmax(12, 10)  # exactly the catalogue
    assert not resolve_full_softmax(12, 9)
    assert not resolve_full_softmax(12, 0)
    assert resolve_full_softmax(12, 0, full_softmax=True)
    small = RetrievalLoss(12, num_negatives=9)
    assert not small.full_softmax and small.sample_negatives().shape == (9,)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twotower"):
        assert not resolve_full_softmax(5000, 4096)
    assert caplog.text == ""


@pytest.mark.parametrize("k", [0, 1])
def test_kcore_off_changes_nothing(tmp_path, k):
    data = prepare_data(_time_cfg(_csv(tmp_path, _time_log(3)), k=k))
    assert "hot" in data.item_vocab.ids and "k-core filter (k=1)" not in data.report.dropped


def test_sessions_without_listeners_keep_their_evaluation_sessions(tmp_path):
    # no user ids: owners are sessions; validation / test sessions have no training row, so
    # they are outside the filter (counting their own plays would be the leak)
    rows = []
    for s in range(4):
        rows += [(f"s{s}", t, JAN + s * DAY + i * 60) for i, t in enumerate("abab")]
    rows += [("v0", "a", FEB), ("v0", "hot", FEB + 60), ("t0", "b", MAR), ("t0", "hot", MAR + 60)]
    p = tmp_path / "sessions.csv"
    pd.DataFrame(rows, columns=["session_id", "track_id", "timestamp"]).to_csv(p, index=False)
    cfg = DataConfig(
        format="csv",
        path=str(p),
        split="time",
        val_cutoff="2020-02-01",
        test_cutoff="2020-03-01",
        kcore=2,
        cache_dir=None,
    )
    data = prepare_data(cfg)
    assert data.params["sequence_by"] == "session"
    assert len(data.valid) == len(data.test) == 1
    assert (data.test.targets == 1).all() and "hot" not in data.item_vocab.ids
    assert "k-core filter (k=2)" not in data.report.dropped  # every training row has k plays
