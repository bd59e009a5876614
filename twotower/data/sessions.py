"""Sessions: order events, recover sessions by an inactivity gap, optional cleaning filters.

The pipeline turns the canonical interactions table into :class:`Events` (integer codes in
numpy arrays) once, and every step after that is vectorised over those arrays. :func:`sessionize`
is the same operation on a DataFrame, for callers and tests that work with tables.

Order: rows of a given ``session_id`` are one session, ordered by timestamp then position. Rows
without a session id are grouped per user and split where the time since the previous play of
that user exceeds the gap (a gap of exactly ``gap_minutes`` stays inside the session). Sessions
are then ordered by user, start time and first appearance, so a user's sessions concatenate into
that user's history in time order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from twotower.data.report import DataReport
from twotower.data.schema import INTERACTION_COLUMNS, DataError, conform_interactions

CONSECUTIVE_REASON = "consecutive repeat of the same track (dedupe_consecutive)"


@dataclass
class Events:
    """Interactions as aligned numpy arrays of integer codes (one entry per row).

    Code and number arrays are int32 when their values fit (int64 otherwise), which halves the
    memory of a 20M-row load.

    Attributes:
        track: Code into ``track_ids``, ``[N]``.
        user: Code into ``user_ids``, ``[N]``, -1 when the row has no user.
        session: Session code, ``[N]``: the given session id's code before
            :func:`sessionize_events`, the dense session number ``0..S-1`` after it (-1 none).
        timestamp: Unix seconds, ``[N]`` int64, -1 unknown.
        position: Order inside a session, ``[N]``, -1 unknown.
        positive: ``[N]`` bool, False for skipped plays.
        hour: Hour of day, ``[N]`` int8, -1 unknown.
        context: Code into ``context_ids``, ``[N]``, -1 unknown.
        row: Row number in the source table, ``[N]``.
        track_ids: Raw track id per code.
        user_ids: Raw user id per code.
        context_ids: Raw context type per code.
    """

    track: np.ndarray
    user: np.ndarray
    session: np.ndarray
    timestamp: np.ndarray
    position: np.ndarray
    positive: np.ndarray
    hour: np.ndarray
    context: np.ndarray
    row: np.ndarray
    track_ids: np.ndarray
    user_ids: np.ndarray
    context_ids: np.ndarray

    _ROW_FIELDS = (
        "track",
        "user",
        "session",
        "timestamp",
        "position",
        "positive",
        "hour",
        "context",
        "row",
    )

    def __len__(self) -> int:
        return len(self.track)

    def take(self, idx: np.ndarray) -> Events:
        """The rows ``idx`` (indices or a boolean mask), code tables shared."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._ROW_FIELDS:
            kw[name] = kw[name][idx]
        return Events(**kw)


def _compact(a: np.ndarray) -> np.ndarray:
    """int32 when the values fit (halves the memory of 20M-row code arrays), else int64."""
    if len(a) == 0 or (a.min() >= np.iinfo(np.int32).min and a.max() <= np.iinfo(np.int32).max):
        return a.astype(np.int32, copy=False)
    return a.astype(np.int64, copy=False)


def run_ids(new: np.ndarray) -> np.ndarray:
    """Dense run numbers ``0..R-1`` from a "row starts a new run" mask (int32 when it fits)."""
    dtype = np.int32 if len(new) < np.iinfo(np.int32).max else np.int64
    out = np.cumsum(new, dtype=dtype)
    out -= 1
    return out


