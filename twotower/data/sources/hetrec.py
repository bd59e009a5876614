"""HetRec 2011 Last.fm-2K: user -> artist play counts, artist names and tags.

Files (tab-separated, header line, CRLF line endings): ``user_artists.dat`` (``userID artistID
weight``), ``artists.dat`` (``id name url pictureURL``), ``tags.dat`` (``tagID tagValue``) and
``user_taggedartists.dat`` (``userID artistID tagID day month year``).

Artists are the items: one interaction per user-artist pair with ``weight`` = play count.
The data has **no play order**: the result has ``ordered=False`` and serves the item side and
count-based baselines; evaluation uses a random per-user holdout. ``timestamp`` is the first day
the user tagged that artist when there is one (tag dates before ``min_tag_year`` are bogus in
the real data and ignored), else <NA>. Artist genres are the artist's three most used tags
(ties broken by tag id). ``user_friends.dat`` is not used.
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
    Table,
    check_options,
    drop_duplicates,
    finish,
    ids_as_text,
    int_column,
    read_table,
    text_column,
)

NO_ORDER_NOTE = (
    "no play order: serves the item side and count-based baselines; evaluation uses a random "
    "per-user holdout"
)
NO_TAG_DATE = "user-artist pair without a tag date (timestamp <NA>)"
MERGED_PAIR = "repeated user-artist pair (play counts summed)"
OPTIONS = ("encoding", "bad_lines", "min_tag_year", "top_tags")


def _folder(path: str | None) -> Path:
    if path is None:
        raise DataError("hetrec-lastfm: no path given; expected the hetrec2011-lastfm-2k folder")
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / "user_artists.dat").is_file():
        found = sorted(x.name for x in p.iterdir())[:20] if p.is_dir() else []
        raise DataError(
            f"{p}: user_artists.dat not found (expected the HetRec Last.fm-2K folder); "
            f"found {found}"
        )
    return p


def _tag_dates(
    folder: Path, report: DataReport, encoding: str, min_year: int
) -> tuple[pd.DataFrame, Table | None]:
    """First plausible tag date per (user, artist) and the parsed tag assignments."""
    f = folder / "user_taggedartists.dat"
    if not f.is_file():
        report.notes.append("user_taggedartists.dat not found: no dates, no genres")
        return pd.DataFrame(columns=["user", "artist", "ts"]), None
    cols = ["userID", "artistID", "tagID", "day", "month", "year"]
    t = read_table(
        f, sep="\t", header=True, kinds=dict.fromkeys(cols, "int"), encoding=encoding, required=cols
    )
    user = int_column(t, "userID", min_value=0)
    artist = int_column(t, "artistID", min_value=0)
    tag = int_column(t, "tagID", min_value=0)
    day = int_column(t, "day", min_value=1, max_value=31)
    month = int_column(t, "month", min_value=1, max_value=12)
    year = int_column(t, "year", min_value=1, max_value=9999)
    dates = pd.to_datetime(
        pd.DataFrame({"year": year, "month": month, "day": day}), errors="coerce", utc=True
    )
    bad = dates.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise t.error(i, "day", f"not a calendar date: {year[i]}-{month[i]:02d}-{day[i]:02d}")
    ts = (dates.dt.tz_localize(None).to_numpy("datetime64[s]")).astype(np.int64)
    plausible = year >= min_year
    if (~plausible).any():
        report.notes.append(
            f"{int((~plausible).sum())} tag assignment(s) dated before {min_year} ignored for "
            "timestamps"
        )
    tagged = pd.DataFrame({"user": user, "artist": artist, "tag": tag})
    first = (
        pd.DataFrame({"user": user[plausible], "artist": artist[plausible], "ts": ts[plausible]})
        .groupby(["user", "artist"], as_index=False, sort=False)["ts"]
        .min()
    )
    t.df = tagged
    return first, t


def _artists(
    folder: Path, tagged: Table | None, encoding: str, top: int, report: DataReport
) -> tuple[pd.DataFrame, list[Path]]:
    f = folder / "artists.dat"
    if not f.is_file():
        report.notes.append("artists.dat not found: artists without names")
        return pd.DataFrame(columns=["track_id"]), []
    t = read_table(
        f, sep="\t", header=True, encoding=encoding, report=report, required=["id", "name"]
    )
    aid = int_column(t, "id", min_value=0, what="an integer artist id")
    name = text_column(t, "name")
    artists = pd.DataFrame({"aid": aid, "title": name.where(name != "", None)})
    artists["artist"] = artists["title"]
    dup = artists["aid"].duplicated().to_numpy()
    if dup.any():
        report.notes.append(f"artists.dat: {int(dup.sum())} repeated artist id(s), first kept")
        artists = artists[~dup].reset_index(drop=True)
    files = [f]
    tf = folder / "tags.dat"
    if tagged is not None and tf.is_file() and top > 0:
        tt = read_table(
            tf,
            sep="\t",
            header=True,
            encoding=encoding,
            report=report,
            required=["tagID", "tagValue"],
        )
        tag_names = pd.Series(
            text_column(tt, "tagValue").to_numpy(),
            index=int_column(tt, "tagID", min_value=0),
        )
        tag_names = tag_names[~tag_names.index.duplicated()]
        counts = tagged.df.groupby(["artist", "tag"], as_index=False).size()
        counts = counts.sort_values(["artist", "size", "tag"], ascending=[True, False, True])
        counts = counts.groupby("artist", sort=False).head(top)
        counts["name"] = counts["tag"].map(tag_names)
        counts = counts[counts["name"].notna()]
        counts["rank"] = counts.groupby("artist", sort=False).cumcount()
        wide = counts.pivot(index="artist", columns="rank", values="name")
        genres = wide[0].astype("str")
        for r in wide.columns[1:]:  # at most top_tags steps, each vectorised
            genres = genres + ("|" + wide[r].astype("str")).fillna("")
        artists["genres"] = artists["aid"].map(genres).astype("string")
        files.append(tf)
    artists["track_id"] = ids_as_text(artists["aid"].to_numpy())
    return artists.drop(columns="aid").reset_index(drop=True), files


def load(path: str | None, columns: dict[str, str] | None = None, **options: Any) -> LoadResult:
    """Load the HetRec Last.fm-2K folder.

    Args:
        path: The ``hetrec2011-lastfm-2k`` folder (or any file in it).
        columns: Not used (fixed columns); must be None.
        **options: ``encoding`` (default ``"utf-8"`` for the numeric files and ``"auto"``
            (UTF-8, stray bytes as latin-1) for ``artists.dat`` / ``tags.dat``), ``bad_lines``
            (``"error"`` or ``"drop"`` for ``user_artists.dat``), ``min_tag_year`` (default
            2002, the year Last.fm started), ``top_tags`` (genres per artist, default 3).

    Returns:
        One interaction per user-artist pair (``weight`` = play count), ``ordered=False``;
        tracks = artists with ``title = artist = name`` and tag genres.

    Raises:
        DataError: Missing files or columns, bad ids, counts or dates.
    """
    check_options("hetrec-lastfm", options, OPTIONS)
    if columns:
        raise DataError("hetrec-lastfm: the columns are fixed; do not pass a column mapping")
    folder = _folder(path)
    encoding = options.get("encoding")
    bad_lines: BadLines = options.get("bad_lines", "error")
    report = DataReport()
    f = folder / "user_artists.dat"
    cols = ["userID", "artistID", "weight"]
    t = read_table(
        f,
        sep="\t",
        header=True,
        kinds=dict.fromkeys(cols, "int"),
        encoding=encoding or "utf-8",
        bad_lines=bad_lines,
        report=report,
        required=cols,
    )
    report.rows_read = len(t) + report.rows_dropped
    user = int_column(t, "userID", min_value=0, what="an integer user id")
    artist = int_column(t, "artistID", min_value=0, what="an integer artist id")
    weight = int_column(t, "weight", min_value=0, what="a play count")
    pairs = drop_duplicates(
        pd.DataFrame({"user": user, "artist": artist, "weight": weight}), report
    )
    summed = pairs.groupby(["user", "artist"], as_index=False, sort=False)["weight"].sum()
    report.drop(MERGED_PAIR, len(pairs) - len(summed))

    first, tagged = _tag_dates(
        folder, report, encoding or "utf-8", int(options.get("min_tag_year", 2002))
    )
    summed = summed.merge(first, on=["user", "artist"], how="left")
    report.count(NO_TAG_DATE, int(summed["ts"].isna().sum()))
    tracks, track_files = _artists(
        folder, tagged, encoding or "auto", int(options.get("top_tags", 3)), report
    )
    if len(tracks):
        known = np.isin(summed["artist"].to_numpy(), tracks["track_id"].astype(int).to_numpy())
        report.count("pair with an artist missing from artists.dat", int((~known).sum()))
    report.notes.append(NO_ORDER_NOTE)
    if (folder / "user_friends.dat").is_file():
        report.notes.append("user_friends.dat (social graph) is not used")
    interactions = pd.DataFrame(
        {
            "user_id": ids_as_text(summed["user"].to_numpy()),
            "track_id": ids_as_text(summed["artist"].to_numpy()),
            "timestamp": summed["ts"].astype("Int64"),
            "weight": summed["weight"].astype("float32"),
        }
    )
    files = [f]
    if tagged is not None:
        files.append(tagged.path)
    return finish(
        interactions,
        tracks,
        report,
        source="hetrec-lastfm-2k",
        files=files + track_files,
        ordered=False,
    )
