"""The ``next_in_session`` split: the next track of the current session given the listener's
whole earlier history, forward in time, one seeded case per validation / test session; and
relative cut-offs (quantiles of the play times) for the time-based splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twotower.baselines import baseline_ranks, fit_baselines
from twotower.data.pipeline import (
    DataConfig,
    cutoff_fraction,
    fingerprint,
    iso_utc,
    prepare_data,
    resolve_cutoffs,
)
from twotower.data.report import MIN_EVAL_QUERIES, DataReport
from twotower.data.schema import DataError
from twotower.data.sessions import events_from_frame, sessionize_events
from twotower.data.splits import (
    HELD_OUT,
    NO_CASE_SESSION_REASON,
    TEST,
    TRAIN,
    VALID,
    build_eval_set,
    next_in_session,
    split_events,
)
from twotower.data.synthetic import load as synthetic
from twotower.ids import OOV
from twotower.metrics import metrics_from_ranks
from twotower.query import GAP_FIRST, SESSION_BREAK

T, V, X, H = TRAIN, VALID, TEST, HELD_OUT
DAY, MIN = 86_400, 60
JAN = int(pd.Timestamp("2020-01-01", tz="UTC").timestamp())
VAL, TST = JAN + 10 * DAY, JAN + 20 * DAY
ALL = "abcdefghijmnopq"  # every track u2 plays in training (so none is OOV)


def _play(user: str, track: str, day: float, minute: float, skipped: bool = False) -> tuple:
    return (user, track, JAN + int(day * DAY + minute * MIN), skipped)


def _hand_log() -> pd.DataFrame:
    """Two listeners, sessions by a 30-minute gap (rows in this order after sessionizing).

    u1: S0 day 1 a b c | S1 day 5 a(skip) d e | S2 day 9 23:50 f, day 10 00:05 g (starts
        before the validation cut-off: training) | S3 day 12 h i(skip) j (validation: target
        j) | S4 day 14 m (one positive: no case) | S5 day 22 n o (test: target o) | S6 day 25
        p(skip) q (one positive: no case)
    u2: S7 day 2 every track (training) | S8 day 15 c d e (validation: d or e) | S9 day 21
        x(skip) y(skip) (no positive: no case)
    """
    rows = [_play("u1", t, 1, i) for i, t in enumerate("abc")]
    rows += [_play("u1", "a", 5, 0, True), _play("u1", "d", 5, 1), _play("u1", "e", 5, 2)]
    rows += [_play("u1", "f", 9, 23 * 60 + 50), _play("u1", "g", 10, 5)]
    rows += [_play("u1", "h", 12, 0), _play("u1", "i", 12, 1, True), _play("u1", "j", 12, 2)]
    rows += [_play("u1", "m", 14, 0)]
    rows += [_play("u1", "n", 22, 0), _play("u1", "o", 22, 1)]
    rows += [_play("u1", "p", 25, 0, True), _play("u1", "q", 25, 1)]
    rows += [_play("u2", t, 2, i) for i, t in enumerate(ALL)]
    rows += [_play("u2", t, 15, i) for i, t in enumerate("cde")]
    rows += [_play("u2", "x", 21, 0, True), _play("u2", "y", 21, 1, True)]
    return pd.DataFrame(rows, columns=["user_id", "track_id", "timestamp", "skipped"])


def _csv(tmp_path: Path, df: pd.DataFrame, name: str = "plays.csv") -> str:
    p = tmp_path / name
    df.to_csv(p, index=False)
    return str(p)


def _cfg(path: str, **kw: object) -> DataConfig:
    base: dict = {
        "format": "csv",
        "path": path,
        "split": "next_in_session",
        "val_cutoff": iso_utc(VAL),
        "test_cutoff": iso_utc(TST),
        "cache_dir": None,
    }
    return DataConfig(**{**base, **kw})


def _decode(data, values: np.ndarray) -> list[str]:
    return [data.item_vocab.ids[i - 2] if i > OOV else "?" for i in values]


def _q(values: np.ndarray, offsets: np.ndarray, i: int) -> np.ndarray:
    return values[offsets[i] : offsets[i + 1]]


# --------------------------------------------------------------------------- roles and cases
def test_roles_on_a_hand_made_log():
    ev = sessionize_events(events_from_frame(_hand_log()))
    rep = DataReport()
    ev, seq, roles = split_events(ev, "user", (VAL, TST), report=rep, split="next_in_session")
    u1 = [T] * 3 + [T] * 3 + [T, T] + [H, H, V] + [H] + [H, X] + [H, H]
    assert roles[:16].tolist() == u1
    u2 = roles[16:]
    assert (u2[:15] == T).all()  # S7, training
    s8 = u2[15:18].tolist()  # c d e: the target is d or e, never c (no earlier positive)
    assert s8 in ([H, V, H], [H, H, V])
    assert u2[18:].tolist() == [H, H]
    assert seq.tolist() == [0] * 16 + [1] * 20  # one sequence per listener
    # S4, S6 and S9 give no case: counted as sessions, their plays stay as history
    assert rep.counted == {NO_CASE_SESSION_REASON: 3}


def test_cases_hold_the_whole_earlier_history(tmp_path):
    data = prepare_data(_cfg(_csv(tmp_path, _hand_log()), seed=3))
    assert len(data.valid) == 2 and len(data.test) == 1
    assert data.params["sequence_by"] == "user"
    # the test case of u1: the target o, given every earlier positive, earlier sessions and
    # the validation period included
    te = data.test
    assert _decode(data, te.targets) == ["o"]
    assert _decode(data, _q(te.history, te.offsets, 0)) == list("abcdefghjmn")
    # every earlier play with its skip mark; session starts marked by the gap buckets
    assert _decode(data, _q(te.plays, te.plays_offsets, 0)) == list("abcadefghijmn")
    skipped = _q(te.plays_skipped, te.plays_offsets, 0).tolist()
    assert skipped == [0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    gaps = _q(te.plays_gaps, te.plays_offsets, 0)
    assert gaps[0] == GAP_FIRST
    starts = np.flatnonzero(gaps >= SESSION_BREAK).tolist()
    assert starts == [3, 6, 8, 11, 12]  # a(skip) f h m n open S1, S2, S3, S4, S5
    assert te.request_gaps[0] < SESSION_BREAK  # o follows n inside its session
    # validation: u1's j given a..h (the skipped i is a play, not history); u2's d or e
    va = data.valid
    targets = _decode(data, va.targets)
    assert targets[0] == "j"
    assert _decode(data, _q(va.history, va.offsets, 0)) == list("abcdefgh")
    assert _decode(data, _q(va.plays, va.plays_offsets, 0)) == list("abcadefghi")
    assert targets[1] in ("d", "e")
    expected_u2 = list(ALL) + ["c", "d", "e"][: "cde".index(targets[1])]
    assert _decode(data, _q(va.plays, va.plays_offsets, 1)) == expected_u2
    # the report: the protocol, the cut-offs and the cases
    r = data.report
    assert r.protocol["split"] == "next_in_session"
    assert r.protocol["val_cutoff"] == iso_utc(VAL) and r.protocol["test_cutoff"] == iso_utc(TST)
    assert r.split["valid"] == 2 and r.split["test"] == 1
    assert r.counted[NO_CASE_SESSION_REASON] == 3
    text = r.format()
    assert "protocol        next_in_session: one case per validation (test) session" in text
    assert f"cut-offs        validation from {iso_utc(VAL)}" in text
    assert "dates in the config" in text


def test_training_is_the_sessions_that_start_before_the_validation_cut_off(tmp_path):
    data = prepare_data(_cfg(_csv(tmp_path, _hand_log())))
    tr = data.train
    assert len(tr) == 2
    assert _decode(data, _q(tr.items, tr.offsets, 0)) == list("abcadefg")
    assert _decode(data, _q(tr.items, tr.offsets, 1)) == list(ALL)
    # g (day 10, 00:05) is after the cut-off but its session started before it
    late = tr.timestamps[tr.timestamps >= VAL]
    assert late.tolist() == [JAN + 10 * DAY + 5 * MIN]
    assert "x" not in data.item_vocab.ids  # played only in the test period


def test_one_case_per_session_seeded():
    # 40 listeners, one training session and one validation session of 8 positives each
    rows = []
    for u in range(40):
        rows += [_play(f"u{u}", f"t{i}", 1, i) for i in range(8)]
        rows += [_play(f"u{u}", f"t{i}", 12, i) for i in range(8)]
    ev = sessionize_events(events_from_frame(pd.DataFrame(rows, columns=_hand_log().columns)))
    picks = []
    for seed in (0, 0, 1):
        roles = next_in_session(ev.session, ev.positive, ev.timestamp, VAL, TST, seed=seed)
        r = roles.reshape(40, 16)
        assert (r[:, :8] == T).all() and ((r[:, 8:] == V).sum(axis=1) == 1).all()
        picks.append(np.argmax(r[:, 8:] == V, axis=1))  # position of the target, [40]
    assert np.array_equal(picks[0], picks[1])  # same seed, same cases
    assert not np.array_equal(picks[0], picks[2])
    assert picks[0].min() >= 1  # never the session's first positive
    assert len(set(picks[0].tolist())) >= 5  # spread over the positions 1..7


def test_skipped_plays_are_never_targets_and_short_sessions_count():
    # one session: p s p s -> the target is the second positive (row 2)
    session = np.array([0, 0, 0, 0, 1, 1, 1])
    pos = np.array([1, 0, 1, 0, 0, 1, 0], dtype=bool)
    ts = np.array([VAL + 1] * 4 + [TST + 1] * 3)
    rep = DataReport()
    for seed in range(5):
        roles = next_in_session(session, pos, ts, VAL, TST, seed=seed, report=rep)
        assert roles.tolist() == [H, H, V, H, H, H, H]
    assert rep.counted == {NO_CASE_SESSION_REASON: 5}  # session 1, once per call


# --------------------------------------------------------------------------- no leakage
def test_no_history_reaches_the_target_or_beyond():
    ev = sessionize_events(events_from_frame(synthetic(preset="tiny").interactions))
    lo, hi = resolve_cutoffs(0.7, 0.85, ev.timestamp)
    ev, seq, roles = split_events(ev, "user", (lo, hi), split="next_in_session", seed=1)
    items = ev.track.astype(np.int64) + 2  # every track known: no OOV
    for role in (VALID, TEST):
        rows = np.flatnonzero(roles == role)
        assert len(rows) > 50
        # one case per session, and the session started in the period of its role
        assert len(np.unique(ev.session[rows])) == len(rows)
        first = np.searchsorted(ev.session, ev.session[rows])  # [Q] first row of the session
        start = ev.timestamp[first]
        assert ((start >= lo) & (start < hi)).all() if role == VALID else (start >= hi).all()
        es = build_eval_set(
            rows, seq, ev.positive, items, ev.user, ev.hour, ev.context, 10_000, ev.timestamp
        )
        user_start = np.searchsorted(seq, seq[rows])  # [Q] first row of the listener
        for q, t in enumerate(rows):
            earlier = np.arange(user_start[q], t)  # every row of the listener before t
            assert np.array_equal(_q(es.plays, es.plays_offsets, q), items[earlier])
            kept = earlier[ev.positive[earlier]]
            assert np.array_equal(_q(es.history, es.offsets, q), items[kept])
            assert (ev.timestamp[earlier] <= ev.timestamp[t]).all()
            # the target has an earlier positive in its own session
            assert ev.positive[first[q] : t].any()
    # evaluation rows never train: every training row is in a session started before lo
    train = np.flatnonzero(roles == TRAIN)
    assert (ev.timestamp[np.searchsorted(ev.session, ev.session[train])] < lo).all()
    lengths = np.bincount(ev.session)  # [S]
    s_first = np.searchsorted(ev.session, np.arange(len(lengths)))  # [S]
    assert len(train) == lengths[ev.timestamp[s_first] < lo].sum()


def test_training_does_not_depend_on_evaluation_period_plays(tmp_path):
    df = _hand_log()
    other = df.copy()
    late = other["timestamp"] >= VAL + DAY  # the validation / test sessions
    other.loc[late, "track_id"] = "z" + other.loc[late, "track_id"]
    other.loc[late, "skipped"] = ~other.loc[late, "skipped"]
    a = prepare_data(_cfg(_csv(tmp_path, df, "a.csv"), kcore=2))
    b = prepare_data(_cfg(_csv(tmp_path, other, "b.csv"), kcore=2))
    assert a.item_vocab.ids == b.item_vocab.ids
    for name in ("items", "offsets", "positive", "timestamps"):
        assert np.array_equal(getattr(a.train, name), getattr(b.train, name))
    assert np.array_equal(a.item_counts, b.item_counts)


# --------------------------------------------------------------------------- relative cut-offs
def test_relative_cut_offs_resolve_to_quantiles_of_the_play_times():
    ts = JAN + np.arange(101) * DAY
    assert resolve_cutoffs(0.8, 0.9, ts) == (JAN + 80 * DAY, JAN + 90 * DAY)
    assert resolve_cutoffs("0.25", ".5", ts) == (JAN + 25 * DAY, JAN + 50 * DAY)
    assert resolve_cutoffs("2020-01-05", "2020-01-06", ts) == (JAN + 4 * DAY, JAN + 5 * DAY)
    # between two plays: linear interpolation, rounded up to the second
    assert resolve_cutoffs(0.25, 0.5, np.array([0, 10])) == (3, 5)
    assert cutoff_fraction("2009") is None and cutoff_fraction(2009) is None
    with pytest.raises(DataError, match="same time|empty"):
        resolve_cutoffs(0.8, 0.9, np.full(10, JAN))


@pytest.mark.parametrize("split", ["time", "next_in_session"])
def test_relative_cut_offs_in_the_pipeline(tmp_path, split):
    df = _hand_log()
    path = _csv(tmp_path, df)
    rel = prepare_data(_cfg(path, split=split, val_cutoff=0.5, test_cutoff="0.9"))
    ts = np.sort(df["timestamp"].to_numpy())
    want = [iso_utc(int(np.ceil(np.quantile(ts, q)))) for q in (0.5, 0.9)]
    resolved = rel.params["resolved_cutoffs"]
    assert [resolved["val_cutoff"], resolved["test_cutoff"]] == want
    assert rel.params["val_cutoff"] == 0.5 and rel.params["test_cutoff"] == 0.9
    assert [rel.report.protocol["val_cutoff"], rel.report.protocol["test_cutoff"]] == want
    assert "quantiles 0.5 / 0.9" in rel.report.format()
    # the same split as the resolved dates
    fixed = prepare_data(_cfg(path, split=split, val_cutoff=want[0], test_cutoff=want[1]))
    for part in ("valid", "test"):
        a, b = getattr(rel, part), getattr(fixed, part)
        assert np.array_equal(a.targets, b.targets) and np.array_equal(a.history, b.history)
    assert np.array_equal(rel.train.items, fixed.train.items)


def test_cache_key_holds_the_new_options(tmp_path):
    path = _csv(tmp_path, _hand_log())
    keys = {
        fingerprint(_cfg(path)),
        fingerprint(_cfg(path, split="time")),
        fingerprint(_cfg(path, val_cutoff=0.8, test_cutoff=0.9)),
        fingerprint(_cfg(path, val_cutoff=0.7, test_cutoff=0.9)),
        fingerprint(_cfg(path, seed=1)),
    }
    assert len(keys) == 5
    text = fingerprint(_cfg(path, val_cutoff="0.8", test_cutoff="0.9"))
    assert text == fingerprint(_cfg(path, val_cutoff=0.8, test_cutoff=0.9))  # one value, one key


# --------------------------------------------------------------------------- errors
def test_no_user_ids_stop_with_what_to_use_instead(tmp_path):
    df = _hand_log().drop(columns="user_id")
    df["session_id"] = (df["timestamp"] // DAY).astype(str)
    with pytest.raises(DataError, match="user_id.*sequence_by=session"):
        prepare_data(_cfg(_csv(tmp_path, df)))
    with pytest.raises(DataError, match="sequence_by=user or auto"):
        _cfg("x", sequence_by="session")


@pytest.mark.parametrize(
    ("val", "test", "match"),
    [
        (1.5, 0.9, "strictly between 0 and 1"),
        (0.0, 0.9, "strictly between 0 and 1"),
        ("0.8", "1", "strictly between 0 and 1"),
        (0.9, 0.8, "earlier than"),
        (0.8, "2020-01-01", "two dates or two fractions"),
        (None, 0.9, "needs data.val_cutoff"),
    ],
)
def test_bad_cut_offs(val, test, match):
    for split in ("time", "next_in_session"):
        with pytest.raises(DataError, match=match):
            DataConfig(split=split, val_cutoff=val, test_cutoff=test)


# --------------------------------------------------------------------------- report, baselines
def test_few_cases_warn():
    data = prepare_data(
        DataConfig(
            options={"preset": "tiny"},
            split="next_in_session",
            val_cutoff=0.8,
            test_cutoff=0.99,
            cache_dir=None,
        )
    )
    assert len(data.test) < MIN_EVAL_QUERIES <= len(data.valid)
    warnings = data.report.warnings()
    assert len(warnings) == 1 and f"only {len(data.test)} test queries" in warnings[0]
    assert "sequence_by: session" not in warnings[0]  # not a way out for this protocol
    assert "WARNING: only" in data.report.format()


def test_baselines_score_the_same_eval_sets():
    data = prepare_data(
        DataConfig(
            options={"preset": "tiny"},
            split="next_in_session",
            val_cutoff=0.7,
            test_cutoff=0.85,
            cache_dir=None,
        )
    )
    assert len(data.test) >= MIN_EVAL_QUERIES
    for model in fit_baselines(data, ("popular", "cooccurrence")):
        ranks = baseline_ranks(model, data.test, filter_seen=False)
        assert ranks.shape == (len(data.test),)
        m = metrics_from_ranks(ranks, [10])
        assert 0.0 <= m["recall@10"] <= 1.0


# --------------------------------------------------------------------------- end to end
def test_fit_with_next_in_session_and_play_signals(tmp_path):
    from twotower.train import fit

    trainer, module, dm = fit(
        [Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"],
        {
            "trainer.max_epochs": 1,
            "trainer.default_root_dir": str(tmp_path / "run"),
            "trainer.logger.init_args.save_dir": str(tmp_path / "run" / "runs"),
            "data.cache_dir": str(tmp_path / "cache"),
            "model.projector_items": 0,
            "data.split": "next_in_session",
            "data.val_cutoff": 0.8,
            "data.test_cutoff": 0.9,
            "data.play_signals": True,
        },
    )
    assert dm.data.params["split"] == "next_in_session"
    assert dm.data.valid.plays is not None and len(dm.data.valid) > 0
    assert "val/ndcg@10" in trainer.callback_metrics
    assert np.isfinite(float(trainer.callback_metrics["val/ndcg@10"]))
    assert module.hparams["play_signals"]
