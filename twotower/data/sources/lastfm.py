"""Last.fm-1K listening histories (``userid-timestamp-artid-artname-traid-traname.tsv``).

Tab-separated, no header, newest play first within each user, quoting off (names contain
quotes). ``track_id`` is the track MBID; when that is empty the track is keyed by its names,
``"name:" + artist + " - " + title`` (stable across runs and files), and such rows are counted
in the report. Rows with neither a track MBID nor a track name are dropped with a reason. The
output is in chronological order per user (the file order reversed; ties keep their order).
``userid-profile.tsv`` (demographics) is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twotower.data.report import DataReport
from twotower.data.schema import DataError, LoadResult
from twotower.data.sources.common import (
    BadLines,
    check_options,
    drop_duplicates,
    drop_rows,
    empty_mask,
    finish,
    handle_empty,
    iso_seconds,
    read_table,
    text_column,
)

FILE_NAME = "userid-timestamp-artid-artname-traid-traname.tsv"
COLUMNS = ("user_id", "timestamp", "artist_mbid", "artist", "track_mbid", "title")
NAME_PREFIX = "name:"
KEYED_BY_NAME = "track keyed by artist + title (no track MBID)"
NO_TRACK = "no track MBID and no track name"
OPTIONS = ("encoding", "bad_lines", "on_empty")


def name_key(artist: pd.Series, title: pd.Series) -> pd.Series:
    """The id of a track without MBID: ``"name:" + artist + " - " + title``."""
    return NAME_PREFIX + artist.fillna("") + " - " + title.fillna("")


def _resolve(path: str | None) -> Path:
    if path is None:
        raise DataError(f"lastfm: no path given; expected {FILE_NAME} or its folder")
    p = Path(path)
    if p.is_dir():
        f = p / FILE_NAME
        if not f.is_file():
            found = sorted(x.name for x in p.iterdir())[:20]
            raise DataError(f"{p}: {FILE_NAME} not found in the folder (found {found})")
        return f
    if not p.exists():
        raise DataError(f"{p}: no such file or folder (expected {FILE_NAME})")
    return p


def load(path: str | None, columns: dict[str, str] | None = None, **options: Any) -> LoadResult:
    """Load Last.fm-1K plays.

    Args:
        path: The TSV file or its folder.
        columns: Not used (fixed columns); must be None.
        **options: ``encoding`` (default ``"utf-8"``), ``bad_lines`` (``"error"`` or ``"drop"``
            lines with the wrong field count), ``on_empty`` (rows without user id: ``"drop"``
            (default, counted) or ``"error"``).

    Returns:
        Interactions (user, track, unix-second timestamp), chronological per user; tracks with
        title and artist (first spelling seen).

    Raises:
        DataError: Wrong field counts, bad timestamps, non-UTF-8 bytes.
    """
    check_options("lastfm", options, OPTIONS)
    if columns:
        raise DataError("lastfm: the columns are fixed; do not pass a column mapping")
    f = _resolve(path)
    report = DataReport()
    bad_lines: BadLines = options.get("bad_lines", "error")
    t = read_table(
        f,
        sep="\t",
        names=COLUMNS,
        encoding=options.get("encoding") or "utf-8",
        quoted=False,
        bad_lines=bad_lines,
        report=report,
    )
    report.rows_read = len(t) + report.rows_dropped
    t = handle_empty(t, "user_id", report, options.get("on_empty", "drop"))
    no_track = empty_mask(t.df["track_mbid"]) & empty_mask(t.df["title"])
    t = drop_rows(t, no_track, NO_TRACK, report)
    mbid = text_column(t, "track_mbid")
    artist = text_column(t, "artist", strip=False)
    title = text_column(t, "title", strip=False)
    no_mbid = empty_mask(mbid)
    ts = iso_seconds(t, "timestamp", text_column(t, "timestamp"))
    if (ts < 0).any():
        i = int(np.flatnonzero(ts < 0)[0])
        raise t.error(i, "timestamp", f"expected a time after 1970, got {t.df['timestamp'][i]!r}")
    track_id = mbid.where(~no_mbid, name_key(artist, title))
    report.count(KEYED_BY_NAME, int(no_mbid.sum()))

    df = pd.DataFrame(
        {
            "user_id": text_column(t, "user_id"),
            "track_id": track_id,
            "timestamp": ts,
            "title": title.where(~empty_mask(title), None),
            "artist": artist.where(~empty_mask(artist), None),
        }
    )
    df = drop_duplicates(df, report)
    # newest first per user -> chronological: reverse the file (ties keep their real order),
    # then a stable sort by (user, timestamp)
    df = df.iloc[::-1]
    df = df.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    tracks = df.drop_duplicates("track_id")[["track_id", "title", "artist"]]
    if (f.parent / "userid-profile.tsv").is_file():
        report.notes.append("userid-profile.tsv (demographics) is ignored")
    return finish(df, tracks, report, source="lastfm-1k", files=[f], ordered=True)
