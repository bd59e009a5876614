from __future__ import annotations

import numpy as np

from twotower.data.report import DataReport
from twotower.data.splits import (
    HELD_OUT,
    NO_HISTORY_REASON,
    SHORT_REASON,
    SHORT_SESSION_REASON,
    TEST,
    TRAIN,
    VALID,
    build_eval_set,
    build_sequences,
    leave_last_out,
    sequence_ids,
    time_split,
)

T, V, X, H = TRAIN, VALID, TEST, HELD_OUT


def test_sequence_ids():
    assert sequence_ids(np.array([5, 5, 2, 2, 2, 7])).tolist() == [0, 0, 1, 1, 1, 2]


def test_leave_last_out_expected_roles():
    # seq 0: items a b c d e f; e skipped (after the validation target) -> held out
    #        positives a b c d f -> valid d, test f
    # seq 1: 2 positives + 1 skip -> all training
    # seq 2: p p s p s -> valid = 2nd p (row 1), test = last p (row 3); rows 2, 4 held out
    seq = np.array([0] * 6 + [1] * 3 + [2] * 5)
    pos = np.array([1, 1, 1, 1, 0, 1] + [1, 0, 1] + [1, 1, 0, 1, 0], dtype=bool)
    rep = DataReport()
    roles = leave_last_out(seq, pos, rep)
    assert roles.tolist() == [T, T, T, V, H, X] + [T, T, T] + [T, V, H, X, H]
    assert rep.counted == {SHORT_REASON: 3}


def test_leave_last_out_skipped_before_validation_stays_in_training():
    seq = np.zeros(6, dtype=np.int64)
    pos = np.array([1, 0, 1, 0, 1, 1], dtype=bool)
    assert leave_last_out(seq, pos).tolist() == [T, T, T, T, V, X]


def test_time_split_user_sequences():
    day = 86_400
    val, test = 10 * day, 20 * day
    # seq 0: two train events, skipped at day 11, positives at day 12 (valid) and 13 (held
    #        out), 21 (test), 22 (held out)
    # seq 1: no training event: its first positive in the valid window has no history
    # seq 2: only training events
    seq = np.array([0] * 7 + [1] * 2 + [2] * 2)
    ts = np.array([1, 2, 11, 12, 13, 21, 22] + [15, 25] + [3, 4]) * day
    pos = np.array([1, 1, 0, 1, 1, 1, 1] + [1, 1] + [1, 1], dtype=bool)
    rep = DataReport()
    roles = time_split(seq, pos, ts, val, test, by_session=False, report=rep)
    # seq 1: day-15 target has no earlier positive -> held out; the day-25 test target has
    # the day-15 event as history -> kept
    assert roles.tolist() == [T, T, H, V, H, X, H] + [H, X] + [T, T]
    assert rep.counted == {NO_HISTORY_REASON: 1}


def test_time_split_session_sequences():
    day = 86_400
    seq = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3])
    ts = np.array([1, 11, 12, 12, 12, 25, 25, 25, 15]) * day  # session 0 starts before val
    pos = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=bool)
    rep = DataReport()
    roles = time_split(seq, pos, ts, 10 * day, 20 * day, by_session=True, report=rep)
    # session 1 (valid): last positive = row 3; session 2 (test): last positive = row 7;
    # session 3 (valid) has a single positive -> nothing to evaluate
    assert roles.tolist() == [T, T, H, V, H, H, H, X, H]
    assert rep.counted == {SHORT_SESSION_REASON: 1}


def test_build_eval_set_histories_and_seen():
    # one sequence: items 5 6 (skip 7) 5 8 9 ; targets at row 4 (valid) and row 5 (test)
    seq = np.zeros(6, dtype=np.int64)
    items = np.array([5, 6, 7, 5, 8, 9])
    pos = np.array([1, 1, 0, 1, 1, 1], dtype=bool)
    users = np.full(6, 2)
    hours = np.arange(6, dtype=np.int8)
    ctx = np.array([0, 0, 0, 0, 3, 4])
    es = build_eval_set(np.array([4, 5]), seq, pos, items, users, hours, ctx, max_history=10)
    assert es.targets.tolist() == [8, 9]
    assert es.history[es.offsets[0] : es.offsets[1]].tolist() == [5, 6, 5]  # skip excluded
    assert es.history[es.offsets[1] : es.offsets[2]].tolist() == [5, 6, 5, 8]
    assert es.seen[es.seen_offsets[0] : es.seen_offsets[1]].tolist() == [5, 6]
    assert es.seen[es.seen_offsets[1] : es.seen_offsets[2]].tolist() == [5, 6, 8]
    assert es.hours.tolist() == [4, 5] and es.contexts.tolist() == [3, 4]
    assert es.users.tolist() == [2, 2]
    short = build_eval_set(np.array([5]), seq, pos, items, users, hours, ctx, max_history=2)
    assert short.history.tolist() == [5, 8]  # the most recent two
    assert short.seen.tolist() == [5, 6, 8]  # seen covers the full history


def test_build_eval_set_histories_stay_inside_their_sequence_and_drop_oov_from_seen():
    seq = np.array([0, 0, 1, 1, 1])
    items = np.array([4, 5, 1, 6, 7])  # item 1 = OOV
    pos = np.ones(5, dtype=bool)
    z = np.zeros(5, dtype=np.int64)
    es = build_eval_set(np.array([4]), seq, pos, items, z, z.astype(np.int8), z, 200)
    assert es.history.tolist() == [1, 6]
    assert es.seen.tolist() == [6]


def test_build_sequences():
    seq = np.array([0, 0, 0, 1, 1, 2])
    roles = np.array([T, T, V, H, H, T])
    rows = np.flatnonzero(roles == T)
    items = np.array([3, 4, 5, 6, 7, 8])
    users = np.array([2, 2, 2, 3, 3, 4])
    s = build_sequences(
        rows,
        seq,
        items,
        users,
        np.arange(6, dtype=np.int8),
        np.zeros(6, dtype=np.int64),
        np.array([1, 0, 1, 1, 1, 1], dtype=bool),
        np.arange(6) * 10,
    )
    assert s.items.tolist() == [3, 4, 8]
    assert s.offsets.tolist() == [0, 2, 3]
    assert s.users.tolist() == [2, 4]
    assert s.positive.tolist() == [True, False, True]
    assert s.timestamps.tolist() == [0, 10, 50]