def _codes(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Factorize a column: codes (-1 for missing) and the raw values as strings."""
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    return _compact(codes), np.asarray(uniques.astype(str), dtype=object)


def events_from_frame(df: pd.DataFrame) -> Events:
    """Canonical interactions (see :mod:`twotower.data.schema`) -> :class:`Events`.

    A missing hour is derived from the timestamp (UTC) when that is known.

    Raises:
        DataError: A track id is missing.
    """
    if tuple(df.columns) != INTERACTION_COLUMNS:
        df = conform_interactions(df)
    missing = df["track_id"].isna().to_numpy()
    if missing.any():
        line = int(np.flatnonzero(missing)[0])
        raise DataError(f"interactions: column 'track_id' is empty in row {line} (expected an id)")
    track, track_ids = _codes(df["track_id"])
    user, user_ids = _codes(df["user_id"])
    session, _ = _codes(df["session_id"])
    context, context_ids = _codes(df["context_type"])
    ts = df["timestamp"].to_numpy(dtype=np.int64, na_value=-1)
    pos = _compact(df["position"].to_numpy(dtype=np.int64, na_value=-1))
    hour = df["hour"].to_numpy(dtype=np.int8, na_value=-1)
    derive = (hour < 0) & (ts >= 0)
    if derive.any():
        hour[derive] = ((ts[derive] // 3600) % 24).astype(np.int8)
    return Events(
        track=track,
        user=user,
        session=session,
        timestamp=ts,
        position=pos,
        positive=~df["skipped"].to_numpy(dtype=bool),
        hour=hour,
        context=context,
        row=_compact(np.arange(len(df))),
        track_ids=track_ids,
        user_ids=user_ids,
        context_ids=context_ids,
    )


def _is_lexsorted(keys: list[np.ndarray]) -> bool:
    """Whether rows are already ordered by ``keys`` (primary key first), non-strictly."""
    if len(keys[0]) < 2:
        return True
    tie = np.ones(len(keys[0]) - 1, dtype=bool)
    for k in keys:
        a, b = k[:-1], k[1:]
        if (tie & (b < a)).any():
            return False
        tie &= b == a
    return True


def _order(keys: list[np.ndarray]) -> np.ndarray | None:
    """Stable order by ``keys`` (primary first); None when already in order."""
    if _is_lexsorted(keys):
        return None
    return np.lexsort(keys[::-1])


def sessionize_events(
    ev: Events, gap_minutes: float = 30.0, random_order: bool = False, seed: int = 0
) -> Events:
    """Order events and assign dense session numbers (see the module docstring).

    Args:
        ev: Events from :func:`events_from_frame` (``session`` = given session codes or -1).
        gap_minutes: Inactivity that starts a new session (strictly more than this).
        random_order: The source has no play order (HetRec): every user's rows become one
            session in a random order drawn from ``seed``.
        seed: Seed of the random order.

    Returns:
        The events reordered: by user, session start, then timestamp and position inside each
        session, with ``session`` = ``0..S-1`` in that order.

    Raises:
        DataError: A row has neither a session id nor a user id, or (ordered data) neither a
            timestamp nor a session id with positions.
    """
    n = len(ev)
    if n == 0:
        return ev
    given = ev.session >= 0
    no_user = ~given & (ev.user < 0)
    if no_user.any():
        r = int(ev.row[np.flatnonzero(no_user)[0]])
        raise DataError(
            f"interactions row {r}: neither 'session_id' nor 'user_id' is set "
            "(expected at least one to group plays into sessions)"
        )
    if random_order:
        if not given.all() and (ev.user < 0).any():
            raise DataError("interactions without play order need a 'user_id' on every row")
        rnd = np.random.default_rng(seed).random(n)
        order = np.lexsort((rnd, ev.user))
        ev = ev.take(order)
        new = np.ones(n, dtype=bool)
        new[1:] = ev.user[1:] != ev.user[:-1]
        ev.session = run_ids(new)
        return ev
    no_time = ~given & (ev.timestamp < 0)
    if no_time.any():
        r = int(ev.row[np.flatnonzero(no_time)[0]])
        raise DataError(
            f"interactions row {r}: column 'timestamp' is empty and there is no 'session_id' "
            "(expected a timestamp to find sessions by the inactivity gap)"
        )
    # Pass 1: group rows (given sessions after gap-based users), time order inside a group.
    kind = given.view(np.int8)
    group = np.where(given, ev.session, ev.user)
    order = _order([kind, group, ev.timestamp, ev.position])
    if order is not None:
        ev = ev.take(order)
        kind, group = kind[order], group[order]
    new = np.ones(n, dtype=bool)
    same_group = (group[1:] == group[:-1]) & (kind[1:] == kind[:-1])
    gap = ev.timestamp[1:] - ev.timestamp[:-1]
    by_gap = kind[1:] == 0
    new[1:] = ~same_group | (by_gap & (gap > gap_minutes * 60.0))
    session = run_ids(new)  # [N] session numbers in pass-1 order
    # Pass 2: sessions ordered by user, start time, then pass-1 number.
    starts = np.flatnonzero(new)
    s_user, s_start = ev.user[starts], ev.timestamp[starts]
    s_order = _order([s_user, s_start, np.arange(len(starts))])
    if s_order is not None:
        rank = np.empty(len(starts), dtype=np.int64)
        rank[s_order] = np.arange(len(starts))
        row_order = np.argsort(rank[session], kind="stable")
        ev = ev.take(row_order)
        session = rank[session][row_order]
    ev.session = session
    return ev


def renumber_sessions(ev: Events) -> Events:
    """Make session numbers dense ``0..S-1`` again after rows were removed (order kept)."""
    if len(ev):
        new = np.ones(len(ev), dtype=bool)
        new[1:] = ev.session[1:] != ev.session[:-1]
        ev.session = run_ids(new)
    return ev


def dedupe_consecutive(ev: Events, report: DataReport | None = None) -> Events:
    """Remove a play that repeats the previous track of the same session.

    Each removed row is recorded in ``report`` as dropped with a reason.
    """
    if len(ev) < 2:
        return ev
    rep = np.zeros(len(ev), dtype=bool)
    rep[1:] = (ev.track[1:] == ev.track[:-1]) & (ev.session[1:] == ev.session[:-1])
    if report is not None:
        report.drop(CONSECUTIVE_REASON, int(rep.sum()))
    return renumber_sessions(ev.take(~rep)) if rep.any() else ev


def kcore_reason(k: int) -> str:
    """The report's drop reason of the k-core filter."""
    return f"k-core filter (k={k})"


def kcore_keep(ev: Events, k: int, counted: np.ndarray | None = None) -> np.ndarray:
    """Rows kept by the iterative k-core filter, counting only the rows in ``counted``.

    Owners are users, or sessions for rows without a user. The filter iterates over the
    counted rows alone: a counted row goes when its owner or its track has fewer than ``k``
    live counted rows, until nothing changes. Then:

    * every counted row that did not survive is removed;
    * an owner that had counted rows and lost them all is removed with *all* its rows;
    * a row outside ``counted`` (a validation or test row) is otherwise kept, also when its
      track fell out of the core: the target is then a cold target (a miss), never hidden.
      Owners without any counted row (a listener first seen after the validation cut-off, a
      validation session) are outside the filter and kept.

    With ``counted=None`` every row counts (the classic k-core of the whole table).

    Args:
        ev: Sessionized events.
        k: Minimum rows per owner and per track (``k <= 1``: keep everything).
        counted: ``[N]`` bool, the training rows; None for all rows.

    Returns:
        ``[N]`` bool mask of the kept rows.
    """
    n = len(ev)
    keep = np.ones(n, dtype=bool)
    if k <= 1 or n == 0:
        return keep
    counted = keep.copy() if counted is None else np.asarray(counted, dtype=bool)
    # users by code; user-less rows by session, shifted past the user codes
    owner = np.where(ev.user >= 0, ev.user, len(ev.user_ids) + ev.session.astype(np.int64))
    n_owner = int(owner.max()) + 1
    judged = np.bincount(owner[counted], minlength=n_owner) > 0  # owners with counted rows
    live = counted.copy()
    while live.any():
        owner_n = np.bincount(owner[live], minlength=n_owner)
        track_n = np.bincount(ev.track[live], minlength=len(ev.track_ids))
        bad = live & ((owner_n[owner] < k) | (track_n[ev.track] < k))
        if not bad.any():
            break
        live &= ~bad
    owner_gone = judged & (np.bincount(owner[live], minlength=n_owner) == 0)
    return live | (~counted & ~owner_gone[owner])


def kcore(
    ev: Events, k: int, report: DataReport | None = None, counted: np.ndarray | None = None
) -> Events:
    """Iteratively keep rows whose owner and track both have at least ``k`` rows.

    Rows without a user are grouped by session instead. Removed rows are recorded in
    ``report`` as dropped with reason ``"k-core filter (k=K)"``. See :func:`kcore_keep` for
    ``counted`` (count the training rows only: what the pipeline does, so that plays after
    the split's cut never decide what survives).
    """
    if k <= 1 or len(ev) == 0:
        return ev
    keep = kcore_keep(ev, k, counted)
    if report is not None:
        report.drop(kcore_reason(k), int((~keep).sum()))
    return renumber_sessions(ev.take(keep)) if not keep.all() else ev


def sessionize(
    df: pd.DataFrame,
    gap_minutes: float = 30.0,
    dedupe: bool = False,
    k: int = 0,
    report: DataReport | None = None,
) -> pd.DataFrame:
    """Order a canonical interactions table and number its sessions.

    Args:
        df: Canonical interactions (:func:`~twotower.data.schema.conform_interactions`).
        gap_minutes: Inactivity (strictly more than this) that starts a new session.
        dedupe: Remove consecutive repeats of a track inside a session.
        k: Iterative k-core filter on users (sessions when there are none) and tracks; 0 off.
        report: Receives the dropped rows by reason.

    Returns:
        The kept rows reordered (user, session start, timestamp, position), index reset, with
        an int64 column ``session`` (``0..S-1`` in that order); ``session_id`` is left as given.
    """
    df = conform_interactions(df)
    ev = sessionize_events(events_from_frame(df), gap_minutes)
    if dedupe:
        ev = dedupe_consecutive(ev, report)
    ev = kcore(ev, k, report)
    out = df.take(ev.row).reset_index(drop=True)
    out["session"] = ev.session
    return out
