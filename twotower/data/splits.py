"""Train / validation / test splits of ordered event sequences, and their CSR arrays.

Every function here works on rows that are already in sequence order (see
:mod:`twotower.data.sessions`): ``seq`` is a dense, non-decreasing sequence number per row. A
split assigns each row a role: training event, validation target, test target, or held out
(a row after the validation target that is neither a target nor training, e.g. a skipped play
between the two targets). Histories of validation and test examples are always *the positive
events of the same sequence before the target*, so one builder serves every split.

Three protocols: :func:`leave_last_out`, :func:`time_split` (global cut-off dates) and, for
listening logs, :func:`next_in_session`: the next track of the listener's current session given
the listener's whole earlier history (earlier sessions included, the boundaries marked by the
per-play gaps), forward in time, one case per validation / test session.

Leakage: the split itself never looks at items; the pipeline builds the item vocabulary from
the training rows only, so a track first seen after the cut maps to OOV in histories and
targets. :func:`split_events` runs the optional k-core filter *after* the roles are known and
counts training rows only, so plays of the validation / test period (or the held-out plays of a
leave-last-out sequence) never decide which users and tracks survive it.
"""

from __future__ import annotations

import numpy as np

from twotower.data.prepared import EvalSet, Sequences
from twotower.data.report import DataReport
from twotower.data.sessions import Events, kcore_keep, kcore_reason, renumber_sessions, run_ids
from twotower.ids import OOV
from twotower.query import play_gaps

TRAIN, VALID, TEST, HELD_OUT = 0, 1, 2, 3
SHORT_REASON = "row of a sequence with < 3 positives (training only)"
NO_HISTORY_REASON = "evaluation target without any earlier positive (not evaluated)"
SHORT_SESSION_REASON = "row of an evaluation session with < 2 positives (not evaluated)"
NO_CASE_SESSION_REASON = (
    "validation/test session with < 2 positives: no case (sessions; their plays stay as history)"
)
#: Split kinds; ``time`` and ``next_in_session`` need cut-offs.
SPLITS = ("leave_last_out", "time", "next_in_session")


def sequence_ids(boundary_key: np.ndarray) -> np.ndarray:
    """Dense sequence numbers from a per-row key that is constant within a sequence.

    Args:
        boundary_key: E.g. the user code (user sequences) or session number (session
            sequences), rows already grouped.
    """
    if len(boundary_key) == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(len(boundary_key), dtype=bool)
    new[1:] = boundary_key[1:] != boundary_key[:-1]
    return run_ids(new)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """Distinct values, ascending (sort-based: faster than ``np.unique`` on large int arrays)."""
    if len(values) == 0:
        return values
    v = np.sort(values)
    keep = np.ones(len(v), dtype=bool)
    keep[1:] = v[1:] != v[:-1]
    return v[keep]


def _starts(seq: np.ndarray) -> np.ndarray:
    """Row offsets ``[S + 1]`` of each sequence."""
    n_seq = int(seq[-1]) + 1 if len(seq) else 0
    off = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(np.bincount(seq, minlength=n_seq), out=off[1:])
    return off


def _positive_rank(seq: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, ...]:
    """Positive rows, their rank inside their sequence, and positives per sequence."""
    n_seq = int(seq[-1]) + 1 if len(seq) else 0
    pos_rows = np.flatnonzero(positive)
    npos = np.bincount(seq[pos_rows], minlength=n_seq)
    first = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(npos, out=first[1:])
    rank = np.arange(len(pos_rows)) - first[seq[pos_rows]]
    return pos_rows, rank, npos


def _count(report: DataReport | None, flags: dict[str, np.ndarray]) -> None:
    """Count the flagged rows of every reason into ``report``."""
    if report is not None:
        for reason, mask in flags.items():
            report.count(reason, int(mask.sum()))


