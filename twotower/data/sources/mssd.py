"""Spotify Music Streaming Sessions Dataset (sequential skip prediction challenge).

``path`` is a folder searched recursively for ``log_*.csv`` session logs and ``tf_*.csv`` track
features, or one log file (its sibling ``tf_*.csv`` files are then used too). Sessions have no
listener: ``user_id`` is <NA>; the order inside a session is ``session_position``, and the
timestamp is midnight UTC of the session's ``date`` (the logs carry no time of day besides
``hour_of_day``).

A skipped play stays in the data as a signal (``skipped=True``), never as a training target, and
is counted in the report. ``skip_column`` chooses the definition: ``"not_skipped"`` (default:
skipped = not not_skipped, i.e. the track was not played to the end) or one of ``skip_1``,
``skip_2``, ``skip_3`` (skipped = that flag).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twotower.data.report import DataReport
from twotower.data.schema import DataError, LoadResult
from twotower.data.sources.common import (
    SKIPPED_PLAY,
    BadLines,
    Table,
    bool_column,
    check_options,
    concat,
    drop_duplicates,
    find_files,
    finish,
    float_column,
    handle_empty,
    int_column,
    iso_seconds,
    read_table,
    text_column,
)

LOG_COLUMNS = (
    "session_id",
    "session_position",
    "track_id_clean",
    "hour_of_day",
    "date",
    "context_type",
)
SKIP_COLUMNS = ("not_skipped", "skip_1", "skip_2", "skip_3")
OPTIONS = ("skip_column", "encoding", "bad_lines", "on_empty", "tracks_path")


def _log_files(path: str | None, tracks_path: str | None) -> tuple[list[Path], list[Path]]:
    logs = find_files(path, ("log_*.csv",), "Spotify MSSD session logs log_*.csv")
    if tracks_path is not None:
        tfs = find_files(tracks_path, ("tf_*.csv",), "Spotify MSSD track features tf_*.csv")
    elif Path(str(path)).is_dir():
        tfs = sorted(f for f in Path(str(path)).rglob("tf_*.csv") if f.is_file())
    else:
        tfs = sorted(f for f in Path(str(path)).parent.glob("tf_*.csv") if f.is_file())
    return logs, tfs


def _read_log(
    f: Path,
    skip_column: str,
    encoding: str,
    bad_lines: BadLines,
    on_empty: str,
    report: DataReport,
) -> pd.DataFrame:
    before = report.rows_dropped
    t = read_table(
        f,
        sep=",",
        header=True,
        quoted=True,
        kinds={"session_position": "int", "hour_of_day": "int"},
        encoding=encoding,
        bad_lines=bad_lines,
        report=report,
        required=[*LOG_COLUMNS, skip_column],
    )
    report.rows_read += len(t) + report.rows_dropped - before
    t = handle_empty(t, "session_id", report, on_empty)
    t = handle_empty(t, "track_id_clean", report, on_empty, reason="empty track_id")
    position = int_column(t, "session_position", min_value=0, what="a session position")
    hour = int_column(t, "hour_of_day", min_value=0, max_value=23, what="an hour 0..23")
    flag = bool_column(t, skip_column)
    skipped = ~flag if skip_column == "not_skipped" else flag
    date = text_column(t, "date")
    ts = _date_seconds(t, date)
    context = text_column(t, "context_type")
    return pd.DataFrame(
        {
            "session_id": text_column(t, "session_id"),
            "position": pd.array(position, dtype="Int64"),
            "track_id": text_column(t, "track_id_clean"),
            "skipped": skipped,
            "hour": pd.array(hour, dtype="Int8"),
            "context_type": context.where(context != "", None),
            "timestamp": pd.array(ts, dtype="Int64"),
        }
    )


def _date_seconds(t: Table, date: pd.Series) -> np.ndarray:
    """``YYYY-MM-DD`` to midnight UTC in unix seconds (parsed once per distinct date)."""
    codes, uniques = pd.factorize(date)
    sub = Table(t.path, pd.DataFrame({"date": uniques}), None)
    try:
        secs = iso_seconds(sub, "date", pd.Series(uniques, dtype="str"), fmt="%Y-%m-%d")
    except DataError:
        # locate the first row with the bad date for the message
        for_row = pd.to_datetime(date, format="%Y-%m-%d", errors="coerce", utc=True)
        i = int(np.flatnonzero(for_row.isna().to_numpy())[0])
        raise t.error(i, "date", f"expected a date YYYY-MM-DD, got {date.iloc[i]!r}") from None
    out = secs[codes]
    if (out < 0).any():
        i = int(np.flatnonzero(out < 0)[0])
        raise t.error(i, "date", f"expected a date on or after 1970-01-01, got {date.iloc[i]!r}")
    return out


def _read_features(f: Path, encoding: str, report: DataReport) -> pd.DataFrame:
    t = read_table(
        f,
        sep=",",
        header=True,
        quoted=True,
        encoding=encoding,
        report=report,
        required=["track_id"],
    )
    empty = text_column(t, "track_id") == ""
    if empty.any():
        raise t.error(int(np.flatnonzero(empty.to_numpy())[0]), "track_id", "empty track id")
    out: dict[str, Any] = {"track_id": text_column(t, "track_id")}
    for col in t.df.columns:
        if col == "track_id":
            continue
        if col == "release_year":
            out["year"] = pd.array(
                int_column(t, col, min_value=0, max_value=9999, what="a year"), dtype="Int16"
            )
        elif col == "mode":
            low = text_column(t, col).str.lower()
            ok = low.isin(["major", "minor", "1", "0"]).to_numpy()
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise t.error(i, col, f"expected major/minor, got {t.df[col].iloc[i]!r}")
            out["f_mode"] = low.isin(["major", "1"]).to_numpy().astype(np.float32)
        else:
            out[f"f_{col}"] = float_column(t, col).astype(np.float32)
    return pd.DataFrame(out)


def load(path: str | None, columns: dict[str, str] | None = None, **options: Any) -> LoadResult:
    """Load MSSD session logs (and track features when present).

    Args:
        path: Folder with ``log_*.csv`` (and ``tf_*.csv``), or one log file.
        columns: Not used (fixed columns); must be None.
        **options: ``skip_column`` (``"not_skipped"`` default, or ``skip_1``/``skip_2``/
            ``skip_3``), ``encoding`` (default ``"utf-8"``), ``bad_lines`` (``"error"`` or
            ``"drop"``), ``on_empty`` (rows with an empty session or track id: ``"drop"``
            (default, counted) or ``"error"``), ``tracks_path`` (track features elsewhere).

    Returns:
        Interactions with session_id, position, track_id, skipped, hour, context_type and the
        day as timestamp (``user_id`` <NA>); tracks with ``year`` and ``f_*`` audio features
        (``mode``: major 1, minor 0).

    Raises:
        DataError: Missing files or columns, bad booleans, positions, hours or dates.
    """
    check_options("mssd", options, OPTIONS)
    if columns:
        raise DataError("mssd: the columns are fixed; do not pass a column mapping")
    skip_column = options.get("skip_column", "not_skipped")
    if skip_column not in SKIP_COLUMNS:
        raise DataError(
            f"mssd: skip_column must be one of {list(SKIP_COLUMNS)}, got {skip_column!r}"
        )
    encoding = options.get("encoding") or "utf-8"
    bad_lines: BadLines = options.get("bad_lines", "error")
    on_empty = options.get("on_empty", "drop")
    logs, tfs = _log_files(path, options.get("tracks_path"))

    report = DataReport()
    frames = [_read_log(f, skip_column, encoding, bad_lines, on_empty, report) for f in logs]
    interactions = drop_duplicates(concat(frames), report)
    report.count(SKIPPED_PLAY, int(interactions["skipped"].sum()) if len(interactions) else 0)
    repeated = interactions.duplicated(["session_id", "position"]).to_numpy()
    report.count("repeated (session_id, position) with different content", int(repeated.sum()))

    tracks = concat([_read_features(f, encoding, report) for f in tfs], ["track_id"])
    if len(tfs) and len(tracks):
        dup = tracks["track_id"].duplicated().to_numpy()
        if dup.any():
            report.notes.append(f"{int(dup.sum())} repeated track ids in tf_*.csv, first kept")
            tracks = tracks[~dup].reset_index(drop=True)
        known = interactions["track_id"].isin(tracks["track_id"]).to_numpy()
        report.count("track without metadata", int((~known).sum()))
    elif not tfs:
        report.notes.append("no tf_*.csv track features found: tracks without metadata")
    report.notes.append("timestamps are the session's date at midnight UTC; order = position")
    return finish(interactions, tracks, report, source="mssd", files=[*logs, *tfs], ordered=True)