def _leave_last_out(
    seq: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Roles of :func:`leave_last_out` and the rows flagged per report reason."""
    n = len(seq)
    roles = np.full(n, TRAIN, dtype=np.int8)
    if n == 0:
        return roles, {}
    pos_rows, rank, npos = _positive_rank(seq, positive)
    s = seq[pos_rows]
    ok = npos[s] >= 3
    test_rows = pos_rows[ok & (rank == npos[s] - 1)]
    val_rows = pos_rows[ok & (rank == npos[s] - 2)]
    cut = np.full(len(npos), n, dtype=np.int64)
    cut[seq[val_rows]] = val_rows
    roles[np.arange(n) >= cut[seq]] = HELD_OUT
    roles[val_rows] = VALID
    roles[test_rows] = TEST
    return roles, {SHORT_REASON: npos[seq] < 3}


def leave_last_out(
    seq: np.ndarray, positive: np.ndarray, report: DataReport | None = None
) -> np.ndarray:
    """Last positive -> test, second-to-last -> validation, everything before -> training.

    Sequences with fewer than 3 positives go wholly to training (counted in ``report``).
    Rows after the validation target other than the test target (skipped plays) are held out.

    Returns:
        Role per row (:data:`TRAIN`, :data:`VALID`, :data:`TEST`, :data:`HELD_OUT`), int8.
    """
    roles, flags = _leave_last_out(seq, positive)
    _count(report, flags)
    return roles


def _without_history(seq: np.ndarray, positive: np.ndarray, roles: np.ndarray) -> np.ndarray:
    """Validation / test targets without any earlier positive in their sequence."""
    off = _starts(seq)
    targets = np.flatnonzero((roles == VALID) | (roles == TEST))
    pos_before = np.cumsum(positive) - positive  # positives strictly before each row
    seq_pos_before = pos_before[targets] - pos_before[off[seq[targets]]]
    empty = np.zeros(len(seq), dtype=bool)
    empty[targets[seq_pos_before == 0]] = True
    return empty


def _time_split(
    seq: np.ndarray,
    positive: np.ndarray,
    timestamp: np.ndarray,
    val_cutoff: int,
    test_cutoff: int,
    by_session: bool,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Roles of :func:`time_split` and the rows flagged per report reason."""
    n = len(seq)
    roles = np.full(n, HELD_OUT, dtype=np.int8)
    if n == 0:
        return roles, {}
    off = _starts(seq)
    if by_session:
        start_ts = timestamp[off[:-1]]  # [S]
        part = np.where(start_ts < val_cutoff, TRAIN, np.where(start_ts < test_cutoff, VALID, TEST))
        row_part = part[seq]
        roles[row_part == TRAIN] = TRAIN
        pos_rows, rank, npos = _positive_rank(seq, positive)
        s = seq[pos_rows]
        last = pos_rows[(rank == npos[s] - 1) & (npos[s] >= 2) & (part[s] != TRAIN)]
        roles[last] = row_part[last]
        short = (part != TRAIN) & (npos < 2)
        return roles, {SHORT_SESSION_REASON: short[seq]}
    roles[timestamp < val_cutoff] = TRAIN
    for role, lo, hi in ((VALID, val_cutoff, test_cutoff), (TEST, test_cutoff, None)):
        cand = positive & (timestamp >= lo)
        if hi is not None:
            cand &= timestamp < hi
        rows = np.flatnonzero(cand)  # seq is non-decreasing: first row of each run
        first = np.ones(len(rows), dtype=bool)
        first[1:] = seq[rows][1:] != seq[rows][:-1]
        roles[rows[first]] = role
    # A target needs at least one positive before it in its sequence.
    empty = _without_history(seq, positive, roles)
    roles[empty] = HELD_OUT
    return roles, {NO_HISTORY_REASON: empty}


def time_split(
    seq: np.ndarray,
    positive: np.ndarray,
    timestamp: np.ndarray,
    val_cutoff: int,
    test_cutoff: int,
    by_session: bool,
    report: DataReport | None = None,
) -> np.ndarray:
    """Global cut-off dates.

    User sequences (``by_session=False``): training = events before ``val_cutoff``; the first
    positive in ``[val_cutoff, test_cutoff)`` is the validation target and the first positive at
    or after ``test_cutoff`` the test target (histories: every positive event before them).
    Session sequences: a session belongs to the part in which it starts; in validation and test
    sessions the last positive is the target given the positives before it.

    Targets without an earlier positive in their sequence cannot be evaluated: they are held out
    and counted in ``report``.

    Returns:
        Role per row, int8.
    """
    roles, flags = _time_split(seq, positive, timestamp, val_cutoff, test_cutoff, by_session)
    _count(report, flags)
    return roles


def _next_in_session(
    session: np.ndarray,
    positive: np.ndarray,
    timestamp: np.ndarray,
    val_cutoff: int,
    test_cutoff: int,
    seed: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Roles of :func:`next_in_session` and the rows of its case-less evaluation sessions."""
    n = len(session)
    roles = np.full(n, HELD_OUT, dtype=np.int8)
    if n == 0:
        return roles, {}
    off = _starts(session)
    start_ts = timestamp[off[:-1]]  # [S] the period of a session is that of its first play
    part = np.where(start_ts < val_cutoff, TRAIN, np.where(start_ts < test_cutoff, VALID, TEST))
    roles[part[session] == TRAIN] = TRAIN
    pos_rows, rank, npos = _positive_rank(session, positive)
    # one target per evaluation session: a positive at rank 1..npos-1, uniform, seeded
    u = np.random.default_rng(seed).random(len(npos))  # [S] one draw per session
    pick = 1 + np.minimum((u * (npos - 1)).astype(np.int64), np.maximum(npos - 2, 0))  # [S]
    s = session[pos_rows]
    target = pos_rows[(rank == pick[s]) & (npos[s] >= 2) & (part[s] != TRAIN)]
    roles[target] = part[session[target]]
    short = (part != TRAIN) & (npos < 2)  # [S]
    return roles, {NO_CASE_SESSION_REASON: short[session]}


def next_in_session(
    session: np.ndarray,
    positive: np.ndarray,
    timestamp: np.ndarray,
    val_cutoff: int,
    test_cutoff: int,
    seed: int = 0,
    report: DataReport | None = None,
) -> np.ndarray:
    """The next track of the current session, forward in time (rows in user sequence order).

    A session belongs to the period in which it starts: training (before ``val_cutoff``),
    validation (before ``test_cutoff``) or test. Every row of a training session is a training
    event. Each validation / test session gives one case: a positive at a seeded-random
    position among the session's positives that have an earlier positive in the same session;
    its other rows are held out (never training), and they stay in the histories of later
    cases because the history is the listener's whole sequence before the target (build it
    with user sequences). Sessions with fewer than 2 positives give no case and are counted in
    ``report`` (as sessions).

    Args:
        session: Dense, non-decreasing session number per row; rows of one listener contiguous
            and in time order.
        positive: ``[N]`` bool, False for skipped plays.
        timestamp: ``[N]`` unix seconds.
        val_cutoff: Unix seconds that start validation.
        test_cutoff: Unix seconds that start test.
        seed: Seed of the target positions.
        report: Receives the count of case-less evaluation sessions.

    Returns:
        Role per row, int8.
    """
    roles, flags = _next_in_session(session, positive, timestamp, val_cutoff, test_cutoff, seed)
    _count_sessions(report, session, flags)
    return roles


def _count_sessions(
    report: DataReport | None, session: np.ndarray, flags: dict[str, np.ndarray]
) -> None:
    """Count the distinct sessions of the flagged rows of every reason into ``report``."""
    if report is not None:
        for reason, mask in flags.items():
            report.count(reason, len(sorted_unique(session[mask])))


def split_events(
    ev: Events,
    sequence_by: str,
    cutoffs: tuple[int, int] | None = None,
    k: int = 0,
    report: DataReport | None = None,
    split: str | None = None,
    seed: int = 0,
) -> tuple[Events, np.ndarray, np.ndarray]:
    """Split sessionized events, then k-core filter them counting training rows only.

    The roles come first, from all rows: leave-last-out (``cutoffs=None``), the time split
    (``cutoffs = (val_cutoff, test_cutoff)``) or :func:`next_in_session` (``split`` given,
    user sequences). The k-core filter (:func:`kcore_keep`) then counts the training rows
    alone, so no play of the validation or test period, and no held-out play of a
    leave-last-out sequence, decides which users and tracks survive: a track popular only
    after the cut does not enter the vocabulary through its later plays.
    The roles of the kept rows do not change; validation and test rows are removed only with
    their whole owner (user, or session without a user) when the filter removes it, so a
    target whose track fell out of the core stays and counts as a cold target (a miss). A
    target left without any earlier positive is held out and counted.

    Args:
        ev: Sessionized (and deduplicated) events, in sequence order.
        sequence_by: ``"user"`` or ``"session"``.
        cutoffs: Unix seconds of the validation and test cut-offs; None for leave-last-out.
        k: Minimum training rows per owner and per track (``k <= 1``: no filter).
        report: Receives the k-core drops and the split's flagged rows.
        split: One of :data:`SPLITS`; None: ``time`` with cut-offs, else ``leave_last_out``.
        seed: Seed of the ``next_in_session`` target positions.

    Returns:
        ``(events kept, sequence number per row, role per row)``.
    """
    seq = sequence_ids(ev.user if sequence_by == "user" else ev.session)
    split = split or ("leave_last_out" if cutoffs is None else "time")
    flags: dict[str, np.ndarray] = {}  # counted as rows
    per_session: dict[str, np.ndarray] = {}  # counted as sessions
    if split == "next_in_session":
        if sequence_by != "user" or cutoffs is None:
            raise ValueError("next_in_session needs user sequences and cut-offs")
        roles, per_session = _next_in_session(
            ev.session, ev.positive, ev.timestamp, cutoffs[0], cutoffs[1], seed
        )
    elif cutoffs is None:
        roles, flags = _leave_last_out(seq, ev.positive)
    else:
        roles, flags = _time_split(
            seq,
            ev.positive,
            ev.timestamp,
            cutoffs[0],
            cutoffs[1],
            by_session=sequence_by == "session",
        )
    if k > 1 and len(ev):
        keep = kcore_keep(ev, k, roles == TRAIN)
        if report is not None:
            report.drop(kcore_reason(k), int((~keep).sum()))
        if not keep.all():
            ev = renumber_sessions(ev.take(keep))
            roles = roles[keep]
            flags = {reason: mask[keep] for reason, mask in flags.items()}
            per_session = {reason: mask[keep] for reason, mask in per_session.items()}
            seq = sequence_ids(ev.user if sequence_by == "user" else ev.session)
            empty = _without_history(seq, ev.positive, roles)
            roles[empty] = HELD_OUT
            flags[NO_HISTORY_REASON] = flags.get(NO_HISTORY_REASON, empty) | empty
    _count(report, flags)
    _count_sessions(report, ev.session, per_session)
    return ev, seq, roles


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(lo[i], hi[i])`` for all i, and CSR offsets."""
    lengths = np.maximum(hi - lo, 0)
    off = np.zeros(len(lo) + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    idx = np.repeat(lo - off[:-1], lengths) + np.arange(off[-1])
    return idx, off


def build_eval_set(
    target_rows: np.ndarray,
    seq: np.ndarray,
    positive: np.ndarray,
    items: np.ndarray,
    users: np.ndarray,
    hours: np.ndarray,
    contexts: np.ndarray,
    max_history: int,
    timestamps: np.ndarray | None = None,
) -> EvalSet:
    """Next-item examples for the rows ``target_rows``.

    Args:
        target_rows: Row index of each target, increasing.
        seq: Sequence number per row.
        positive: Positive flag per row.
        items: Item index per row (already mapped through the training vocabulary).
        users: User index per row.
        hours: Hour of day per row.
        contexts: Context index per row.
        max_history: Events kept in each history (the most recent ones).
        timestamps: Unix seconds per row (-1 unknown); given, the set also holds every play
            before each target with its skipped flag, gap bucket and time (``plays``).
    """
    off = _starts(seq)
    pos_rows = np.flatnonzero(positive)
    hi = np.searchsorted(pos_rows, target_rows)  # positives strictly before the target
    lo_full = np.searchsorted(pos_rows, off[seq[target_rows]])
    lo = np.maximum(lo_full, hi - max_history)
    h_idx, h_off = _ranges(lo, hi)
    history = items[pos_rows[h_idx]]
    # seen: every distinct real item of the full history, sorted per query.
    s_idx, s_off = _ranges(lo_full, hi)
    n_items = int(items.max()) + 1 if len(items) else 2
    # (query, item) keys; int32 when they fit: sorting them is the main cost here
    kdt = np.int32 if len(target_rows) * n_items < np.iinfo(np.int32).max else np.int64
    q = np.repeat(np.arange(len(target_rows), dtype=kdt), np.diff(s_off))
    seen_items = items[pos_rows[s_idx]].astype(kdt, copy=False)
    keep = seen_items > OOV
    key = sorted_unique(q[keep] * kdt(n_items) + seen_items[keep])
    seen_q, seen = key // n_items, key % n_items
    seen_off = np.zeros(len(target_rows) + 1, dtype=np.int64)
    np.cumsum(np.bincount(seen_q, minlength=len(target_rows)), out=seen_off[1:])
    plays: dict[str, np.ndarray] = {}
    if timestamps is not None:
        first = np.zeros(len(seq), dtype=bool)
        first[off[:-1][off[:-1] < len(seq)]] = True
        gaps = play_gaps(timestamps, first).astype(np.int8)  # [N]
        p_lo = np.maximum(off[seq[target_rows]], target_rows - max_history)
        p_idx, p_off = _ranges(p_lo, target_rows)  # every row of the sequence before the target
        plays = {
            "plays": items[p_idx].astype(np.int64),
            "plays_offsets": p_off,
            "plays_skipped": (~positive[p_idx].astype(bool)).astype(np.int8),
            "plays_gaps": gaps[p_idx],
            "request_gaps": gaps[target_rows],
            "plays_timestamps": np.asarray(timestamps, dtype=np.int64)[p_idx],
            "target_timestamps": np.asarray(timestamps, dtype=np.int64)[target_rows],
        }
    return EvalSet(
        history=history.astype(np.int64),
        offsets=h_off,
        targets=items[target_rows].astype(np.int64),
        users=users[target_rows].astype(np.int64),
        hours=hours[target_rows].astype(np.int8),
        contexts=contexts[target_rows].astype(np.int64),
        seen=seen.astype(np.int64),
        seen_offsets=seen_off,
        **plays,
    )


def build_sequences(
    train_rows: np.ndarray,
    seq: np.ndarray,
    items: np.ndarray,
    users: np.ndarray,
    hours: np.ndarray,
    contexts: np.ndarray,
    positive: np.ndarray,
    timestamps: np.ndarray,
) -> Sequences:
    """Training sequences in CSR layout from the training rows (in order).

    Sequences without training rows are left out; ``users`` of a sequence is the user index of
    its first row.
    """
    s = seq[train_rows]
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] != s[:-1]
    starts = np.flatnonzero(new)
    offsets = np.append(starts, len(s)).astype(np.int64)
    return Sequences(
        items=items[train_rows].astype(np.int64),
        offsets=offsets,
        users=users[train_rows[starts]].astype(np.int64),
        hours=hours[train_rows].astype(np.int8),
        contexts=contexts[train_rows].astype(np.int64),
        positive=positive[train_rows].astype(bool),
        timestamps=timestamps[train_rows].astype(np.int64),
    )
